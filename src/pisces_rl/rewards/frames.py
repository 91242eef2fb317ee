"""Which frames a reward sees: uniform subsampling and temporal windows.

Reward encoders are trained on short clips (8 frames for the PISCES encoder), while a generated
video may have many more. Two knobs, both applied by the :class:`RewardServer` before any reward
is called:

* ``num_frames = n``: keep ``n`` frames spread uniformly over the video, first and last included;
* ``num_windows = W > 1``: cut the video into ``W`` consecutive, non-overlapping segments (lengths
  differ by at most one frame), take ``n`` uniform frames from each (``n`` defaults to ``F // W``),
  score each window, and average the window scores.

Example::

    >>> uniform_frame_indices(9, 3)
    [0, 4, 8]
    >>> window_frame_indices(8, num_windows=2, num_frames=2).tolist()
    [[0, 3], [4, 7]]
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["uniform_frame_indices", "window_frame_indices", "subsample_frames", "temporal_windows"]


def _check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def uniform_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """``num_frames`` increasing indices spread uniformly over ``range(num_total)``.

    Index ``i`` is ``round(i * (num_total - 1) / (num_frames - 1))`` (halves round up), so the
    first and last frames are always kept; a single frame is the middle one.
    """
    _check_count(num_total, "the number of frames")
    _check_count(num_frames, "num_frames")
    if num_frames > num_total:
        raise ValueError(
            f"cannot pick num_frames={num_frames} distinct frames from a video of {num_total} frames; "
            f"set num_frames <= {num_total} (or None to keep every frame)"
        )
    if num_frames == 1:
        return [(num_total - 1) // 2]
    span, gaps = num_total - 1, num_frames - 1
    return [(2 * i * span + gaps) // (2 * gaps) for i in range(num_frames)]


def window_frame_indices(num_total: int, num_windows: int = 1, num_frames: Optional[int] = None) -> Tensor:
    """Frame indices of every temporal window: LongTensor ``[W, L]``.

    Segment ``w`` covers frames ``[w * F // W, (w + 1) * F // W)``; ``L = num_frames`` frames are
    taken uniformly from each segment (``L = F // W`` when ``num_frames`` is None).
    """
    _check_count(num_total, "the number of frames")
    _check_count(num_windows, "temporal_windows")
    shortest = num_total // num_windows
    if shortest < 1:
        raise ValueError(
            f"temporal_windows={num_windows} is more than the {num_total} frames of the video; "
            f"set temporal_windows <= {num_total}"
        )
    length = shortest if num_frames is None else _check_count(num_frames, "num_frames")
    if length > shortest:
        raise ValueError(
            f"temporal_windows={num_windows} cuts {num_total} frames into windows of {shortest} frames, "
            f"fewer than num_frames={length}; lower num_frames to <= {shortest} or "
            f"temporal_windows to <= {max(1, num_total // length)}"
        )
    rows = []
    for w in range(num_windows):
        start, stop = w * num_total // num_windows, (w + 1) * num_total // num_windows
        rows.append([start + i for i in uniform_frame_indices(stop - start, length)])
    return torch.tensor(rows, dtype=torch.long)


def _check_videos(videos: Tensor) -> None:
    if not isinstance(videos, Tensor) or videos.dim() != 5:
        shape = list(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"videos must be a tensor [B, F, C, H, W], got {shape}")


def subsample_frames(videos: Tensor, num_frames: Optional[int]) -> Tensor:
    """Keep ``num_frames`` uniformly spaced frames: ``[B, F, C, H, W] -> [B, num_frames, C, H, W]``.

    ``None`` (or ``num_frames == F``) returns ``videos`` itself. Differentiable (an index select).
    """
    _check_videos(videos)
    if num_frames is None or num_frames == videos.shape[1]:
        return videos
    index = torch.tensor(uniform_frame_indices(videos.shape[1], num_frames), device=videos.device)
    return videos.index_select(1, index)


def temporal_windows(videos: Tensor, num_windows: int = 1, num_frames: Optional[int] = None) -> Tensor:
    """Stack the temporal windows of every video: ``[B, F, C, H, W] -> [W, B, L, C, H, W]``.

    ``W = num_windows``, ``L = num_frames`` (or ``F // W``); see :func:`window_frame_indices`.
    With ``num_windows == 1`` this is ``subsample_frames(videos, num_frames)[None]``.
    Differentiable (an index select).
    """
    _check_videos(videos)
    if num_windows == 1:
        return subsample_frames(videos, num_frames).unsqueeze(0)
    index = window_frame_indices(videos.shape[1], num_windows, num_frames).to(videos.device)  # [W, L]
    picked = videos.index_select(1, index.reshape(-1))  # [B, W*L, C, H, W]
    batch, _, *pixel = picked.shape
    return picked.reshape(batch, num_windows, index.shape[1], *pixel).transpose(0, 1)
