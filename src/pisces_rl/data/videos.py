"""Captioned video datasets: the clean data ``x0`` of direct reward backprop (PISCES Algorithm 1).

A dataset is a ``datasets.Dataset`` with a caption column and either

* ``video``: ``[F, H, W, 3]`` uint8 (0..255) or float in [0, 1], encoded by the policy's VAE on first use, or
* ``latents``: ``[C, F, h, w]`` float, already in the denoiser's latent space (``encode_video_dataset`` writes
  them; the released PISCES code trains on such precomputed latents, ``fastvideo/dataset/latent_datasets.py``).

``train.video_dataset`` names one: a registered source (``shapes``: the ShapesWorld corpus clips), an import path
``"package.module:function"``, or a ``datasets.save_to_disk`` directory (or parquet/json/arrow file). A source is a function
``source(num_videos, num_frames, height, width) -> datasets.Dataset``; a world registers its own by name, so the
core never imports a world::

    register_video_source("my_clips", my_clips)        # or VIDEO_SOURCES["my_clips"] = "pkg.mod:my_clips"
    ds = open_video_dataset("my_clips", num_videos=64, num_frames=9, height=32, width=32)
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from .. import registry

__all__ = ["VIDEO_SOURCES", "register_video_source", "is_video_source", "open_video_dataset", "check_video_dataset",
           "videos_to_model", "encode_video_dataset"]

KEY = "train.video_dataset"

VIDEO_SOURCES: dict[str, Union[str, Callable]] = registry._registry["videos"]
"""Named video sources (the :mod:`pisces_rl.registry` ``"videos"`` table): a callable, or the import path of one
(imported only when used). Worlds register theirs (ShapesWorld: ``shapes``) through the plugin entry point."""


def _error(message: str):
    from ..config.base import ConfigError

    return ConfigError(message, KEY)


def register_video_source(name: str, source: Union[str, Callable]) -> None:
    """Make ``train.video_dataset: name`` mean ``source(num_videos, num_frames, height, width)``."""
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"a video source name must be a non-empty string without ':', got {name!r}")
    VIDEO_SOURCES[name] = source


def is_video_source(spec: str) -> bool:
    """Whether ``spec`` names a registered source or looks like an import path ``package.module:function``."""
    registry.load_plugins()
    return spec in VIDEO_SOURCES or (":" in spec and not os.path.exists(os.path.expanduser(spec)))


def _resolve(spec: str) -> Callable:
    source = registry.lookup("videos", spec) or spec
    if callable(source):
        return source
    module_name, _, attr = source.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise _error(f"video source {spec!r} -> {source!r} cannot be imported ({type(exc).__name__}: {exc}); give "
                     "a registered name, 'package.module:function' or a datasets.save_to_disk directory") from None
    if not callable(target):
        raise _error(f"video source {spec!r} -> {source!r} is not callable")
    return target


def open_video_dataset(spec: str, *, num_videos: int, num_frames: int, height: int, width: int):
    """The dataset ``spec`` names: a source is called with the sizes; a path (``save_to_disk`` directory or a
    parquet/json/jsonl/arrow file, :func:`pisces_rl.ot.fit.load_video_dataset`) is opened as it is."""
    registry.load_plugins()
    if spec in VIDEO_SOURCES or not os.path.exists(os.path.expanduser(spec)):
        if not is_video_source(spec):
            raise _error(f"{spec!r} is neither a registered video source ({', '.join(sorted(VIDEO_SOURCES))}), an "
                         "import path 'package.module:function', nor an existing dataset (a datasets.save_to_disk "
                         f"directory or a .parquet/.json/.jsonl/.arrow file; working directory: {os.getcwd()})")
        return _resolve(spec)(num_videos, num_frames, height, width)
    from ..ot.fit import load_video_dataset

    try:
        return load_video_dataset(os.path.expanduser(spec))
    except (OSError, ValueError) as exc:
        raise _error(str(exc)) from None


def check_video_dataset(dataset: Any, caption_column: str, num_frames: int, height: int, width: int,
                        latent_shape: Sequence[int]) -> str:
    """Check ``dataset`` against the run; returns the column to train from (``latents`` if present, else
    ``video``). Raises one :class:`~pisces_rl.config.ConfigError` (key ``train.video_dataset``) naming the fix.

    Args:
        latent_shape: ``(C, F, h, w)`` of one video at the sampling size (``policy.latent_shape(1, ...)[1:]``).
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise _error(f"got a {type(dataset).__name__}; pass a datasets.Dataset (e.g. Dataset.from_dict({{'video': "
                     f"..., '{caption_column}': ...}})) or a save_to_disk directory")
    if len(dataset) == 0:
        raise _error("the dataset has no rows")
    columns = dataset.column_names
    column = "latents" if "latents" in columns else "video" if "video" in columns else None
    if column is None or caption_column not in columns:
        need = [c for c, ok in (("'video' or 'latents'", column is not None), (repr(caption_column),
                caption_column in columns)) if not ok]
        raise _error(f"the dataset lacks the column(s) {', '.join(need)} (it has {columns}); it needs a uint8 'video' "
                     f"column [F, H, W, 3] (or float 'latents' [C, F, h, w]) and the prompts in train.caption_column")
    first = dataset.select([0]).with_format("numpy")[0]
    caption = first[caption_column]
    if not isinstance(caption, str) or not caption.strip():
        raise _error(f"column {caption_column!r} must hold non-empty prompt strings, got {caption!r} in row 0")
    shape = tuple(np.shape(first[column]))
    if column == "latents":
        if shape != tuple(latent_shape):
            raise _error(f"dataset latents are [C, F, h, w] = {list(shape)} but a {num_frames}x{height}x{width} "
                         f"video of this model is {list(latent_shape)}; encode the videos at the sampling size "
                         "(sampling.num_frames / height / width) with this model's VAE (encode_video_dataset)")
        return column
    if shape != (num_frames, height, width, 3):
        raise _error(f"dataset videos are [F, H, W, C] = {list(shape)} but sampling asks for "
                     f"{[num_frames, height, width, 3]}; set sampling.num_frames={shape[0]} sampling.height="
                     f"{shape[1] if len(shape) > 1 else '?'} sampling.width={shape[2] if len(shape) > 2 else '?'}")
    video = np.asarray(first[column])
    top = 1 if np.issubdtype(video.dtype, np.floating) else 255  # numpy formatting reads uint8 back as int64
    if not (np.issubdtype(video.dtype, np.number) and video.min() >= 0 and video.max() <= top):
        raise _error(f"dataset videos must be uint8 (0..255) or float in [0, 1], got {video.dtype} in "
                     f"[{video.min()}, {video.max()}] in row 0")
    return column


def videos_to_model(videos: Any) -> torch.Tensor:
    """Storage layout ``[B, F, H, W, 3]`` (integers 0..255, or float in [0, 1]) -> float32 ``[B, F, C, H, W]``
    in [0, 1]."""
    x = videos if isinstance(videos, torch.Tensor) else torch.as_tensor(np.asarray(videos))
    x = x.movedim(-1, -3)
    return x.float() if x.is_floating_point() else x.float() / 255.0


def encode_video_dataset(policy, dataset, batch_size: int = 8, chunk_size: int = 0):
    """Replace the ``video`` column by ``latents [C, F, h, w]`` (float32, the VAE posterior mean), once.

    Save the result with ``save_to_disk`` and give its directory as ``train.video_dataset``: training then
    never runs the VAE encoder. ``chunk_size`` videos go through the VAE at a time (0 = the whole batch).
    """
    def encode(batch):
        with torch.no_grad():
            videos = videos_to_model(np.asarray(batch["video"])).to(policy.device)
            latents = policy.encode(videos, chunk_size)
        return {"latents": latents.float().cpu().numpy()}

    return dataset.with_format("numpy").map(encode, batched=True, batch_size=batch_size,
                                            remove_columns=["video"]).with_format(None)
