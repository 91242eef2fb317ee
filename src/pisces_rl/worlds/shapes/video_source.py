"""ShapesWorld's corpus clips as the ``shapes`` video source of direct backprop (``train.video_dataset: shapes``).

The world registers this function as the video source ``shapes`` (``plugin.py``, through the ``pisces_rl.plugins``
entry point); the core never imports the world.
"""
from __future__ import annotations

from .corpus import shapes_corpus

__all__ = ["shapes_video_dataset", "CORPUS_SEED"]

CORPUS_SEED = 0
"""The world's corpus seed (``WorldConfig.seed``, ``ShapesBaseModelConfig.seed``)."""


def shapes_video_dataset(num_videos: int, num_frames: int, height: int, width: int):
    """The first ``num_videos`` clips of the world's training corpus (``split="train"``, seed 0: the clips the
    base model, the encoder and the OT map were trained on; held-out captions never appear), rendered at
    ``num_frames`` x ``height`` x ``width``. Columns ``video`` (uint8 ``[F, H, W, 3]``) and ``caption``."""
    return shapes_corpus(num_videos, seed=CORPUS_SEED, num_frames=num_frames, size=(height, width), split="train")
