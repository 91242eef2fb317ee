"""Numpy renderer for ShapesWorld scenes.

Shapes are drawn from signed distance functions in pixel units with one pixel of anti-aliasing
(``coverage = clip(0.5 - sdf, 0, 1)``) and alpha-composited over the background in list order.
Frame ``f`` of ``F`` shows the scene at clip time ``t = f / (F - 1)``.

Example::

    >>> from pisces_rl.worlds.shapes import sample_scene, render_video
    >>> video = render_video(sample_scene(0), num_frames=9, size=32)
    >>> video.shape, video.dtype
    ((9, 3, 32, 32), dtype('float32'))
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from .spec import BackgroundSpec, ObjectSpec, SceneSpec

__all__ = ["render_video", "render_videos", "render_background", "shape_coverage", "to_uint8", "resolve_size"]

MIN_FRAMES = 2
MIN_SIZE = 16

SizeLike = Union[int, Sequence[int]]


def resolve_size(size: SizeLike) -> tuple[int, int]:
    """``32`` -> ``(32, 32)``; ``(H, W)`` stays. Raises ValueError for sizes below 16 pixels."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        h, w = (int(v) for v in size)
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"frames must be at least {MIN_SIZE}x{MIN_SIZE} pixels for shapes to stay "
                         f"recognisable, got {h}x{w}; pass size=32 or larger")
    return h, w


def check_num_frames(num_frames: int) -> int:
    if int(num_frames) != num_frames or num_frames < MIN_FRAMES:
        raise ValueError(f"num_frames must be an integer >= {MIN_FRAMES}, got {num_frames!r} "
                         "(the video model uses 4k+1 frames, e.g. 9 or 17)")
    return int(num_frames)


def shape_coverage(obj: ObjectSpec, cx: float, cy: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``obj`` centred at pixel coordinates ``(cx, cy)``.

    Returns:
        ``[H, W]`` float32 coverage (1 inside, 0 outside, a 1-pixel ramp on the edge).
    """
    h = obj.size * min(height, width)
    px = np.arange(width, dtype=np.float32)[None, :] + 0.5 - cx
    py = np.arange(height, dtype=np.float32)[:, None] + 0.5 - cy
    if obj.shape == "circle":
        sdf = np.sqrt(px * px + py * py) - h
    elif obj.shape == "square":
        sdf = np.maximum(np.abs(px), np.abs(py)) - h
    else:  # triangle pointing up: apex (0, -h), base corners (+-h, +h)
        inv = 1.0 / np.sqrt(5.0)
        base = py - h
        left = (-2.0 * px - (py + h)) * inv
        right = (2.0 * px - (py + h)) * inv
        sdf = np.maximum(base, np.maximum(left, right))
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def render_background(bg: BackgroundSpec, height: int, width: int) -> np.ndarray:
    """The static background ``[C=3, H, W]`` float32: base colour plus an optional smooth grey texture."""
    img = np.broadcast_to(np.asarray(bg.rgb, np.float32)[:, None, None], (3, height, width)).copy()
    if bg.texture > 0:
        rng = np.random.default_rng(bg.texture_seed)
        grid = rng.uniform(-1.0, 1.0, size=(5, 5)).astype(np.float32)
        ys = np.linspace(0, 4, height, dtype=np.float32)
        xs = np.linspace(0, 4, width, dtype=np.float32)
        y0, x0 = np.minimum(ys.astype(int), 3), np.minimum(xs.astype(int), 3)
        wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
        g = grid[y0][:, x0] * (1 - wy) * (1 - wx) + grid[y0 + 1][:, x0] * wy * (1 - wx) \
            + grid[y0][:, x0 + 1] * (1 - wy) * wx + grid[y0 + 1][:, x0 + 1] * wy * wx   # bilinear upsampling
        img += bg.texture * g[None]
    return np.clip(img, 0.0, 1.0)


def render_video(scene: SceneSpec, num_frames: int = 9, size: SizeLike = 32) -> np.ndarray:
    """Render a scene.

    Args:
        scene: the :class:`SceneSpec` to draw.
        num_frames: F >= 2 (use 4k+1, e.g. 9 or 17, for the video model).
        size: frame side in pixels, or ``(H, W)``; at least 16.

    Returns:
        ``[F, C=3, H, W]`` float32 in [0, 1].
    """
    num_frames = check_num_frames(num_frames)
    height, width = resolve_size(size)
    background = render_background(scene.background, height, width)
    video = np.empty((num_frames, 3, height, width), dtype=np.float32)
    for f in range(num_frames):
        t = f / (num_frames - 1)
        frame = background.copy()
        for obj in scene.objects:
            x, y = obj.position(t)
            alpha = shape_coverage(obj, x * width, y * height, height, width)[None]
            frame = frame * (1.0 - alpha) + np.asarray(obj.colour_rgb, np.float32)[:, None, None] * alpha
        video[f] = frame
    return np.clip(video, 0.0, 1.0)


def render_videos(scenes: Sequence[SceneSpec], num_frames: int = 9, size: SizeLike = 32) -> np.ndarray:
    """Render several scenes: ``[B, F, C=3, H, W]`` float32 in [0, 1]."""
    if len(scenes) == 0:
        raise ValueError("render_videos needs at least one scene")
    return np.stack([render_video(s, num_frames, size) for s in scenes])


def to_uint8(video: np.ndarray) -> np.ndarray:
    """``[..., C, H, W]`` float in [0, 1] -> ``[..., H, W, C]`` uint8 (the corpus storage layout)."""
    video = np.asarray(video)
    return np.round(np.clip(np.moveaxis(video, -3, -1), 0.0, 1.0) * 255.0).astype(np.uint8)
