"""The video–text encoder protocol shared by the PISCES rewards.

An encoder is a frozen video–text model with the anatomy of BLIP / InternVideo2-Stage2 (PISCES, arXiv 2602.01624,
§3): a vision tower, a text tower whose fusion layers cross-attend from text tokens to visual tokens, a
video–text-matching (VTM) head, and ITC projections into a shared embedding space. Adapters (``blip.py`` and any
you add, see ``docs/encoders.md``) turn one such model into the three calls below, so the rewards never touch a
model class directly and tiny test models go through exactly the same code as real checkpoints.

Shapes: ``B`` batch, ``N`` text tokens (padded), ``M`` visual tokens (``1 + F*h*w``), ``D`` the ITC embedding
dimension (``embed_dim``), ``Dv`` the width of the visual tokens fed to cross-attention.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["TextFeatures", "VideoFeatures", "VideoTextEncoder", "AttentionFuser", "check_videos"]

AttentionFuser = Callable[..., Tensor]
"""``fuser(layer_index, attn_probs[B, heads, N, M]) -> attn_probs[B, heads, N, M]`` (row-stochastic).

A fuser with a true ``wants_layer_qk`` attribute is called ``fuser(layer_index, attn_probs, query=Q, key=K)`` by an
encoder with ``supports_layer_qk = True``: ``Q`` ``[B, N, d]`` is the layer's query projection of the text states
entering its cross-attention and ``K`` ``[B, M, d]`` its key projection of the visual tokens (bias included, all
heads concatenated, ``d = heads · head_dim``)."""


@dataclass
class TextFeatures:
    """Text side of the encoder.

    Attributes:
        cls_embedding: ``[B, D]`` projected text [CLS] (ITC space), L2-normalised.
        token_embeddings: ``[B, N, D]`` projected token states ``y_i`` (ITC space), L2-normalised.
        input_ids: ``[B, N]`` token ids (what the fusion tower reads).
        attention_mask: ``[B, N]`` 1 for real tokens, 0 for padding.
        lexical_mask: ``[B, N]`` bool, True for lexical tokens (not [CLS]/[SEP]/pad or other special tokens).
        prompts: the prompts these features encode (length ``B``); kept for error messages and caching.
    """

    cls_embedding: Tensor
    token_embeddings: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    lexical_mask: Tensor
    prompts: Optional[list] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device=None, dtype=None) -> "TextFeatures":
        """Move the float tensors to ``dtype`` and everything to ``device``."""
        return _move(self, device, dtype)


@dataclass
class VideoFeatures:
    """Video side of the encoder.

    Attributes:
        pooled_embedding: ``[B, D]`` projected video embedding (ITC space), L2-normalised.
        tokens: ``[B, M, Dv]`` visual tokens = [visual CLS] + ``F*h*w`` patch tokens (the cross-attention memory).
        token_embeddings: ``[B, M, D]`` the visual tokens projected to ITC space, L2-normalised (``x_j``).
        frame_index: ``[M]`` ``t_j``, the frame number ``0 .. F-1`` of each patch token; the visual CLS gets -1.
        patch_position: ``[M, 2]`` ``s_j`` = (row, column) on ``linspace(0, 1, h) × linspace(0, 1, w)``; the visual
            CLS gets (-1, -1), outside the grid (the PISCES code's geometry).
        num_frames: ``F``, frames that reached the vision tower (after subsampling).
        grid: ``(h, w)`` patch grid per frame.
    """

    pooled_embedding: Tensor
    tokens: Tensor
    token_embeddings: Tensor
    frame_index: Tensor
    patch_position: Tensor
    num_frames: int = 1
    grid: tuple = (1, 1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device=None, dtype=None) -> "VideoFeatures":
        """Move the float tensors to ``dtype`` and everything to ``device``."""
        return _move(self, device, dtype)


def _move(features, device, dtype):
    values = {}
    for f in fields(features):
        v = getattr(features, f.name)
        if isinstance(v, Tensor):
            v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        values[f.name] = v
    return type(features)(**values)


@runtime_checkable
class VideoTextEncoder(Protocol):
    """What the OT rewards need from a frozen video–text model.

    Implementations keep their parameters frozen (``requires_grad=False``, eval mode) but must stay differentiable
    with respect to the *videos*, so the rewards can be used for direct reward backpropagation.
    """

    embed_dim: int

    def encode_text(self, prompts: list[str]) -> TextFeatures:
        """Tokenise and encode ``B`` prompts with the unimodal text tower."""
        ...

    def encode_video(self, videos: Tensor) -> VideoFeatures:
        """Encode ``videos[B, F, C, H, W]`` with values in [0, 1]."""
        ...

    def match_probability(
        self, text: TextFeatures, video: VideoFeatures, attention_fuser: Optional[AttentionFuser] = None
    ) -> Tensor:
        """VTM positive probability ``[B]`` for the pairs (text[b], video[b]).

        ``attention_fuser(layer_index, attn_probs[B, heads, N, M])`` is applied in every cross-attention layer of
        the fusion tower; the layer continues with what it returns. Encoders that also pass the layer's query / key
        projections to fusers asking for them (:data:`AttentionFuser`) set ``supports_layer_qk = True``.
        """
        ...


def check_videos(videos, name: str = "videos") -> Tensor:
    """Validate a batch of videos ``[B, F, C, H, W]`` (C = 3, floating point, values in [0, 1]); return it.

    Raises ``TypeError`` / ``ValueError`` naming the problem and the fix.
    """
    if not isinstance(videos, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, F, C, H, W], got {type(videos).__name__}")
    if videos.dim() != 5:
        hint = " (a single video? add a batch dim with videos.unsqueeze(0))" if videos.dim() == 4 else ""
        raise ValueError(f"{name} must have shape [B, F, C, H, W], got {tuple(videos.shape)}{hint}")
    if videos.shape[2] != 3:
        hint = " (channels-last? use videos.permute(0, 1, 4, 2, 3))" if videos.shape[-1] == 3 else ""
        raise ValueError(f"{name} must have 3 colour channels at dim 2 ([B, F, C, H, W]), "
                         f"got shape {tuple(videos.shape)}{hint}")
    if videos.shape[0] == 0 or videos.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise TypeError(f"{name} must be floating point with values in [0, 1], got dtype {videos.dtype} "
                        "(for uint8 frames use videos.float() / 255)")
    with torch.no_grad():
        lo, hi = videos.min().item(), videos.max().item()
    if not (lo == lo and hi == hi):  # NaN
        raise ValueError(f"{name} contains NaN values")
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{name} must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}] "
                         "(decoded in [-1, 1]? use (videos + 1) / 2; otherwise videos.clamp(0, 1))")
    return videos
