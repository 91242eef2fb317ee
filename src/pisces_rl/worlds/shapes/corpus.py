"""The ShapesWorld captioned-video corpus (a ``datasets.Dataset``) and prompt lists.

Every item is generated from ``(seed, index)`` alone, so a corpus is reproducible item by item and
the first ``n`` items of a larger corpus equal a corpus of ``n`` items.

Train / held-out split: each *canonical* caption is hashed (md5) into 100 buckets; buckets below
``HELDOUT_PERCENT`` are held out. ``split="train"`` and ``split="heldout"`` therefore never share a
caption (paraphrases follow their canonical caption), which gives RL / evaluation prompts that the
corpus never showed.

Example::

    >>> ds = shapes_corpus(8, seed=0, num_frames=9, size=32)
    >>> videos = videos_to_tensor(ds.with_format("numpy", dtype="uint8")["video"])
    >>> tuple(videos.shape)                                   # [B, F, C, H, W] float32 in [0, 1]
    (8, 9, 3, 32, 32)
    >>> prompts = shapes_prompts(4, seed=0, split="heldout")
"""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Optional, Sequence, Union

import numpy as np

from .captions import caption_from_attributes, scene_attributes
from .render import SizeLike, check_num_frames, render_video, resolve_size, to_uint8
from .spec import sample_scene, make_rng

__all__ = ["shapes_corpus", "shapes_prompts", "caption_split", "videos_to_tensor", "corpus_features",
           "HELDOUT_PERCENT", "CORPUS_VERSION"]

HELDOUT_PERCENT = 10
"""Share (in %) of canonical captions held out of ``split="train"``."""
CORPUS_VERSION = 1
"""Bump when generation changes; part of the cache key."""
SPLITS = ("all", "train", "heldout")
_CHUNK = 512
_MAX_ATTEMPTS = 1000


def caption_split(canonical_caption: str) -> str:
    """``"heldout"`` or ``"train"``: the fixed split a canonical caption belongs to."""
    bucket = int(hashlib.md5(canonical_caption.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _scene_for(seed: int, index: int, split: str, salt: int):
    """The scene for item ``index``: the first attempt whose caption falls in ``split``."""
    for attempt in range(_MAX_ATTEMPTS):
        scene = sample_scene((seed, index, attempt, salt))
        canonical = caption_from_attributes(scene_attributes(scene))
        if split == "all" or caption_split(canonical) == split:
            return scene, canonical, attempt
    raise RuntimeError(f"no scene in split {split!r} after {_MAX_ATTEMPTS} attempts")  # not reached in practice


def corpus_features(num_frames: int, height: int, width: int):
    """The ``datasets.Features`` of :func:`shapes_corpus`."""
    import datasets

    text, ints = datasets.Value("string"), datasets.Value("int32")
    return datasets.Features({
        "video": datasets.Array4D(shape=(num_frames, height, width, 3), dtype="uint8"),
        "caption": text,                          # the caption (a paraphrase when paraphrase=True)
        "canonical_caption": text,                # the canonical template caption
        "kind": text,                             # group | relation | pair
        "shapes": datasets.List(text),            # one entry per object group named by the caption
        "colours": datasets.List(text),
        "counts": datasets.List(ints),
        "motions": datasets.List(text),
        "relation": text,                         # "" when the caption states none
        "num_objects": ints,
        "scene": text,                            # SceneSpec JSON (positions, sizes, displacements, background)
        "index": ints,
    })


def _rows(seed, start, stop, num_frames, size, split, paraphrase):
    cols: dict[str, list] = {k: [] for k in ("caption", "canonical_caption", "kind", "shapes", "colours", "counts",
                                             "motions", "relation", "num_objects", "scene", "index")}
    videos = []
    for i in range(start, stop):
        scene, canonical, attempt = _scene_for(seed, i, split, salt=0)
        attrs = scene_attributes(scene)
        videos.append(to_uint8(render_video(scene, num_frames, size)))
        rng = make_rng((seed, i, attempt, 2)) if paraphrase else None
        cols["caption"].append(caption_from_attributes(attrs, rng) if paraphrase else canonical)
        cols["canonical_caption"].append(canonical)
        cols["kind"].append(scene.kind)
        cols["shapes"].append([o.shape for o in attrs.objects])
        cols["colours"].append([o.colour for o in attrs.objects])
        cols["counts"].append([o.count for o in attrs.objects])
        cols["motions"].append([o.motion for o in attrs.objects])
        cols["relation"].append(attrs.relation or "")
        cols["num_objects"].append(len(scene.objects))
        cols["scene"].append(scene.to_json())
        cols["index"].append(i)
    return {"video": np.stack(videos), **cols}


def shapes_corpus(num_videos: int, seed: int = 0, num_frames: int = 9, size: SizeLike = 32,
                  split: str = "all", paraphrase: bool = False, cache_dir: Optional[str] = None):
    """Generate the captioned-video corpus.

    Args:
        num_videos: number of items (>= 1).
        seed: corpus seed; item ``i`` depends only on ``(seed, i)``.
        num_frames: F (>= 2; the video model uses 4k+1, e.g. 9 or 17).
        size: frame side in pixels or ``(H, W)`` (>= 16).
        split: ``"all"``, ``"train"`` or ``"heldout"`` (see :func:`caption_split`).
        paraphrase: caption with seeded synonyms instead of the canonical template.
        cache_dir: if given, the dataset is saved under it with ``save_to_disk`` and loaded from
            there next time (the directory name encodes every argument and ``CORPUS_VERSION``).

    Returns:
        ``datasets.Dataset`` with the columns of :func:`corpus_features`. ``video`` is
        ``Array4D [F, H, W, C=3] uint8``; read it fast with
        ``ds.with_format("numpy", dtype="uint8")["video"]`` and convert with :func:`videos_to_tensor`.
    """
    import datasets

    if int(num_videos) != num_videos or num_videos < 1:
        raise ValueError(f"num_videos must be a positive integer, got {num_videos!r}")
    num_frames, (height, width), split = check_num_frames(num_frames), resolve_size(size), _check_split(split)
    path = None
    if cache_dir is not None:
        key = f"shapes_v{CORPUS_VERSION}_n{num_videos}_s{seed}_f{num_frames}_{height}x{width}_{split}" \
              f"{'_para' if paraphrase else ''}"
        path = os.path.join(cache_dir, key)
        if os.path.isdir(path):
            return datasets.load_from_disk(path)
    features = corpus_features(num_frames, height, width)
    parts = [datasets.Dataset.from_dict(_rows(seed, a, min(a + _CHUNK, num_videos), num_frames, (height, width),
                                              split, paraphrase), features=features)
             for a in range(0, int(num_videos), _CHUNK)]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if path is not None:
        tmp = path + f".tmp{os.getpid()}"
        ds.save_to_disk(tmp)
        if os.path.isdir(path):      # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
        ds = datasets.load_from_disk(path)
    return ds


def shapes_prompts(n: int, seed: int = 0, split: str = "all", paraphrase: bool = False,
                   unique: bool = True) -> list[str]:
    """``n`` template prompts for RL training / evaluation, deterministic in ``seed``.

    Prompts come from scenes sampled with a different salt than the corpus, so ``seed`` values can
    be shared. Use ``split="heldout"`` for prompts whose caption never appears in a
    ``split="train"`` corpus.

    Raises:
        ValueError: bad arguments, or ``unique=True`` and the split has fewer than ``n`` distinct
            captions within the sampling budget (ask for fewer or set ``unique=False``).
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_split(split)
    prompts: list[str] = []
    seen: set[str] = set()
    for i in range(50 * int(n) + 1000):
        scene, canonical, attempt = _scene_for(seed, i, split, salt=1)
        if unique and canonical in seen:
            continue
        seen.add(canonical)
        prompts.append(caption_from_attributes(scene_attributes(scene), make_rng((seed, i, attempt, 3)))
                       if paraphrase else canonical)
        if len(prompts) == n:
            return prompts
    raise ValueError(f"found only {len(prompts)} distinct prompts in split {split!r}; ask for fewer or "
                     "pass unique=False")


def videos_to_tensor(videos: Union[np.ndarray, Sequence, "torch.Tensor"]):  # noqa: F821
    """Corpus storage layout to model layout.

    Args:
        videos: uint8 ``[B, F, H, W, C]`` or ``[F, H, W, C]`` (numpy, torch, or nested lists).

    Returns:
        ``torch.float32`` ``[B, F, C, H, W]`` (or ``[F, C, H, W]``) in [0, 1].
    """
    import torch

    x = videos if isinstance(videos, torch.Tensor) else torch.as_tensor(np.asarray(videos))
    if x.ndim not in (4, 5) or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos [B, F, H, W, 3] or [F, H, W, 3], got shape {tuple(x.shape)}")
    if x.is_floating_point():
        raise ValueError("videos_to_tensor expects the corpus's uint8 storage (0..255); float videos are "
                         "already in model range -- permute them to [..., C, H, W] instead")
    return x.movedim(-1, -3).to(torch.float32) / 255.0
