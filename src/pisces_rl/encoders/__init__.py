"""Video–text encoders behind one protocol (:class:`VideoTextEncoder`), so real checkpoints and tiny test models
share the reward code. See ``docs/encoders.md`` for adding an adapter."""
from __future__ import annotations

from .base import AttentionFuser, TextFeatures, VideoFeatures, VideoTextEncoder, check_videos
from .blip import BlipVideoTextEncoder, tiny_blip_config
from .temporal import TemporalAdapter
from .tokenizer import build_tiny_tokenizer

__all__ = ["VideoTextEncoder", "TextFeatures", "VideoFeatures", "AttentionFuser", "check_videos",
           "BlipVideoTextEncoder", "tiny_blip_config", "TemporalAdapter", "build_tiny_tokenizer", "load_encoder"]


def load_encoder(spec, num_frames=None, device=None, dtype=None):
    """``"tiny"`` (or ``"tiny:SEED"``) → :meth:`BlipVideoTextEncoder.tiny`; a directory → ``from_pretrained``;
    ``"shapes"`` → the ShapesWorld encoder built by ``make world``; a hub id ``org/name`` that is not a local path →
    its snapshot in the Hugging Face cache (downloaded if the Hub is reachable); an encoder object is returned as
    is. Frozen in every case."""
    if not isinstance(spec, str):
        return spec
    from pisces_rl.registry import resolve_artifact

    spec = resolve_artifact("encoder", spec) or spec            # a world's name, e.g. 'shapes'
    if spec == "tiny" or spec.startswith("tiny:"):
        seed = int(spec.partition(":")[2] or 0)
        encoder = BlipVideoTextEncoder.tiny(seed=seed, num_frames=num_frames)
        if dtype is not None:
            from .blip import _resolve_dtype
            encoder = encoder.to(dtype=_resolve_dtype(dtype))
        return encoder.to(device) if device is not None else encoder
    from pisces_rl.config.inputs import looks_like_hub_id

    if looks_like_hub_id(spec):
        spec = _hub_snapshot(spec)
    return BlipVideoTextEncoder.from_pretrained(spec, num_frames=num_frames, device=device, dtype=dtype)


def _hub_snapshot(repo_id: str) -> str:
    """Local directory of a Hub checkpoint: config, tokenizer and safetensors weights (pickled weights only if the
    repository has no safetensors)."""
    import os

    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"])
    return path
