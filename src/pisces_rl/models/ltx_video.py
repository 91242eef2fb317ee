"""LTX-Video text-to-video adapter (``diffusers.LTXPipeline``): the only LTX-specific code.

Mirrors diffusers 0.42.1 ``pipelines/ltx/pipeline_ltx.py`` (``LTXPipeline.__call__``):

* **Packed latents.** The transformer sees tokens ``[B, F*h*w, C]`` (``LTXPipeline._pack_latents`` with the
  transformer's ``patch_size`` / ``patch_size_t``, 1 / 1 for LTX-Video); the protocol keeps ``[B, C, F, h, w]``
  and :meth:`LTXVideoFamily.forward` packs before and unpacks after the call (``_unpack_latents``), passing the
  latent ``num_frames / height / width`` and ``rope_interpolation_scale = (tf / frame_rate, sf, sf)`` (step 6 of
  ``__call__``; ``frame_rate`` is a family option, the pipeline's default 25). Note that ``pipe(latents=...)``
  takes the *packed* noise: ``LTXPipeline._pack_latents(x, 1, 1)``.
* **Prompt mask.** T5 embeddings ``[B, L, D]`` (``max_sequence_length``, the pipeline's default 128) and their
  attention mask ``[B, L]``, which the transformer takes as ``encoder_attention_mask``. The policy and ``Rollout``
  carry one ``[B, L, D]`` tensor per prompt, so :meth:`encode_prompts` appends the mask as a last column:
  ``[B, L, D + 1]`` (0 / 1, exact in any float dtype; :func:`pack_prompt`), and :meth:`forward` splits it off.
* **Schedule.** ``sigmas = np.linspace(1, 1 / T, T)`` and ``mu = calculate_shift(F' * h * w, base_image_seq_len,
  max_image_seq_len, base_shift, max_shift)`` (``F' h w`` = latent frames x height x width) through the
  checkpoint's ``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting`` (and ``shift_terminal``), terminal
  0 appended (step 5 of ``__call__``). The size reaches :meth:`flow_schedule` as ``video_size``.
* **Latents / VAE.** ``[B, 128, (F - 1)/8 + 1, H/32, W/32]`` for LTX-Video (``F = 8k + 1``, ``H, W`` multiples of
  32, ``check_inputs``). Decode: ``_denormalize_latents`` (``z * latents_std / scaling_factor + latents_mean``),
  ``vae.decode(z, timestep)`` with ``timestep = decode_timestep`` for a timestep-conditioned decoder (0.9.1+), then
  ``(x / 2 + 0.5).clamp(0, 1)``. Decode noise is not supported: the adapter decodes what
  ``pipe(decode_timestep=t, decode_noise_scale=0)`` decodes; with the pipeline defaults (``decode_timestep=0``,
  ``decode_noise_scale=None`` -> 0) that is the plain ``pipe(...)``. :meth:`encode` is the posterior mean,
  ``_normalize_latents``.
* **CFG.** Ordinary two-branch CFG (``guidance_scale``, default 3); ``guidance_rescale`` (default 0) is not
  supported.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from .family import register_family
from .family_utils import check_video_size, load_diffusers_pipeline, pack_mask_column, unpack_mask_column
from .schedule import flow_match_schedule
from .tiny import _seeded, build_tiny_tokenizer

__all__ = ["LTXVideoFamily", "build_tiny_ltx_video_pipeline", "pack_prompt", "unpack_prompt"]


pack_prompt = pack_mask_column  # embeds [B, L, D] + mask [B, L] -> [B, L, D + 1]


def unpack_prompt(packed: torch.Tensor, text_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_prompt`: ``(embeds [B, L, D], mask [B, L])`` in ``packed``'s dtype."""
    return unpack_mask_column(packed, text_dim, "LTX-Video")


@register_family("ltx_video")
class LTXVideoFamily:
    """:class:`~pisces_rl.models.family.ModelFamily` for ``LTXPipeline`` (LTX-Video T2V).

    Options (``model.family_options``): ``frame_rate`` (the pipeline's ``frame_rate``, 25: RoPE interpolation)
    and ``decode_timestep`` (the pipeline's ``decode_timestep``, 0; only for a timestep-conditioned VAE, decoded
    without noise). Prompt embeddings are ``[B, L, D + 1]`` (mask column).
    """

    name = "ltx_video"
    sde_type = "flow_grpo"

    def __init__(self, frame_rate: float = 25, decode_timestep: float = 0.0):
        if not frame_rate > 0:
            raise ValueError(f"model.family_options.frame_rate must be > 0, got {frame_rate!r}")
        self.frame_rate, self.decode_timestep = float(frame_rate), float(decode_timestep)

    def build_tiny_pipeline(self, seed: int = 0, **overrides: Any) -> Any:
        return build_tiny_ltx_video_pipeline(seed=seed, **overrides)

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        from diffusers import LTXPipeline

        return load_diffusers_pipeline(LTXPipeline, pretrained, torch_dtype, "Lightricks/LTX-Video")

    def validate(self, pipe: Any) -> None:
        from diffusers import LTXPipeline

        if not isinstance(pipe, LTXPipeline):
            raise ValueError(f"model.family='ltx_video' needs an LTXPipeline, got {type(pipe).__name__}; "
                             "set model.family")

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        tf, sf = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        check_video_size("LTX-Video", num_frames, tf, height, width, max(32, sf))  # LTXPipeline.check_inputs: 32
        return (batch_size, pipe.transformer.config.in_channels, (num_frames - 1) // tf + 1, height // sf, width // sf)

    def flow_schedule(self, pipe: Any, num_steps: int, device: torch.device,
                      video_size: Optional[Tuple[int, int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``LTXPipeline.__call__`` step 5: ``linspace(1, 1/T, T)`` shifted with ``mu`` of the video's latent
        token count (``video_size = (num_frames, height, width)``, needed by a ``use_dynamic_shifting``
        scheduler, as the checkpoint's)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"sampling.num_inference_steps must be a positive integer, got {num_steps!r}")
        mu = None
        if video_size is not None:
            from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

            _, _, f, h, w = self.latent_shape(pipe, 1, *video_size)
            c = pipe.scheduler.config  # as LTXPipeline.__call__ step 5
            mu = calculate_shift(f * h * w, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        elif pipe.scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError("LTX-Video's schedule depends on the video size (dynamic shift): call "
                             "policy.flow_schedule(num_steps, video_size=(num_frames, height, width))")
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        timesteps, sigmas = flow_match_schedule(pipe.scheduler, num_steps, device, sigmas=sigmas, mu=mu)
        if not torch.isfinite(sigmas).all():
            raise ValueError(f"the dynamic shift (mu={mu}) of a {video_size} video gives non-finite sigmas "
                             "(too many latent tokens for the scheduler's max_image_seq_len); use a smaller video")
        return timesteps, sigmas

    def encode_prompts(self, pipe: Any, prompts: List[str], negative_prompt: str, do_cfg: bool,
                       max_sequence_length: int, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(packed [B, L, D + 1], negative [B, L, D + 1] or None)``: ``pipe.encode_prompt`` (T5, ``L =
        max_sequence_length``) with the attention mask as the last column (:func:`pack_prompt`)."""
        with torch.no_grad():  # frozen text encoder
            embeds, mask, neg, neg_mask = pipe.encode_prompt(
                prompt=prompts, negative_prompt=[negative_prompt] * len(prompts) if do_cfg else None,
                do_classifier_free_guidance=do_cfg, max_sequence_length=max_sequence_length, device=device)
        packed = pack_prompt(embeds.to(dtype), mask).to(device)
        return packed, (pack_prompt(neg.to(dtype), neg_mask).to(device) if do_cfg else None)

    def forward(self, pipe: Any, denoiser: Any, latents: torch.Tensor, timestep: torch.Tensor,
                prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One transformer call as in ``LTXPipeline.__call__`` step 7, on packed tokens; ``[B, C, F, h, w]``."""
        cfg = pipe.transformer.config
        hidden, mask = unpack_prompt(prompt_embeds, cfg.caption_channels)
        _, _, f, h, w = latents.shape
        ps, pt = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        tf, sf = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        out = denoiser(hidden_states=pipe._pack_latents(latents, ps, pt), encoder_hidden_states=hidden,
                       timestep=timestep, encoder_attention_mask=mask, num_frames=f, height=h, width=w,
                       rope_interpolation_scale=(tf / self.frame_rate, sf, sf), return_dict=False)[0]
        return pipe._unpack_latents(out, f, h, w, ps, pt)

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = pipe._denormalize_latents(latents.to(device=vae.device), vae.latents_mean, vae.latents_std,
                                      vae.config.scaling_factor).to(vae.dtype)
        t = None
        if vae.config.timestep_conditioning:
            t = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
        video = vae.decode(z, t, return_dict=False)[0]                    # [B, C, F, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)      # VideoProcessor.postprocess_video("pt")

    def encode(self, pipe: Any, videos: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = (videos.permute(0, 2, 1, 3, 4) * 2 - 1).to(device=vae.device, dtype=vae.dtype)  # [B, C, F, H, W]
        z = vae.encode(x, return_dict=False)[0].mode()                                     # posterior mean
        return pipe._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)


def build_tiny_ltx_video_pipeline(seed: int = 0, *, transformer_kwargs: Optional[dict] = None,
                                  vae_kwargs: Optional[dict] = None, text_encoder_kwargs: Optional[dict] = None,
                                  scheduler_kwargs: Optional[dict] = None):
    """A tiny random ``LTXPipeline`` on CPU in float32, built in code (no downloads), every component seeded with
    ``seed`` in a forked RNG.

    Sizes from diffusers' ``tests/pipelines/ltx/test_ltx.py`` ``get_dummy_components`` (1-layer transformer, width
    32, 8 latent channels; VAE width 8) but with three VAE down/up-samplings, so that frames are ``8k+1`` and the
    spatial factor 8; a 2-layer ``T5EncoderModel`` (width 32) with the in-code T5-style tokenizer
    (``models/tiny.py``, ``model_max_length`` 128 as ``convert_ltx_to_diffusers.py``); the checkpoint's scheduler
    (``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)``, from that script). ``transformer_kwargs``
    / ``vae_kwargs`` / ``text_encoder_kwargs`` (``T5Config``) / ``scheduler_kwargs`` override them (e.g. a published
    architecture with random weights, ``benchmarks/gpu_families.py``); the transformer's ``caption_channels``
    follows the text encoder's ``d_model``.

    Returns:
        ``diffusers.LTXPipeline`` (progress bar off). Latents for ``num_frames = 8k+1`` at ``H x W`` (multiples of
        32) are ``[B, 8, k+1, H/8, W/8]``.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_tokenizer(model_max_length=128)
    te_cfg = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                  is_encoder_decoder=False, feed_forward_proj="gated-gelu")
    te_cfg.update(text_encoder_kwargs or {})
    tr_cfg = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                  attention_head_dim=8, cross_attention_dim=32, num_layers=1)
    tr_cfg.update(transformer_kwargs or {})
    tr_cfg["caption_channels"] = te_cfg["d_model"]
    vae_cfg = dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                   spatio_temporal_scaling=(True, True, True, False),
                   decoder_spatio_temporal_scaling=(True, True, True, False),
                   layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                   patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae_cfg.update(vae_kwargs or {})
    sched_cfg = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                     max_image_seq_len=4096, shift_terminal=0.1)
    sched_cfg.update(scheduler_kwargs or {})
    if tr_cfg["in_channels"] != vae_cfg["latent_channels"]:
        raise ValueError(f"transformer in_channels={tr_cfg['in_channels']} must equal the VAE "
                         f"latent_channels={vae_cfg['latent_channels']}; override both together")
    transformer = _seeded(seed, lambda: LTXVideoTransformer3DModel(**tr_cfg))
    vae = _seeded(seed, lambda: AutoencoderKLLTXVideo(**vae_cfg))
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    text_encoder = _seeded(seed, lambda: T5EncoderModel(T5Config(**te_cfg)))
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**sched_cfg), vae=vae.eval(),
                       text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe
