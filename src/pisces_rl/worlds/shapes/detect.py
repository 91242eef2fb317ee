"""Object detection and tracking for ShapesBench (pure numpy / scipy, no learned model).

Per frame:

1. **Background** colour = the per-frame median pixel (objects cover well under half the frame).
2. **Foreground** = pixels within ``PALETTE_TOL`` of a palette colour and farther than ``BG_TOL`` from
   the background; each palette colour's pixels are split into 8-connected components, and
   components smaller than ``max(4, 0.004·H·W)`` pixels are dropped.
3. **Soft mask**: on the component grown by one pixel, ``w = clip(1 - |pixel - c| / |c - bg|, 0, 1)``
   with ``c`` the median colour of the component's core (pixels at least 90% as far from the
   background as the farthest one); for an anti-aliased edge ``w`` is the pixel's coverage,
   which gives sub-pixel centroids and areas.
4. **Shape** from the soft mask: ``fill = area / (widest row · tallest column)`` (square 1.0,
   circle π/4 ≈ 0.79, triangle ≈ 0.5–0.7) and the vertical skewness of the mass (≈ -0.6 for the
   up-pointing triangle, 0 for the symmetric shapes): triangle if ``skew < -0.3`` or
   ``fill < 0.68``, square if ``fill >= 0.9``, circle otherwise.
5. **Edge acuity**: the 90th percentile of the one-pixel colour step on the component's boundary
   band, minus the median step between background pixels (so noise does not pass for edges),
   divided by the object–background contrast (1 = a step no wider than anti-aliasing).

Across frames, detections of the same palette colour are linked by Hungarian matching on the
(velocity-predicted) centroid distance, bridging gaps of one frame; links longer than
``MAX_JUMP`` of the frame side are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .spec import COLOURS, PALETTE

__all__ = ["Detection", "Track", "VideoAnalysis", "analyse_video", "classify_shape"]

PALETTE_TOL = 0.3      # max RGB distance from a palette colour for an object pixel
BG_TOL = 0.2           # min RGB distance from the background for an object pixel
MAX_JUMP = 0.25        # max centroid move between linked detections (fraction of frame side)
_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)          # [P, 3]
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Detection:
    """One object in one frame; positions are fractions of the frame width / height."""

    frame: int
    colour: str
    shape: str
    cx: float
    cy: float
    area: float          # soft area, fraction of the frame area
    fill: float
    skew: float
    rgb: np.ndarray      # [3] median colour of the object's core
    acuity: float        # edge acuity in [0, 1]
    mask: np.ndarray = field(repr=False)   # [H, W] bool, the thresholded component


@dataclass
class Track:
    """Detections of one object linked over frames (frames strictly increasing)."""

    detections: list[Detection]

    @property
    def frames(self) -> np.ndarray:
        return np.array([d.frame for d in self.detections])

    @property
    def positions(self) -> np.ndarray:
        """``[n, 2]`` centroids ``(x, y)`` in frame fractions."""
        return np.array([(d.cx, d.cy) for d in self.detections])

    def _mode(self, attr: str) -> str:
        values = [getattr(d, attr) for d in self.detections]
        return max(set(values), key=lambda v: (values.count(v), v))

    @property
    def colour(self) -> str:
        return self._mode("colour")

    @property
    def shape(self) -> str:
        return self._mode("shape")

    def __len__(self) -> int:
        return len(self.detections)

    def displacement(self, num_frames: int) -> np.ndarray:
        """Least-squares ``(dx, dy)`` over the whole clip (slope · (F - 1)), in frame fractions."""
        t, p = self.frames.astype(float), self.positions
        if len(t) < 2:
            return np.zeros(2)
        tc = t - t.mean()
        slope = (tc[:, None] * (p - p.mean(0))).sum(0) / (tc * tc).sum()
        return slope * (num_frames - 1)


@dataclass
class VideoAnalysis:
    """Everything ShapesBench reads from one video."""

    num_frames: int
    height: int
    width: int
    background: np.ndarray                # [F, 3] per-frame background colour
    foreground: np.ndarray                # [F, H, W] bool, every palette-coloured pixel (before size filtering)
    detections: list[list[Detection]]     # per frame
    tracks: list[Track]

    @property
    def min_track_length(self) -> int:
        return max(2, int(np.ceil(0.5 * self.num_frames)))

    @property
    def persistent_tracks(self) -> list[Track]:
        """Tracks present in at least half of the frames: the video's objects."""
        return [t for t in self.tracks if len(t) >= self.min_track_length]


def classify_shape(fill: float, skew: float) -> str:
    """Shape from the soft fill ratio and vertical skewness (see the module docstring)."""
    if skew < -0.3 or fill < 0.68:
        return "triangle"
    return "square" if fill >= 0.9 else "circle"


def _gradient(frame: np.ndarray) -> np.ndarray:
    """``[H, W]`` largest one-pixel colour step (RGB norm) to the right or below each pixel."""
    gx = np.zeros(frame.shape[:2], np.float32)
    gy = np.zeros_like(gx)
    gx[:, :-1] = np.linalg.norm(frame[:, 1:] - frame[:, :-1], axis=-1)
    gy[:-1] = np.linalg.norm(frame[1:] - frame[:-1], axis=-1)
    g = np.maximum(gx, gy)
    g[:, 1:] = np.maximum(g[:, 1:], gx[:, :-1])        # a step counts for the pixels on both sides
    g[1:] = np.maximum(g[1:], gy[:-1])
    return g


def _detect_frame(f: int, frame: np.ndarray, bg: np.ndarray, nearest: np.ndarray, fg: np.ndarray,
                  min_area: int) -> list[Detection]:
    height, width = fg.shape
    grad = base_step = None
    out = []
    for p in np.unique(nearest[fg]):
        labels, _ = ndimage.label(fg & (nearest == p), structure=_EIGHT)
        sizes = np.bincount(labels.ravel())
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or sizes[k] < min_area:
                continue
            y0, y1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, height)      # window with a 2-pixel margin
            x0, x1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, width)
            win, mask = frame[y0:y1, x0:x1], labels[y0:y1, x0:x1] == k
            pix = win[mask]
            d_bg = np.linalg.norm(pix - bg, axis=-1)
            rgb = np.median(pix[d_bg >= 0.9 * d_bg.max()], axis=0)     # the fully covered core
            contrast = float(np.linalg.norm(rgb - bg))
            grown = ndimage.binary_dilation(mask, structure=_EIGHT)
            w = np.clip(1.0 - np.linalg.norm(win - rgb, axis=-1) / max(contrast, 1e-3), 0.0, 1.0) * grown
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
            area = float(w.sum())
            cx, cy = float((w * xs).sum() / area), float((w * ys).sum() / area)
            sd = np.sqrt(max(float((w * (ys - cy) ** 2).sum() / area), 1e-6))
            skew = float((w * (ys - cy) ** 3).sum() / area) / sd ** 3
            fill = area / max(float(w.sum(0).max() * w.sum(1).max()), 1e-6)
            if grad is None:
                grad = _gradient(frame)
                rest = ~ndimage.binary_dilation(fg, structure=_EIGHT)
                base_step = float(np.median(grad[rest])) if rest.any() else 0.0
            band = grown & ~ndimage.binary_erosion(mask, structure=_EIGHT)
            step = np.percentile(grad[y0:y1, x0:x1][band], 90) - base_step
            acuity = float(np.clip(step / max(contrast, 1e-3), 0.0, 1.0))
            full = np.zeros((height, width), dtype=bool)
            full[y0:y1, x0:x1] = mask
            out.append(Detection(frame=f, colour=COLOURS[int(p)], shape=classify_shape(fill, skew),
                                 cx=cx / width, cy=cy / height, area=area / (height * width), fill=fill,
                                 skew=skew, rgb=rgb, acuity=acuity, mask=full))
    return out


def _link(detections: list[list[Detection]], aspect: float) -> list[Track]:
    """Hungarian linking of same-colour detections between consecutive frames (gaps of one frame allowed)."""
    tracks: list[Track] = []
    active: list[Track] = []
    for f, dets in enumerate(detections):
        active = [t for t in active if t.detections[-1].frame >= f - 2]
        cost = np.full((len(active), len(dets)), np.inf)
        for i, tr in enumerate(active):
            last = tr.detections[-1]
            pred = np.array([last.cx, last.cy])
            if len(tr) >= 2:
                prev = tr.detections[-2]
                pred = pred + (pred - np.array([prev.cx, prev.cy])) / (last.frame - prev.frame) * (f - last.frame)
            for j, d in enumerate(dets):
                if d.colour != last.colour:
                    continue
                dist = float(np.hypot(d.cx - pred[0], (d.cy - pred[1]) * aspect))
                if dist <= MAX_JUMP * (f - last.frame):
                    cost[i, j] = dist + (0.02 if d.shape != last.shape else 0.0)
        matched = set()
        if cost.size and np.isfinite(cost).any():
            rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e6))
            for i, j in zip(rows, cols):
                if np.isfinite(cost[i, j]):
                    active[i].detections.append(dets[j])
                    matched.add(j)
        for j, d in enumerate(dets):
            if j not in matched:
                tr = Track([d])
                tracks.append(tr)
                active.append(tr)
    return tracks


def analyse_video(video: np.ndarray, min_area: Optional[int] = None) -> VideoAnalysis:
    """Detect and track the objects of one video.

    Args:
        video: ``[F, C=3, H, W]`` float in [0, 1].
        min_area: smallest component kept, in pixels (default ``max(4, 0.004·H·W)``).

    Returns:
        A :class:`VideoAnalysis`.
    """
    frames = np.ascontiguousarray(np.moveaxis(np.asarray(video, dtype=np.float32), 1, -1))   # [F, H, W, 3]
    num_frames, height, width, _ = frames.shape
    min_area = max(4, int(round(0.004 * height * width))) if min_area is None else int(min_area)
    background = np.median(frames.reshape(num_frames, -1, 3), axis=1)                       # [F, 3]
    dist = np.linalg.norm(frames[..., None, :] - _PALETTE, axis=-1)                          # [F, H, W, P]
    nearest = dist.argmin(-1)
    d_bg = np.linalg.norm(frames - background[:, None, None, :], axis=-1)
    fg = (dist.min(-1) < PALETTE_TOL) & (d_bg > BG_TOL)
    detections = [_detect_frame(f, frames[f], background[f], nearest[f], fg[f], min_area) for f in range(num_frames)]
    tracks = _link(detections, aspect=height / width)
    return VideoAnalysis(num_frames, height, width, background, fg, detections, tracks)
