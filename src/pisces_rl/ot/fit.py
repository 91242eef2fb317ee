"""Fit the text→video OT map of the PISCES quality reward on a captioned video corpus (``pisces-rl fit-ot-map``).

Pipeline (PISCES, arXiv 2602.01624, §3.2): encode every (caption, video) pair with the frozen reward encoder,
giving L2-normalised text [CLS] embeddings ``Y[N, D]`` (source μ) and pooled real-video embeddings ``X[N, D]``
(target ν), then fit a :class:`~pisces_rl.ot.neural_map.NeuralOTMap` (Neural OT, Korotin et al. 2023) or the
:class:`~pisces_rl.ot.neural_map.L2RegressionMap` baseline, and save it with ``save_pretrained``.

Dataset format: a ``datasets`` dataset (a ``save_to_disk`` directory, or a ``.parquet`` / ``.json`` / ``.jsonl`` /
``.arrow`` file) with

* a caption column of strings;
* a video column holding one clip per row as a nested array, either ``[F, C, H, W]`` or ``[F, H, W, C]`` (``C`` = 1
  or 3; ``layout="auto"`` tells them apart by where the size-1/3 axis is and refuses to guess when both fit),
  with ``uint8``/integer values in [0, 255] or float values in [0, 1].

Clips may differ in size; the encoder resizes frames and (with ``num_frames``) subsamples them.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

__all__ = ["load_video_dataset", "video_to_tensor", "encode_corpus", "build_map", "fit_ot_map", "MAP_TYPES"]

MAP_TYPES = {"neural": "NeuralOTMap", "l2": "L2RegressionMap"}
DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
INFO_FILE = "fit_ot_map.json"


def load_video_dataset(source: Union[str, Path], split: str = "train"):
    """Open a captioned-video dataset: a ``save_to_disk`` directory or a parquet/json/jsonl/arrow file."""
    import datasets

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist; pass a directory written by "
                                "Dataset.save_to_disk or a .parquet/.json/.jsonl/.arrow file")
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ValueError(f"{str(path)!r} is not a dataset saved with save_to_disk ({exc}); save it with "
                             "Dataset.save_to_disk(dir) or point --dataset at a data file") from None
    elif path.suffix == ".arrow":
        data = datasets.Dataset.from_file(str(path))
    elif path.suffix in DATA_FILE_BUILDERS:
        data = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        raise ValueError(f"unsupported dataset file {path.name!r}; use a save_to_disk directory or one of "
                         f"{sorted([*DATA_FILE_BUILDERS, '.arrow'])} (CSV cannot hold video arrays)")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"split {split!r} not in dataset {str(path)!r}; available: {sorted(data)}")
        data = data[split]
    return data


def video_to_tensor(value: Any, layout: str = "auto") -> Tensor:
    """One stored clip (nested list / array / tensor) → float ``[F, 3, H, W]`` in [0, 1]."""
    video = value if isinstance(value, Tensor) else torch.as_tensor(_as_array(value))
    if video.dim() != 4:
        raise ValueError(f"each video must be a 4-D array [F, C, H, W] or [F, H, W, C], got shape "
                         f"{tuple(video.shape)}")
    if layout == "auto":
        first, last = video.shape[1] in (1, 3), video.shape[-1] in (1, 3)
        if first == last:
            raise ValueError(f"cannot tell the channel axis of a video of shape {tuple(video.shape)}; pass "
                             "layout='fchw' or 'fhwc' (--video-layout)")
        layout = "fchw" if first else "fhwc"
    if layout == "fhwc":
        video = video.permute(0, 3, 1, 2)
    elif layout != "fchw":
        raise ValueError(f"unknown video layout {layout!r}; use 'auto', 'fchw' or 'fhwc'")
    if video.shape[1] not in (1, 3):
        raise ValueError(f"videos need 1 or 3 channels, got shape {tuple(video.shape)} as [F, C, H, W]")
    if not video.is_floating_point():
        video = video.float() / 255.0
    video = video.float()
    return video.expand(-1, 3, -1, -1) if video.shape[1] == 1 else video


def _as_array(value):
    import numpy as np

    try:
        return np.asarray(value)
    except ValueError:  # ragged nesting
        raise ValueError("a video is a ragged nested list; every frame must have the same [C, H, W] / [H, W, C] "
                         "shape") from None


def encode_corpus(encoder, dataset, video_column: str = "video", caption_column: str = "caption",
                  batch_size: int = 16, layout: str = "auto", max_samples: Optional[int] = None,
                  progress: bool = False) -> tuple[Tensor, Tensor]:
    """Encode (caption, video) pairs: returns ``(text_emb[N, D], video_emb[N, D])``, float32 on CPU, both
    L2-normalised (text [CLS] and pooled video embeddings of the encoder's ITC space)."""
    missing = [c for c in (video_column, caption_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing}; its columns are {dataset.column_names} "
                         "(choose them with --video-column / --caption-column)")
    total = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
    if total < 2:
        raise ValueError(f"need at least 2 captioned videos to fit a map, the dataset has {total}")
    rows = dataset.select_columns([video_column, caption_column]).with_format(
        "torch", columns=[video_column], output_all_columns=True)
    texts, videos = [], []
    steps = range(0, total, batch_size)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="encode corpus", unit="batch")
    for start in steps:
        batch = rows[start:min(start + batch_size, total)]
        captions = batch[caption_column]
        if not all(isinstance(c, str) for c in captions):
            raise ValueError(f"column {caption_column!r} must hold one caption string per row")
        clips = [video_to_tensor(v, layout) for v in batch[video_column]]
        with torch.no_grad():
            texts.append(encoder.encode_text(list(captions)).cls_embedding.float().cpu())
            same = all(c.shape == clips[0].shape for c in clips)
            groups = [torch.stack(clips)] if same else [c[None] for c in clips]
            videos.append(torch.cat([encoder.encode_video(g).pooled_embedding.float().cpu() for g in groups]))
    return torch.cat(texts), torch.cat(videos)


def _accepted(fn, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def build_map(map_type: str, dim: int, hidden: int = 1024):
    """A fresh ``NeuralOTMap`` (``"neural"``) or ``L2RegressionMap`` (``"l2"``) for ``dim``-d embeddings."""
    if map_type not in MAP_TYPES:
        raise ValueError(f"unknown map type {map_type!r}; use one of {sorted(MAP_TYPES)}")
    from pisces_rl.ot import neural_map

    return getattr(neural_map, MAP_TYPES[map_type])(dim=dim, hidden=hidden)


def fit_ot_map(dataset, encoder, *, output: Union[str, Path, None] = None, map_type: str = "neural",
               video_column: str = "video", caption_column: str = "caption", layout: str = "auto",
               steps: int = 1000, batch_size: int = 128, lr: float = 1e-4, k_t: int = 10, hidden: int = 1024,
               val_fraction: float = 0.1, eval_every: Optional[int] = None, seed: int = 0,
               device: Union[str, torch.device, None] = None, encode_batch_size: int = 16,
               max_samples: Optional[int] = None, progress: bool = True, source: Optional[str] = None):
    """Encode the corpus, fit the map, save it to ``output`` (if given); returns ``(ot_map, history)``.

    ``dataset`` is a ``datasets.Dataset`` (see :func:`load_video_dataset`), ``encoder`` a
    :class:`~pisces_rl.encoders.base.VideoTextEncoder` (embeddings are taken from its ITC space). Options the
    map's ``fit`` does not take (``k_t`` for the L2 baseline) are dropped. The history is the map's ``fit``
    result (train losses, held-out mutual-kNN / Spearman, ``best`` = the restored checkpoint). Besides the map's
    own files, ``output`` gets ``fit_ot_map.json`` (corpus size, encoder, options, history).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    text, video = encode_corpus(encoder, dataset, video_column, caption_column, batch_size=encode_batch_size,
                                layout=layout, max_samples=max_samples, progress=progress)
    ot_map = build_map(map_type, dim=text.shape[1], hidden=hidden)
    if device is not None:
        ot_map = ot_map.to(device)
        text, video = text.to(device), video.to(device)
    options = {"steps": steps, "batch_size": min(batch_size, len(text)), "lr": lr, "k_t": k_t,
               "val_fraction": val_fraction, "seed": seed, "progress": progress}
    if eval_every is not None:
        options["eval_every"] = eval_every
    history = ot_map.fit(text, video, **_accepted(ot_map.fit, options))
    if output is not None:
        output = Path(output)
        ot_map.save_pretrained(output)
        info = {"map": map_type, "num_pairs": len(text), "embed_dim": text.shape[1], "dataset": source,
                "encoder": type(encoder).__name__, "video_column": video_column, "caption_column": caption_column,
                "options": {k: v for k, v in options.items() if k != "progress"}, "hidden": hidden,
                "history": history}
        (output / INFO_FILE).write_text(json.dumps(info, indent=2, default=_jsonable))
    return ot_map, history


def _jsonable(value):
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
