"""CogVideoX text-to-video adapter (``diffusers.CogVideoXPipeline``): the only CogVideoX-specific code of the policy.

CogVideoX is a VP (DDIM-family) model: the transformer predicts ``v`` (Salimans & Ho 2022) on
``z_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε`` with the CogVideoX ᾱ's (scaled-linear betas, SD3-style SNR shift
``snr_shift_scale``, zero terminal SNR). The policy works in flow coordinates (:mod:`pisces_rl.models.vp`): the
schedule is the DDIM grid's σ's and :meth:`CogVideoXFamily.forward` feeds the transformer
``z = flow_to_vp(x, ᾱ_t)`` and returns ``vp_velocity(v̂, z, ᾱ_t, "v_prediction")``. With η = 0 the flow Euler
step is the pipeline's ``CogVideoXDDIMScheduler.step`` (tested against ``pipe(...)``).

What follows diffusers 0.42.1 ``pipelines/cogvideo/pipeline_cogvideox.py`` (``CogVideoXPipeline.__call__``):

* latents: the pipeline's are ``[B, F, C, h, w]``; ours are ``[B, C, F, h, w]`` (permuted here, in ``forward``);
  ``F = (num_frames − 1) / 4 + 1`` latent frames, ``h, w = H / 8, W / 8``. ``num_frames`` must be ``8k + 1``
  (49 for CogVideoX 1.0, 81 for 1.5): ``AutoencoderKLCogVideoX._decode`` decodes latent frames in pairs after an
  odd first chunk, so only an odd ``F`` decodes back to ``4(F − 1) + 1 = num_frames`` frames (an even ``F``
  gives ``4F``);
* rotary position embeddings (``_prepare_rotary_positional_embeddings``) when the transformer has
  ``use_rotary_positional_embeddings`` (CogVideoX-5b, 1.5), recomputed for each latent size;
* CogVideoX 1.5 (``patch_size_t = 2``): the pipeline pads the latent frames at the front to a multiple of
  ``patch_size_t`` and drops the padding before decoding. With ``num_frames = 8k + 1`` (CogVideo's own fine-tuning
  requires it too: ``finetune/schemas/args.py``) ``F`` is odd and always padded by one frame: :meth:`latent_shape`
  includes the ``patch_size_t − 1`` padding frames, :meth:`decode` drops them, :meth:`encode` fills them with copies
  of the first latent frame (CogVideo ``finetune/models/cogvideox_t2v/lora_trainer.py``, ``compute_loss``);
* ``ofs`` embeddings (only CogVideoX1.5-5B-I2V has ``ofs_embed_dim``): passed as ``2.0``, as
  ``pipeline_cogvideox_image2video.py`` does; the T2V pipeline never passes them;
* VAE: ``decode`` divides by ``vae.config.scaling_factor`` (``decode_latents``); ``encode`` is the posterior
  mean times it (CogVideo ``encode_video`` uses a posterior sample);
* CFG: ``uncond + g·(cond − uncond)`` on the model output, one ``[2B]`` call (``VideoPolicy.predict_velocity``;
  ``vp_velocity`` is affine in the output, so guiding velocities is guiding ``v̂``). The pipeline's optional
  ``use_dynamic_cfg`` (a guidance scale that changes per step) is not supported: the guidance scale is constant,
  which is the pipeline's default;
* schedule: the checkpoints' ``timestep_spacing="trailing"`` over 1000 training steps is DDIM's own grid (each
  step's previous timestep is the next grid point) only for step counts dividing 1000 (4, 10, 20, 25, 50, ...);
  ``vp_flow_schedule`` refuses others. Zero terminal SNR (``rescale_betas_zero_snr``) puts the first step at
  σ = 1, so the sampler's N(0, I) start is the pipeline's initial latents;
* T5 prompts padded to ``max_sequence_length`` tokens: 226 for the real checkpoints. With the 2b's sin-cos
  position embeddings the text length must equal ``transformer.config.max_text_seq_length`` (an error says so).

Schedulers: ``CogVideoXDDIMScheduler`` (CogVideoX-2b) is sampled exactly as the pipeline does. The 5b's
``CogVideoXDPMScheduler`` is a second-order multistep solver; the sampler uses the DDIM (Euler) step on the same
ᾱ's and the same timesteps instead (one step, one transition density), so the 5b's samples differ from
``pipe(...)``'s. ``sde_type = "ddim"`` names the family's default noise type (DDPO's stochastic DDIM step).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from .family import register_family
from .family_utils import check_video_size, load_diffusers_pipeline
from .tiny import _seeded, build_tiny_tokenizer
from .vp import alpha_bar_at, flow_to_vp, vp_flow_schedule, vp_velocity

__all__ = ["CogVideoXFamily", "build_tiny_cogvideox_pipeline", "COGVIDEOX_2B_SCHEDULER"]

logger = logging.getLogger(__name__)

COGVIDEOX_2B_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
    steps_offset=0, timestep_spacing="trailing",
)
"""``THUDM/CogVideoX-2b`` ``scheduler/scheduler_config.json`` (``CogVideoXDDIMScheduler``); the 5b's differs in
``snr_shift_scale=1.0`` and its class (``CogVideoXDPMScheduler``)."""


def build_tiny_cogvideox_pipeline(seed: int = 0, *, version: str = "1.0",
                                  transformer_kwargs: Optional[Dict[str, Any]] = None,
                                  vae_kwargs: Optional[Dict[str, Any]] = None,
                                  text_encoder_kwargs: Optional[Dict[str, Any]] = None) -> Any:
    """A tiny random ``CogVideoXPipeline`` on CPU in float32, built in code (no downloads).

    Same classes as a real checkpoint: ``CogVideoXTransformer3DModel`` (1 block, width 32),
    ``AutoencoderKLCogVideoX`` (width 8, 4 latent channels, 4x temporal / 8x spatial compression; the 2b's
    ``scaling_factor``), a 2-layer ``T5EncoderModel`` (width 32) with the word-piece tokenizer of
    :func:`pisces_rl.models.tiny.build_tiny_tokenizer`, and ``CogVideoXDDIMScheduler`` with the 2b's config.
    Sizes follow diffusers' ``tests/pipelines/cogvideo/test_cogvideox.py`` (``get_dummy_components``).

    Args:
        seed: seeds every component (each built right after ``torch.manual_seed(seed)``, in a forked RNG).
        version: ``"1.0"``: CogVideoX-2b's layout (sin-cos position embeddings, text length 32);
            ``"1.5"``: CogVideoX 1.5's (rotary embeddings, ``patch_size_t=2``: ``num_frames = 8k + 1``).
        transformer_kwargs / vae_kwargs / text_encoder_kwargs: overrides of the transformer, VAE and ``T5Config``
            configs (e.g. a published architecture with random weights, as ``benchmarks/gpu_families.py`` builds
            it); the transformer's ``text_embed_dim`` follows the text encoder's ``d_model``.

    Returns:
        ``CogVideoXPipeline`` (progress bar off); ``H, W`` must be multiples of 16, text length 32.
    """
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    if version not in ("1.0", "1.5"):
        raise ValueError(f"version must be '1.0' or '1.5', got {version!r}")
    tokenizer = build_tiny_tokenizer()
    te_cfg = T5Config(**{**dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                                is_encoder_decoder=False, feed_forward_proj="gated-gelu"), **(text_encoder_kwargs or {})})
    tr_cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                  text_embed_dim=32, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=32)
    if version == "1.5":
        tr_cfg.update(patch_size_t=2, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
                      sample_frames=17)
    tr_cfg.update(transformer_kwargs or {})
    tr_cfg["text_embed_dim"] = te_cfg.d_model
    blocks = 4
    vae_cfg = dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * blocks,
                   up_block_types=("CogVideoXUpBlock3D",) * blocks, block_out_channels=(8,) * blocks,
                   latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
                   scaling_factor=1.15258426)
    vae_cfg.update(vae_kwargs or {})
    vae = _seeded(seed, lambda: AutoencoderKLCogVideoX(**vae_cfg))
    text_encoder = _seeded(seed, lambda: T5EncoderModel(te_cfg))
    transformer = _seeded(seed, lambda: CogVideoXTransformer3DModel(**tr_cfg))
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                             transformer=transformer.eval(),
                             scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_2B_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bfcf(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, h, w]`` <-> ``[B, F, C, h, w]`` (the same swap both ways)."""
    return latents.permute(0, 2, 1, 3, 4)


@register_family("cogvideox")
class CogVideoXFamily:
    """:class:`~pisces_rl.models.family.ModelFamily` for ``CogVideoXPipeline`` (CogVideoX 1.0 2b/5b, 1.5 T2V).

    Latents are ``[B, C, F, H/8, W/8]`` with ``F = (num_frames − 1)/4 + 1`` (+ 1 padding frame for 1.5); the
    transformer predicts ``v`` on VP latents (see the module docstring for the conversion).
    """

    name = "cogvideox"
    sde_type = "ddim"  # the family's default noise type: DDPO's stochastic DDIM step (VP model)

    def build_tiny_pipeline(self, seed: int = 0, **overrides: Any) -> Any:
        """The tiny test pipeline; ``overrides`` (``version``, ``transformer_kwargs``, ``vae_kwargs``,
        ``text_encoder_kwargs``) go to :func:`build_tiny_cogvideox_pipeline`."""
        return build_tiny_cogvideox_pipeline(seed=seed, **overrides)

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        from diffusers import CogVideoXPipeline

        return load_diffusers_pipeline(CogVideoXPipeline, pretrained, torch_dtype, "THUDM/CogVideoX-2b")

    def validate(self, pipe: Any) -> None:
        from diffusers import CogVideoXPipeline

        if not isinstance(pipe, CogVideoXPipeline):
            raise ValueError(f"model.family='cogvideox' needs a CogVideoXPipeline, got {type(pipe).__name__}; "
                             "set model.family")
        if not hasattr(pipe.scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(pipe.scheduler).__name__} is not a DDPM/DDIM-family scheduler; CogVideoX needs "
                             "CogVideoXDDIMScheduler or CogVideoXDPMScheduler")
        prediction = pipe.scheduler.config.get("prediction_type")
        if prediction not in ("v_prediction", "epsilon", "sample"):
            raise ValueError(f"unsupported scheduler prediction_type {prediction!r}")
        cfg = pipe.transformer.config
        if cfg.in_channels != pipe.vae.config.latent_channels:
            raise ValueError(f"the transformer takes {cfg.in_channels} channels but the VAE gives "
                             f"{pipe.vae.config.latent_channels}: an image-to-video checkpoint (e.g. CogVideoX-5b-I2V) "
                             "is not a text-to-video model; use a T2V checkpoint such as THUDM/CogVideoX-2b")

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    @staticmethod
    def _padding(pipe: Any) -> int:
        """Latent frames the pipeline prepends for CogVideoX 1.5 (``patch_size_t − 1``; 0 for 1.0)."""
        p_t = pipe.transformer.config.patch_size_t
        return 0 if p_t is None else p_t - 1

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        p, p_t = pipe.transformer.config.patch_size, pipe.transformer.config.patch_size_t
        check_video_size(
            "CogVideoX", num_frames, 2 * tf, height, width, sf * p,
            frames_note=f"; the checkpoints' 49 and 81: an odd number of latent frames, which the VAE decodes back to "
                        f"num_frames (it decodes an even count of F latent frames to {tf}F frames) and which "
                        f"CogVideoX 1.5 pads to a multiple of patch_size_t={p_t or 2}",
            size_note=f" (VAE factor {sf} x patch size {p})")
        frames = (num_frames - 1) // tf + 1 + self._padding(pipe)
        return (batch_size, pipe.transformer.config.in_channels, frames, height // sf, width // sf)

    def flow_schedule(self, pipe: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return vp_flow_schedule(_ddim_scheduler(pipe.scheduler), num_steps, device)

    def encode_prompts(self, pipe: Any, prompts: List[str], negative_prompt: str, do_cfg: bool,
                       max_sequence_length: int, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        cfg = pipe.transformer.config
        if max_sequence_length != cfg.max_text_seq_length:
            message = (f"sampling.max_sequence_length={max_sequence_length} but this CogVideoX transformer was "
                       f"trained on {cfg.max_text_seq_length} text tokens; set "
                       f"sampling.max_sequence_length={cfg.max_text_seq_length}")
            if not cfg.use_rotary_positional_embeddings:  # sin-cos positions: text + video must fill the table
                raise ValueError(message)
            logger.warning(message)
        pos, neg = pipe.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompt if do_cfg else None, do_classifier_free_guidance=do_cfg,
            max_sequence_length=max_sequence_length, device=device, dtype=dtype)
        return pos, (neg if do_cfg else None)

    def forward(self, pipe: Any, denoiser: Any, latents: torch.Tensor, timestep: torch.Tensor,
                prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Flow velocity at flow latents ``[B, C, F, h, w]``: ``vp_velocity`` of the transformer's prediction at
        ``z = flow_to_vp(x, ᾱ_t)`` (float32)."""
        cfg = pipe.transformer.config
        alpha_bar = alpha_bar_at(pipe.scheduler, timestep, latents)
        z = flow_to_vp(latents, alpha_bar)
        _, _, f, h, w = latents.shape
        rotary = None
        if cfg.use_rotary_positional_embeddings:
            sf = pipe.vae_scale_factor_spatial
            rotary = pipe._prepare_rotary_positional_embeddings(h * sf, w * sf, f, latents.device)
        extra = {"ofs": latents.new_full((1,), 2.0)} if cfg.get("ofs_embed_dim") else {}
        out = denoiser(hidden_states=_bfcf(z.to(latents.dtype)), encoder_hidden_states=prompt_embeds,
                       timestep=timestep, image_rotary_emb=rotary, return_dict=False, **extra)[0]
        return vp_velocity(_bfcf(out), z, alpha_bar, pipe.scheduler.config.prediction_type)

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents[:, :, self._padding(pipe):].to(device=vae.device, dtype=vae.dtype)  # drop 1.5's padding
        video = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]            # [B, C, F, H, W], [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def encode(self, pipe: Any, videos: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = (videos.permute(0, 2, 1, 3, 4) * 2 - 1).to(device=vae.device, dtype=vae.dtype)  # [B, C, F, H, W]
        latents = vae.encode(x, return_dict=False)[0].mode() * vae.config.scaling_factor   # posterior mean
        pad = self._padding(pipe)
        if pad:
            latents = torch.cat([latents[:, :, :1].expand(-1, -1, pad, -1, -1), latents], dim=2)
        return latents


def _ddim_scheduler(scheduler: Any) -> Any:
    """A ``CogVideoXDDIMScheduler`` with ``scheduler``'s config: the same ᾱ's (SNR shift, zero terminal SNR) for
    the 5b's ``CogVideoXDPMScheduler`` too (``vp_flow_schedule`` would otherwise fall back to a plain
    ``DDIMScheduler``, which has no ``snr_shift_scale``)."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler.from_config(scheduler.config)
