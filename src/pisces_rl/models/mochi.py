"""Mochi 1 text-to-video adapter (``diffusers.MochiPipeline``): the only Mochi-specific code.

Mirrors diffusers 0.42.1 ``pipelines/mochi/pipeline_mochi.py`` (``MochiPipeline.__call__``):

* **Schedule and time convention.** The pipeline builds ``sigmas = linear_quadratic_schedule(T, 0.025)``
  (1.0 down to near 0; genmo's ``infer.py``) and passes them to a ``FlowMatchEulerDiscreteScheduler`` that
  the checkpoint configures with ``invert_sigmas=True``: the scheduler shifts them (``shift``), then stores
  ``s = 1 - σ`` (0 up to 1, terminal 1 appended) and ``t = 1000 s``, and steps ``x += (s_next - s) * out``.
  So the transformer's timestep is ``1000 (1 - σ)`` and its output ``out`` is ``x0 - ε`` (the negative of this
  code base's velocity). Here :meth:`flow_schedule` returns the code base's convention, ``σ`` decreasing to 0
  and ``timesteps = 1000 σ`` (:func:`mochi_sigmas` with the same shift), and :meth:`forward` calls the
  transformer at ``1000 - timestep`` and returns ``-out = ε - x0 = dx/dσ``; the Euler steps are then the
  pipeline's (``σ_next - σ = -(s_next - s)``).
* **Prompt attention mask, packed.** T5 hidden states ``[B, L, D]`` and their mask ``[B, L]`` travel as one
  ``[B, L, D + 1]`` tensor (:func:`pack_conditioning`: the mask, 0/1, in the last column, exact in any float
  dtype), so ``Rollout`` row selection / cat / casts keep them together; :meth:`forward` unpacks it.
* **CFG** as the pipeline: one ``[2B]`` call, ``out_u + g (out_c - out_u)`` (linear, so it commutes with the
  sign flip), negative prompt ``""`` by default (``force_zeros_for_empty_prompt`` is honoured through
  ``pipe.encode_prompt``).
* **Latents / VAE.** ``[B, 12, (F - 1)/6 + 1, H/8, W/8]`` (``prepare_latents``; decoding gives ``6 (f - 1) + 1``
  frames, so ``F`` must be ``6k + 1``; the transformer's 2x2 patches need ``H, W`` multiples of 16). Decode:
  ``z * latents_std / scaling_factor + latents_mean`` (12 channel statistics of ``AutoencoderKLMochi``'s config),
  then ``(x / 2 + 0.5).clamp(0, 1)``; :meth:`encode` is the inverse applied to the posterior mean.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .family import register_family
from .family_utils import check_video_size, load_diffusers_pipeline, pack_mask_column, unpack_mask_column
from .tiny import _seeded, build_tiny_tokenizer

__all__ = ["MochiFamily", "build_tiny_mochi_pipeline", "mochi_sigmas", "pack_conditioning", "unpack_conditioning"]

THRESHOLD_NOISE = 0.025  # MochiPipeline.__call__, step 5 (genmo models/src/mochi_preview/infer.py)


pack_conditioning = pack_mask_column  # [B, L, D] + mask [B, L] -> [B, L, D + 1]


def unpack_conditioning(packed: torch.Tensor, text_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_conditioning`: ``(hidden [B, L, D], mask [B, L] bool)`` (the pipeline's bool mask)."""
    hidden, mask = unpack_mask_column(packed, text_dim, "Mochi")
    return hidden, mask > 0.5


def mochi_sigmas(scheduler: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [T] = 1000 σ, sigmas [T+1])``, σ from 1 down to 0 (float32): the pipeline's
    ``linear_quadratic_schedule(T, 0.025)`` shifted by ``scheduler``'s ``shift``, before the inversion the
    ``invert_sigmas=True`` scheduler applies (``1 - σ``, see the module docstring), terminal 0 appended."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"sampling.num_inference_steps must be an integer >= 2 for Mochi (its linear-quadratic "
                         f"schedule), got {num_steps!r}")
    cfg = scheduler.config
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or cfg.get("use_dynamic_shifting", False):
        raise ValueError(f"Mochi needs a FlowMatchEulerDiscreteScheduler without dynamic shifting, got "
                         f"{type(scheduler).__name__}; set the pipeline's scheduler")
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg, invert_sigmas=False)
    sched.set_timesteps(sigmas=list(linear_quadratic_schedule(num_steps, THRESHOLD_NOISE)), device=device)
    return sched.timesteps.to(device, torch.float32), sched.sigmas.to(device, torch.float32)


def build_tiny_mochi_pipeline(seed: int = 0, *, transformer_kwargs: Optional[Dict[str, Any]] = None,
                              vae_kwargs: Optional[Dict[str, Any]] = None,
                              text_encoder_kwargs: Optional[Dict[str, Any]] = None):
    """A tiny random ``MochiPipeline`` (CPU, float32), each component seeded with ``seed`` in a forked RNG.

    The transformer and VAE are diffusers' ``tests/pipelines/mochi/test_mochi.py`` ``get_dummy_components``
    (2 layers, 2 heads x 8, 12 latent channels; VAE widths 32), the text encoder a 2-layer ``T5EncoderModel``
    (width 32) with the in-code tokenizer of :mod:`.tiny`; the scheduler ``FlowMatchEulerDiscreteScheduler(
    invert_sigmas=True)`` as genmo/mochi-1-preview's ``scheduler_config.json``. ``transformer_kwargs`` /
    ``vae_kwargs`` / ``text_encoder_kwargs`` (``T5Config``) override these (e.g. the published architecture with
    random weights, ``benchmarks/gpu_families.py``); the transformer's ``text_embed_dim`` follows ``d_model``.

    Returns ``diffusers.MochiPipeline`` with its progress bar disabled; ``num_frames = 6k+1`` at ``H x W``
    (multiples of 16) gives latents ``[B, 12, k+1, H/8, W/8]``.
    """
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_tokenizer(model_max_length=256)
    te_cfg = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    te_cfg.update(text_encoder_kwargs or {})
    tr_cfg = dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                  in_channels=12, out_channels=None, qk_norm="rms_norm", time_embed_dim=4, activation_fn="swiglu",
                  max_sequence_length=16)
    tr_cfg.update(transformer_kwargs or {})
    tr_cfg["text_embed_dim"] = te_cfg["d_model"]
    vae_cfg = dict(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                   decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))
    vae_cfg.update(vae_kwargs or {})
    transformer = _seeded(seed, lambda: MochiTransformer3DModel(**tr_cfg))
    vae = _seeded(seed, lambda: AutoencoderKLMochi(**vae_cfg))
    text_encoder = _seeded(seed, lambda: T5EncoderModel(T5Config(**te_cfg)))
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=vae.eval(),
                         text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@register_family("mochi")
class MochiFamily:
    """:class:`~pisces_rl.models.family.ModelFamily` for ``MochiPipeline`` (Mochi 1). Prompt embeddings are packed
    ``[B, L, D + 1]`` (mask in the last column); see the module docstring for the time convention."""

    name = "mochi"
    sde_type = "flow_grpo"

    def build_tiny_pipeline(self, seed: int = 0, **overrides: Any) -> Any:
        """:func:`build_tiny_mochi_pipeline` (``transformer_kwargs`` / ``vae_kwargs`` / ``text_encoder_kwargs``)."""
        return build_tiny_mochi_pipeline(seed=seed, **overrides)

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        from diffusers import MochiPipeline

        pipe = load_diffusers_pipeline(MochiPipeline, pretrained, torch_dtype, "genmo/mochi-1-preview")
        pipe.vae.enable_tiling()  # as the diffusers Mochi docs recommend for memory
        return pipe

    def validate(self, pipe: Any) -> None:
        from diffusers import MochiPipeline

        if not isinstance(pipe, MochiPipeline):
            raise ValueError(f"model.family='mochi' needs a MochiPipeline, got {type(pipe).__name__}; set model.family")
        if not pipe.scheduler.config.get("invert_sigmas", False):
            raise ValueError("this MochiPipeline's scheduler has invert_sigmas=False; Mochi's transformer is trained "
                             "with the inverted time (genmo/mochi-1-preview: invert_sigmas=true), and the adapter "
                             "assumes it (timestep 1000 (1 - σ), output x0 - ε)")

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        tf, sf = pipe.vae_temporal_scale_factor, pipe.vae_spatial_scale_factor
        check_video_size("Mochi", num_frames, tf, height, width, sf * pipe.transformer.config.patch_size,
                         frames_note="; the VAE decodes 6(f-1)+1 frames", size_note=" (8x VAE, 2x2 patches)")
        return (batch_size, pipe.transformer.config.in_channels, (num_frames - 1) // tf + 1, height // sf, width // sf)

    def flow_schedule(self, pipe: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return mochi_sigmas(pipe.scheduler, num_steps, device)

    def encode_prompts(self, pipe: Any, prompts: List[str], negative_prompt: str, do_cfg: bool,
                       max_sequence_length: int, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(packed [B, L, D + 1], packed negative or None)``: ``pipe.encode_prompt`` (T5, padded to
        ``L = max_sequence_length``) with each mask packed by :func:`pack_conditioning`."""
        with torch.no_grad():  # frozen text encoder
            hidden, mask, neg, neg_mask = pipe.encode_prompt(
                prompt=prompts, negative_prompt=negative_prompt, do_classifier_free_guidance=do_cfg,
                max_sequence_length=max_sequence_length, device=device)
        pos = pack_conditioning(hidden.to(dtype), mask).to(device)
        return pos, (pack_conditioning(neg.to(dtype), neg_mask).to(device) if do_cfg else None)

    def forward(self, pipe: Any, denoiser: Any, latents: torch.Tensor, timestep: torch.Tensor,
                prompt_embeds: torch.Tensor) -> torch.Tensor:
        """``ε - x0 = -transformer(x, 1000 - timestep)`` (``timestep = 1000 σ``; module docstring)."""
        hidden, mask = unpack_conditioning(prompt_embeds, pipe.transformer.config.text_embed_dim)
        t = (pipe.scheduler.config.num_train_timesteps - timestep).to(latents.dtype)
        out = denoiser(hidden_states=latents, encoder_hidden_states=hidden, timestep=t,
                       encoder_attention_mask=mask, return_dict=False)[0]
        return -out

    def _stats(self, vae: Any, like: torch.Tensor) -> Tuple[Any, Any]:
        cfg, c = vae.config, like.shape[1]
        if cfg.latents_mean is None or cfg.latents_std is None:
            return 0.0, 1.0
        mean = torch.tensor(cfg.latents_mean).view(1, c, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, c, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = self._stats(vae, z)
        z = z * std / vae.config.scaling_factor + mean                   # MochiPipeline.__call__, after the loop
        video = vae.decode(z, return_dict=False)[0]                      # [B, C, F, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)     # VideoProcessor.postprocess_video("pt")

    def encode(self, pipe: Any, videos: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = (videos.permute(0, 2, 1, 3, 4) * 2 - 1).to(device=vae.device, dtype=vae.dtype)  # [B, C, F, H, W]
        z = vae.encode(x, return_dict=False)[0].mode()                                       # posterior mean
        mean, std = self._stats(vae, z)
        return (z - mean) * vae.config.scaling_factor / std
