"""Policies: diffusers text-to-video pipelines whose denoiser is trained by LoRA or in full.

>>> from pisces_rl.models import build_policy
>>> policy = build_policy(model_cfg)            # ModelConfig: pretrained="tiny" | dir | hub id, finetune, lora_rank, ...
>>> policy.trainable_parameters()               # LoRA params only (finetune=lora) or the whole denoiser (full), fp32
>>> with policy.lora_disabled(): ...            # the base model (KL reference): adapter off / frozen copy (full)
>>> policy.save_weights("out/lora")             # WanPipeline.load_lora_weights("out/lora") restores it
>>> UpdateRatio(policy.transformer).step()      # ||dW|| / ||W|| of the last optimiser step
"""
from .base import (FINETUNE_MODES, ModelFamily, VideoPolicy, build_policy, flow_match_schedule, get_family,
                   register_family, resolve_dtype)
from .lora import UpdateRatio, save_denoiser
from .tiny import build_tiny_tokenizer, build_tiny_wan22_pipeline, build_tiny_wan_pipeline
from .text_to_video_sd import TextToVideoSDFamily, build_tiny_text_to_video_sd_pipeline
from .wan import WanFamily
from .hunyuan_video import HunyuanVideoFamily
from .hunyuan_video_tiny import build_tiny_hunyuan_video_pipeline
from .cogvideox import CogVideoXFamily, build_tiny_cogvideox_pipeline
from .mochi import MochiFamily, build_tiny_mochi_pipeline
from .ltx_video import LTXVideoFamily, build_tiny_ltx_video_pipeline

__all__ = [
    "VideoPolicy", "build_policy", "build_tiny_wan_pipeline", "build_tiny_wan22_pipeline", "build_tiny_tokenizer",
    "ModelFamily", "WanFamily", "CogVideoXFamily", "build_tiny_cogvideox_pipeline",
    "TextToVideoSDFamily", "build_tiny_text_to_video_sd_pipeline",
    "register_family", "get_family", "flow_match_schedule", "resolve_dtype", "FINETUNE_MODES", "UpdateRatio",
    "save_denoiser", "HunyuanVideoFamily", "build_tiny_hunyuan_video_pipeline", "MochiFamily",
    "build_tiny_mochi_pipeline", "LTXVideoFamily", "build_tiny_ltx_video_pipeline",
]
