"""Wan text-to-video adapter (``diffusers.WanPipeline``): the only Wan-specific code of the policy.

One family, ``model.family=wan``, for every ``WanPipeline`` layout:

* Wan 2.1 T2V (one ``transformer``);
* Wan 2.2 TI2V-5B (one ``transformer``, ``expand_timesteps=True``: one timestep per latent token; the 48-channel
  VAE with ``patch_size=2``, 16x spatial compression). Text-to-video only: image conditioning (TI2V's first-frame
  latent) is not supported;
* Wan 2.2 A14B (``transformer`` for high noise, ``transformer_2`` for low noise, switched at ``boundary_ratio``):
  the trained module is :class:`~pisces_rl.models.wan22.WanExperts`. ``model.family_options``:
  ``experts`` (which experts get LoRA, default both) and ``guidance_scale_2`` (the low-noise expert's CFG scale,
  default ``sampling.guidance_scale``, as ``WanPipeline``'s ``guidance_scale_2=None``).
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple

import torch

from . import lora as _lora
from .family import register_family
from .family_utils import check_video_size, load_diffusers_pipeline
from .schedule import flow_match_schedule
from .tiny import build_tiny_wan22_pipeline, build_tiny_wan_pipeline
from .wan22 import (EXPERTS, WanExperts, fuse_experts_lora, load_experts_lora, save_experts_denoiser,
                    save_experts_lora)

__all__ = ["WanFamily"]


@register_family("wan")
class WanFamily:
    """:class:`~pisces_rl.models.family.ModelFamily` for ``WanPipeline`` (Wan 2.1 T2V, Wan 2.2 TI2V-5B and A14B).

    Latents are ``[B, z_dim, (F-1)/4 + 1, H/s, W/s]`` for ``F = 4k+1`` frames (``z_dim, s`` = 16, 8 for the
    Wan 2.1 VAE; 48, 16 for the Wan 2.2 VAE); the transformer predicts the flow velocity ``eps - x0`` directly;
    the VAE works on un-normalised latents (``z / latents_std + latents_mean``) and outputs ``[-1, 1]``.

    Args (``model.family_options``; only for two-expert Wan 2.2 pipelines):
        experts: the experts that are trained (LoRA or full), a subset of ``["transformer", "transformer_2"]``
            (high-, low-noise expert); default both.
        guidance_scale_2: CFG scale of the low-noise expert; ``None`` = ``sampling.guidance_scale``.
    """

    name = "wan"
    sde_type = "flow_grpo"  # sampling.sde_type=auto: Flow-GRPO's SDE noise (a rectified-flow model)

    def __init__(self, experts: Optional[Sequence[str]] = None, guidance_scale_2: Optional[float] = None):
        self.experts = None if experts is None else tuple(experts)
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)

    def build_tiny_pipeline(self, seed: int = 0, *, variant: str = "2.1", transformer_kwargs: Optional[dict] = None,
                            vae_kwargs: Optional[dict] = None, text_encoder_kwargs: Optional[dict] = None) -> Any:
        """The tiny test pipeline: ``variant`` ``"2.1"`` (one transformer), ``"a14b"`` (Wan 2.2, two experts) or
        ``"ti2v"`` (Wan 2.2 TI2V-5B layout); the ``*_kwargs`` override its configs (e.g. a published architecture
        with random weights, as ``benchmarks/gpu_families.py`` builds it): see :mod:`.tiny`."""
        kwargs = dict(transformer_kwargs=transformer_kwargs, vae_kwargs=vae_kwargs,
                      text_encoder_kwargs=text_encoder_kwargs)
        if variant == "2.1":
            return build_tiny_wan_pipeline(seed=seed, **kwargs)
        return build_tiny_wan22_pipeline(variant, seed=seed, **kwargs)

    def lora_load_code(self, lora: str, directory: Optional[str] = None) -> str:
        """Model-card lines that load the saved LoRA into ``pipe``: one call per expert file in ``directory``
        (Wan 2.2 A14B writes ``transformer_2``'s to its own file), else the single ``load_lora_weights``."""
        second = "pytorch_lora_weights_transformer_2.safetensors"
        lines = []
        if directory is None or os.path.exists(os.path.join(directory, "pytorch_lora_weights.safetensors")):
            lines.append(f'pipe.load_lora_weights("{lora}")')
        if directory is not None and os.path.exists(os.path.join(directory, second)):
            lines.append(f'pipe.load_lora_weights("{lora}", weight_name="{second}", load_into_transformer_2=True)')
        return "\n".join(lines) or f'pipe.load_lora_weights("{lora}")'

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        from diffusers import WanPipeline

        return load_diffusers_pipeline(WanPipeline, pretrained, torch_dtype, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")

    def validate(self, pipe: Any) -> None:
        from diffusers import WanPipeline

        if not isinstance(pipe, WanPipeline):
            raise ValueError(f"model.family='wan' needs a WanPipeline, got {type(pipe).__name__}; set model.family")
        two = getattr(pipe, "transformer_2", None) is not None
        if pipe.transformer is None:
            raise ValueError("this WanPipeline has no `transformer` (only transformer_2); the policy needs the "
                             "high-noise expert too: load the full Wan 2.2 checkpoint")
        if two and pipe.config.get("boundary_ratio") is None:
            raise ValueError("this WanPipeline has transformer_2 but no boundary_ratio, so WanPipeline would never "
                             "call transformer_2; set boundary_ratio in its model_index.json (A14B T2V: 0.875)")
        if not two and (self.experts is not None or self.guidance_scale_2 is not None):
            raise ValueError("model.family_options experts / guidance_scale_2 apply to two-expert Wan 2.2 pipelines "
                             "(transformer + transformer_2) only; this one has a single transformer: remove them")
        if two and pipe.config.get("expand_timesteps", False):
            raise ValueError("expand_timesteps with two experts is not a Wan 2.2 layout this adapter supports")

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        if getattr(pipe, "transformer_2", None) is None:
            return pipe.transformer
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        return WanExperts(pipe.transformer, pipe.transformer_2, boundary, self.experts or EXPERTS)

    def guidance_scales(self, pipe: Any, timestep: torch.Tensor, guidance_scale: float):
        """``guidance_scale``, or per video ``[B]`` with ``guidance_scale_2`` below the expert boundary
        (``WanPipeline.__call__``'s ``current_guidance_scale``)."""
        if self.guidance_scale_2 is None or getattr(pipe, "transformer_2", None) is None:
            return guidance_scale
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        high = torch.as_tensor(timestep).float() >= boundary
        return torch.where(high, float(guidance_scale), self.guidance_scale_2)

    def save_lora(self, pipe: Any, denoiser: torch.nn.Module, directory: str, state_dict: Any = None,
                  is_main_process: bool = True) -> None:
        if isinstance(denoiser, WanExperts):
            save_experts_lora(type(pipe), denoiser, directory, state_dict, is_main_process)
        else:
            _lora.save_lora(type(pipe), denoiser, directory, state_dict, is_main_process)

    def load_lora(self, pipe: Any, denoiser: torch.nn.Module, directory: str) -> None:
        if isinstance(denoiser, WanExperts):
            load_experts_lora(type(pipe), denoiser, directory)
        else:
            _lora.load_lora(type(pipe), denoiser, directory)

    def fuse_lora(self, pipe: Any, lora: str, lora_scale: float = 1.0) -> None:
        """Load a LoRA saved by the policy into the plain ``pipe`` and fuse it at ``lora_scale`` (every expert's file)."""
        if getattr(pipe, "transformer_2", None) is not None:
            fuse_experts_lora(pipe, lora, lora_scale)
            return
        pipe.load_lora_weights(lora)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()

    def save_denoiser(self, pipe: Any, denoiser: torch.nn.Module, directory: str, state_dict: Any = None) -> None:
        if isinstance(denoiser, WanExperts):
            save_experts_denoiser(denoiser, directory, state_dict)
        else:
            _lora.save_denoiser(denoiser, directory, state_dict)

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        _, ph, pw = pipe.transformer.config.patch_size
        check_video_size("Wan", num_frames, tf, height, width, (sf * ph, sf * pw))
        return (batch_size, pipe.transformer.config.in_channels, (num_frames - 1) // tf + 1, height // sf, width // sf)

    def flow_schedule(self, pipe: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return flow_match_schedule(pipe.scheduler, num_steps, device)

    def encode_prompts(self, pipe: Any, prompts: List[str], negative_prompt: str, do_cfg: bool,
                       max_sequence_length: int, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        pos, neg = pipe.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompt if do_cfg else None, do_classifier_free_guidance=do_cfg,
            max_sequence_length=max_sequence_length, device=device, dtype=dtype,
        )
        return pos, (neg if do_cfg else None)

    def forward(self, pipe: Any, denoiser: Any, latents: torch.Tensor, timestep: torch.Tensor,
                prompt_embeds: torch.Tensor) -> torch.Tensor:
        if pipe.config.get("expand_timesteps", False):  # Wan 2.2 TI2V: one timestep per latent token
            _, _, f, h, w = latents.shape
            _, ph, pw = pipe.transformer.config.patch_size
            timestep = timestep[:, None].expand(-1, f * (h // ph) * (w // pw))
        return denoiser(hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds,
                        return_dict=False)[0]

    def encode(self, pipe: Any, videos: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = (videos.permute(0, 2, 1, 3, 4) * 2 - 1).to(device=vae.device, dtype=vae.dtype)  # [B, C, F, H, W] in [-1, 1]
        moments = vae.encode(x, return_dict=False)[0].mode()                                # posterior mean
        mean, std = _latent_stats(vae, x)
        return (moments - mean) / std                                                       # inverse of decode's map

    def decode_checkpointed(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` for back-propagating through the VAE: same values, but the backward pass recomputes
        the decoder one latent frame (4 video frames) at a time, so the activations kept for it are one frame's
        instead of the whole video's. The causal convolutions' caches (the last two frames of each layer's input)
        are handed from one checkpointed segment to the next. VAE tiling, if enabled, is not used here."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
        from torch.utils.checkpoint import checkpoint

        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = _latent_stats(vae, z)
        x = vae.post_quant_conv(z * std + mean)
        vae.clear_cache()
        cache, frames = list(vae._feat_map), []
        for i in range(x.shape[2]):
            out, *cache = checkpoint(_decode_latent_frame, vae.decoder, x[:, :, i:i + 1], i == 0, *cache,
                                     use_reentrant=False)
            frames.append(out)
        vae.clear_cache()
        video = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        video = video.clamp(-1.0, 1.0)                                                      # as AutoencoderKLWan
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z_dim = vae.config.z_dim
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, z_dim, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, z_dim, 1, 1, 1)
        video = vae.decode(z * std + mean, return_dict=False)[0]  # [B, C, F, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def _latent_stats(vae: Any, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent ``(mean, std)``, each ``[1, z_dim, 1, 1, 1]`` on ``like``'s device/dtype."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def _decode_latent_frame(decoder: Any, x: torch.Tensor, first: bool, *cache: Any) -> tuple:
    """One latent frame through the causal decoder: ``(frames, *updated caches)`` (a checkpointed segment)."""
    cache = list(cache)
    out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
    return (out, *cache)
