"""PISCES distribution-level quality reward: cosine to the OT-mapped text embedding.

``R_q = cos(T(y_cls), x̂_pooled)`` (PISCES, arXiv 2602.01624, §3.2): the generated video's pooled embedding
``x̂_pooled`` against the text [CLS] embedding ``y_cls`` (L2-normalised) pushed onto the manifold of real-video
embeddings by the Monge map ``T`` learned with Neural OT (:class:`pisces_rl.ot.NeuralOTMap`). Without a map, or with
``use_ot=False``, ``T`` is the identity and ``R_q`` is the raw [CLS] cosine (the "w/o OT" ablation).
The text side is a constant; the video side is differentiable (direct reward backprop).

Example::

    >>> enc = BlipVideoTextEncoder.tiny()
    >>> reward = OTQualityReward(enc, ot_map=NeuralOTMap.from_pretrained("runs/ot_map"))
    >>> reward(torch.rand(2, 4, 3, 32, 32), ["a red circle", "two blue squares"]).shape
    torch.Size([2])
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._features import check_batch, encode_prompts, encoder_device, grad_context

__all__ = ["OTQualityReward"]


def _load_map(path: Union[str, Path]):
    from pisces_rl.ot.neural_map import load_map

    return load_map(path)


class OTQualityReward:
    """``R_q(videos[B, F, C, H, W] in [0, 1], prompts) -> Tensor[B]`` in [-1, 1].

    Args:
        encoder: a frozen :class:`~pisces_rl.encoders.base.VideoTextEncoder`.
        ot_map: the text→video map ``T``: a callable ``[B, D] -> [B, D]`` (``NeuralOTMap``, ``L2RegressionMap``,
            any ``nn.Module``), a directory written by their ``save_pretrained`` (e.g. by ``pisces-rl fit-ot-map``;
            loaded with :func:`pisces_rl.ot.load_map` onto the encoder's device), or None (identity).
        use_ot: False ignores the map (raw [CLS] cosine, the "w/o OT" ablation).
        device: optional device to move the encoder (and a module map) to.

    Scoring runs without autograd unless grad mode is on *and* ``videos.requires_grad`` (what
    ``RewardServer.differentiable`` does, as advertised by ``differentiable = True``).
    """

    name = "ot_quality"
    differentiable = True

    def __init__(self, encoder, ot_map: Union[Callable[[Tensor], Tensor], str, Path, None] = None,
                 use_ot: bool = True, device=None):
        if encoder is None or not hasattr(encoder, "encode_video"):
            raise TypeError("OTQualityReward needs a VideoTextEncoder (encode_text, encode_video), "
                            "e.g. BlipVideoTextEncoder.tiny() or .from_pretrained(path)")
        if isinstance(ot_map, (str, Path)):
            if not Path(ot_map).exists():
                raise FileNotFoundError(f"OT map directory {str(ot_map)!r} does not exist; train one with "
                                        "`pisces-rl fit-ot-map --output DIR ...` or pass ot_map=None")
            ot_map = _load_map(ot_map).to(device if device is not None else encoder_device(encoder) or "cpu")
        if ot_map is not None and not callable(ot_map):
            raise TypeError(f"ot_map must be callable text_emb[B, D] -> [B, D], got {type(ot_map).__name__}")
        if isinstance(ot_map, torch.nn.Module):
            ot_map.eval().requires_grad_(False)
            if device is not None:
                ot_map = ot_map.to(device)
        if device is not None and hasattr(encoder, "to"):
            encoder = encoder.to(device) or encoder
        self.encoder = encoder
        self.ot_map = ot_map
        self.use_ot = bool(use_ot)

    @property
    def device(self) -> Optional[torch.device]:
        """Where videos should live (the encoder's device); read by the RewardServer."""
        return encoder_device(self.encoder)

    @property
    def uses_map(self) -> bool:
        """True when ``T`` is applied (a map is set and ``use_ot``)."""
        return self.use_ot and self.ot_map is not None

    def __repr__(self) -> str:
        return f"OTQualityReward(use_ot={self.use_ot}, ot_map={type(self.ot_map).__name__ if self.ot_map else None})"

    def text_targets(self, prompts: list[str]) -> Tensor:
        """``T(y_cls)`` (or ``y_cls`` without the map), ``[B, D]``, no autograd."""
        cls = encode_prompts(self.encoder, prompts).cls_embedding             # [B, D], L2-normalised
        if not self.uses_map:
            return cls
        with torch.no_grad():
            like = next(iter(self.ot_map.parameters()), None) if isinstance(self.ot_map, torch.nn.Module) else None
            inputs = cls.to(device=like.device, dtype=like.dtype) if like is not None else cls
            mapped = self.ot_map(inputs)
        if not isinstance(mapped, Tensor) or mapped.shape != cls.shape:
            got = tuple(mapped.shape) if isinstance(mapped, Tensor) else type(mapped).__name__
            raise ValueError(f"ot_map must map text embeddings {tuple(cls.shape)} to the same shape, got {got}; "
                             f"was it trained for this encoder (embed_dim={cls.shape[-1]})?")
        return mapped.to(device=cls.device, dtype=cls.dtype)

    def score_features(self, targets: Tensor, video) -> Tensor:
        """``cos(targets[b], video.pooled_embedding[b])``, ``[B]``."""
        pooled = video.pooled_embedding
        return F.cosine_similarity(targets.to(device=pooled.device, dtype=pooled.dtype), pooled, dim=-1)

    def __call__(self, videos: Tensor, prompts: list[str], **kwargs) -> Tensor:
        """Score ``videos[B, F, C, H, W]`` in [0, 1] against ``B`` prompts; returns ``Tensor[B]``."""
        prompts = check_batch(videos, prompts, "ot_quality")
        targets = self.text_targets(prompts)
        with grad_context(videos):
            return self.score_features(targets, self.encoder.encode_video(videos))
