"""Wan 2.1 text-to-video adapter (``diffusers.WanPipeline``): the only Wan-specific code of the policy."""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import torch

from .base import flow_match_schedule, register_family
from .tiny import build_tiny_wan_pipeline

__all__ = ["WanFamily"]


@register_family("wan")
class WanFamily:
    """:class:`~pisces_rl.models.base.ModelFamily` for ``WanPipeline`` (Wan 2.1 T2V, single transformer).

    Latents are ``[B, 16, (F-1)/4 + 1, H/8, W/8]`` for ``F = 4k+1`` frames; the transformer predicts the
    flow velocity ``eps - x0`` directly; the VAE works on un-normalised latents
    (``z / latents_std + latents_mean``) and outputs ``[-1, 1]``.
    """

    name = "wan"
    sde_type = "flow_grpo"  # sampling.sde_type=auto: Flow-GRPO's SDE noise (a rectified-flow model)

    def build_tiny_pipeline(self, seed: int = 0) -> Any:
        return build_tiny_wan_pipeline(seed=seed)

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        from diffusers import WanPipeline

        looks_local = os.path.isabs(pretrained) or pretrained.startswith((".", "~")) or pretrained.count("/") != 1
        if looks_local and not os.path.isdir(os.path.expanduser(pretrained)):
            raise FileNotFoundError(
                f"model.pretrained={pretrained!r} is not an existing directory; pass a local diffusers pipeline "
                "directory (with model_index.json), a hub id such as 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers', "
                "or 'tiny' for the in-code test model"
            )
        try:
            return WanPipeline.from_pretrained(os.path.expanduser(pretrained), dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load a WanPipeline from {pretrained!r} ({err}). Without network access the weights must "
                "already be on disk: download them elsewhere (`huggingface-cli download <id> --local-dir DIR`) and set "
                "model.pretrained=DIR"
            ) from err

    def validate(self, pipe: Any) -> None:
        from diffusers import WanPipeline

        if not isinstance(pipe, WanPipeline):
            raise ValueError(f"model.family='wan' needs a WanPipeline, got {type(pipe).__name__}; set model.family")
        if pipe.transformer is None or getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("two-stage Wan 2.2 pipelines (transformer_2 / boundary_ratio) are not supported; "
                             "use a single-transformer Wan 2.1 T2V checkpoint")

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        _, ph, pw = pipe.transformer.config.patch_size
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % tf:
            ok = [tf * k + 1 for k in range(1, 4)]
            raise ValueError(f"sampling.num_frames={num_frames!r} is invalid for Wan: it must be {tf}k+1 "
                             f"(e.g. {ok}); set sampling.num_frames to one of these")
        mh, mw = sf * ph, sf * pw
        if height < mh or width < mw or height % mh or width % mw:
            raise ValueError(f"sampling.height x width = {height} x {width} is invalid for Wan: both must be positive "
                             f"multiples of {mh} x {mw}")
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
