"""What family adapters share: loading a diffusers pipeline offline, the video-size check of ``latent_shape``, and an
attention mask carried in the prompt embeddings. Nothing family-specific lives here."""
from __future__ import annotations

import os
from typing import Any, Tuple, Union

import torch

__all__ = ["load_diffusers_pipeline", "check_video_size", "pack_mask_column", "unpack_mask_column"]


def load_diffusers_pipeline(pipeline_cls: Any, pretrained: str, torch_dtype: torch.dtype, example_id: str) -> Any:
    """``pipeline_cls.from_pretrained(pretrained, dtype=torch_dtype)`` for a family's ``load_pipeline``, with one clear
    error for a local path that does not exist or weights that cannot be loaded (no network: they must be on disk).
    ``example_id`` is the hub id named in the error (e.g. ``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"``)."""
    name = pipeline_cls.__name__
    looks_local = os.path.isabs(pretrained) or pretrained.startswith((".", "~")) or pretrained.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(pretrained)):
        raise FileNotFoundError(
            f"model.pretrained={pretrained!r} is not an existing directory; pass a local diffusers pipeline "
            f"directory (with model_index.json), a hub id such as {example_id!r}, or 'tiny' for the in-code test model")
    try:
        return pipeline_cls.from_pretrained(os.path.expanduser(pretrained), dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load a {name} from {pretrained!r} ({err}). Without network access the weights must already "
            "be on disk: download them elsewhere (`huggingface-cli download <id> --local-dir DIR`) and set "
            "model.pretrained=DIR") from err


def check_video_size(family: str, num_frames: Any, frame_step: int, height: int, width: int,
                     multiple: Union[int, Tuple[int, int]], frames_note: str = "", size_note: str = "") -> None:
    """One ``ValueError`` naming the setting and its fix unless ``num_frames = frame_step·k + 1`` (an int ≥ 1) and
    ``height`` x ``width`` are positive multiples of ``multiple`` (one int, or ``(mh, mw)``). ``family`` is the name
    the errors give; ``frames_note`` / ``size_note`` add the family's reason to each."""
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % frame_step:
        ok = [frame_step * k + 1 for k in range(1, 4)]
        raise ValueError(f"sampling.num_frames={num_frames!r} is invalid for {family}: it must be {frame_step}k+1 "
                         f"(e.g. {ok}{frames_note}); set sampling.num_frames to one of these")
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    if height < mh or width < mw or height % mh or width % mw:
        size = f"{mh}" if mh == mw else f"{mh} x {mw}"
        raise ValueError(f"sampling.height x width = {height} x {width} is invalid for {family}: both must be "
                         f"positive multiples of {size}{size_note}")


def pack_mask_column(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``embeds [B, L, D]``, ``mask [B, L]`` (0/1 or bool) -> ``[B, L, D + 1]`` in ``embeds``' dtype: a text encoder's
    attention mask carried as the last column of the prompt embeddings, so it survives the rollout's row selection,
    ``cat`` and dtype casts exactly (0 and 1 are exact in every float dtype). For families whose denoiser takes an
    ``encoder_attention_mask`` (Mochi, LTX-Video)."""
    return torch.cat([embeds, mask.to(embeds.dtype).unsqueeze(-1)], dim=-1)


def unpack_mask_column(packed: torch.Tensor, text_dim: int, family: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_mask_column`: ``(embeds [B, L, D], mask [B, L])`` in ``packed``'s dtype; a clear error
    naming ``family`` for a tensor of another shape."""
    if packed.ndim != 3 or packed.shape[-1] != text_dim + 1:
        raise ValueError(f"{family} conditioning must be [B, L, {text_dim + 1}] (packed by its family's "
                         f"encode_prompts), got {tuple(packed.shape)}")
    return packed[..., :text_dim], packed[..., -1]
