"""Policies: diffusers text-to-video pipelines with a trainable LoRA on the denoiser.

>>> from pisces_rl.models import build_policy
>>> policy = build_policy(model_cfg)            # ModelConfig: pretrained="tiny" | dir | hub id, lora_rank, ...
>>> policy.trainable_parameters()               # LoRA params only, float32
>>> with policy.lora_disabled(): ...            # the base model (KL reference)
>>> policy.save_lora("out/lora")                # WanPipeline.load_lora_weights("out/lora") restores it
"""
from .base import ModelFamily, VideoPolicy, build_policy, flow_match_schedule, get_family, register_family, resolve_dtype
from .tiny import build_tiny_tokenizer, build_tiny_wan_pipeline
from .wan import WanFamily

__all__ = [
    "VideoPolicy", "build_policy", "build_tiny_wan_pipeline", "build_tiny_tokenizer", "ModelFamily", "WanFamily",
    "register_family", "get_family", "flow_match_schedule", "resolve_dtype",
]
