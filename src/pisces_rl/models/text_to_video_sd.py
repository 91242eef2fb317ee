"""ModelScope text-to-video adapter (``diffusers.TextToVideoSDPipeline``): an ε-prediction ``UNet3DConditionModel``,
a 2D ``AutoencoderKL`` applied per frame, a CLIP text encoder and a DDIM scheduler. The real checkpoint is
``damo-vilab/text-to-video-ms-1.7b`` (the stand-in for the paper's VideoCrafter2, a UNet ε-model of the same kind).

The UNet is a VP (DDPM/DDIM) model; the policy works in flow coordinates (:mod:`pisces_rl.models.vp`):

* schedule: :func:`~pisces_rl.models.vp.vp_flow_schedule` of the pipeline's scheduler (DDIM's grid), with the
  last level set to σ = 0: the last step is DDIM to ᾱ' = 1, i.e. it lands on the predicted x̂0, like every noise
  type of :mod:`pisces_rl.rollout.sde`. (With ``set_alpha_to_one=True`` that is DDIMScheduler's own last step;
  with ``set_alpha_to_one=False`` diffusers' loop stops at ``alphas_cumprod[0]``, σ ≈ 0.03 on SD's betas, and
  decodes that latent with its leftover noise; ours decodes x̂0.)
* forward: ``z = flow_to_vp(x, ᾱ_t)``, ``out = unet(z, t, prompt_embeds)``, velocity
  ``vp_velocity(out, z, ᾱ_t, scheduler.prediction_type)``; CFG on velocities equals the pipeline's CFG on ε
  (the map is affine in ``out``).
* initial latents: the pipeline's ``randn × init_noise_sigma`` is ``z_T``; the flow latent is ``z_T / (sqrt(ᾱ_T) +
  sqrt(1 − ᾱ_T))`` (:meth:`initial_latents`), so ``sample_rollout`` and ``pipe(...)`` start from the same state.
* noise type for ``sampling.sde_type = "auto"``: ``"ddim"`` (DDPO).
* latents ``[B, 4, F, H/8, W/8]`` (the VAE's ``scaling_factor`` applied); ``decode`` / ``encode`` run the VAE per
  frame, as ``TextToVideoSDPipeline.decode_latents``.

LoRA: diffusers 0.42's ``UNet3DConditionModel`` has no ``PeftAdapterMixin`` (no ``add_adapter`` and no
``load_lora_adapter``, so even a plain ``TextToVideoSDPipeline.load_lora_weights`` fails with an AttributeError).
:func:`enable_unet_lora` gives the pipeline's UNet that mix-in (same class name and config, so ``save_pretrained``
is unchanged); call it on a plain pipeline before ``pipe.load_lora_weights(dir)`` to load a saved adapter.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from .family import register_family
from .family_utils import load_diffusers_pipeline
from .vp import PREDICTION_TYPES, alpha_bar_at, alpha_bar_from_sigma, flow_to_vp, vp_flow_schedule, vp_to_flow, vp_velocity

__all__ = ["TextToVideoSDFamily", "build_tiny_text_to_video_sd_pipeline", "enable_unet_lora"]


def _peft_unet_class() -> type:
    """``UNet3DConditionModel`` with ``PeftAdapterMixin``, defined once: its ``__name__`` stays
    ``"UNet3DConditionModel"`` (ConfigMixin writes it as ``_class_name``, so ``save_pretrained`` output loads with the
    plain class) and its ``__qualname__`` names it in this module (picklable)."""
    global _PeftUNet3D
    if _PeftUNet3D is None:
        from diffusers import UNet3DConditionModel
        from diffusers.loaders.peft import PeftAdapterMixin

        _PeftUNet3D = type("UNet3DConditionModel", (UNet3DConditionModel, PeftAdapterMixin),
                           {"__module__": __name__, "__qualname__": "_PeftUNet3D"})
    return _PeftUNet3D


_PeftUNet3D = None


def enable_unet_lora(pipe: Any) -> Any:
    """Give ``pipe.unet`` (a ``UNet3DConditionModel``) diffusers' ``PeftAdapterMixin`` in place, so that
    ``add_adapter`` / ``pipe.load_lora_weights`` work; returns ``pipe``. A no-op if it already has it."""
    from diffusers import UNet3DConditionModel
    from diffusers.loaders.peft import PeftAdapterMixin

    unet = pipe.unet
    if not isinstance(unet, PeftAdapterMixin):
        if type(unet) is not UNet3DConditionModel:
            raise ValueError(f"pipe.unet is a {type(unet).__name__}, expected a UNet3DConditionModel")
        unet.__class__ = _peft_unet_class()
    return pipe


def build_tiny_text_to_video_sd_pipeline(seed: int = 0, *, transformer_kwargs: Optional[dict] = None,
                                        vae_kwargs: Optional[dict] = None,
                                        text_encoder_kwargs: Optional[dict] = None) -> Any:
    """A tiny random ``TextToVideoSDPipeline`` built in code (sizes of diffusers' own
    ``tests/pipelines/text_to_video_synthesis/test_text_to_video.py`` ``get_dummy_components``: UNet channels (4, 8),
    one layer per block, a one-block VAE (no spatial downsampling), a 2-layer CLIP text encoder), with the word-piece
    tokenizer of :func:`~pisces_rl.models.tiny.build_tiny_tokenizer` (77 tokens) and a width-16 text encoder.
    Scheduler: SD's DDIM betas with ``set_alpha_to_one=True`` (so diffusers' loop also ends on x̂0).
    ``transformer_kwargs`` (the UNet's) / ``vae_kwargs`` / ``text_encoder_kwargs`` (``CLIPTextConfig``) override the
    tiny configs (e.g. a published architecture with random weights, as ``benchmarks/gpu_families.py`` builds it);
    the UNet's ``cross_attention_dim`` follows the text encoder's width."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import _seeded, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(model_max_length=77)
    te_cfg = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_size=16, intermediate_size=32, layer_norm_eps=1e-5,
                  num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77,
                  hidden_act="gelu", projection_dim=16, **(text_encoder_kwargs or {}))
    unet_cfg = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=4, norm_num_groups=2)
    unet_cfg.update(transformer_kwargs or {})
    unet_cfg["cross_attention_dim"] = te_cfg["hidden_size"]
    vae_cfg = dict(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                   up_block_types=["UpDecoderBlock2D"], latent_channels=4, sample_size=32, norm_num_groups=2)
    vae_cfg.update(vae_kwargs or {})
    unet = _seeded(seed, lambda: UNet3DConditionModel(**unet_cfg))
    vae = _seeded(seed, lambda: AutoencoderKL(**vae_cfg))
    text_encoder = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**te_cfg)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@register_family("text_to_video_sd")
class TextToVideoSDFamily:
    """:class:`~pisces_rl.models.family.ModelFamily` for ``TextToVideoSDPipeline`` (ModelScope T2V, ε-prediction UNet)."""

    name = "text_to_video_sd"
    sde_type = "ddim"  # sampling.sde_type=auto: DDPO's stochastic DDIM step (rollout/ddim.py)

    def build_tiny_pipeline(self, seed: int = 0, **overrides: Any) -> Any:
        """The tiny test pipeline; ``overrides`` go to :func:`build_tiny_text_to_video_sd_pipeline`."""
        return build_tiny_text_to_video_sd_pipeline(seed=seed, **overrides)

    def lora_load_code(self, lora: str, directory: Optional[str] = None) -> str:
        """Model-card lines: diffusers 0.42's ``UNet3DConditionModel`` has no LoRA loader until
        :func:`enable_unet_lora` gives it one."""
        return ("from pisces_rl.models.text_to_video_sd import enable_unet_lora\n\n"
                f'enable_unet_lora(pipe)\npipe.load_lora_weights("{lora}")')

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        from diffusers import TextToVideoSDPipeline

        return load_diffusers_pipeline(TextToVideoSDPipeline, pretrained, torch_dtype,
                                       "damo-vilab/text-to-video-ms-1.7b")

    def validate(self, pipe: Any) -> None:
        from diffusers import TextToVideoSDPipeline

        if not isinstance(pipe, TextToVideoSDPipeline):
            raise ValueError(f"model.family='text_to_video_sd' needs a TextToVideoSDPipeline, got "
                             f"{type(pipe).__name__}; set model.family")
        cfg = pipe.scheduler.config
        if not hasattr(pipe.scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(pipe.scheduler).__name__} is not a DDPM/DDIM-family scheduler; load the pipeline "
                             "with its DDIMScheduler (pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config))")
        if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
            raise ValueError("scheduler clip_sample / thresholding clip x̂0, which the flow-coordinate sampler does not "
                             "do (the step would no longer be DDIM's); set clip_sample=False and thresholding=False in "
                             "the scheduler config")
        if cfg.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type={cfg.get('prediction_type')!r} is not one of {PREDICTION_TYPES}")
        if cfg.get("rescale_betas_zero_snr", False) and cfg.get("prediction_type", "epsilon") == "epsilon":
            raise ValueError("rescale_betas_zero_snr gives alpha_bar = 0 at the first step, where an epsilon-prediction "
                             "model cannot predict x0; use a v_prediction checkpoint or rescale_betas_zero_snr=False")

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return enable_unet_lora(pipe).unet

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        vsf = pipe.vae_scale_factor
        m = vsf * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"sampling.num_frames must be a positive integer, got {num_frames!r}")
        if height < m or width < m or height % m or width % m:
            raise ValueError(f"sampling.height x width = {height} x {width} is invalid for this TextToVideoSD model: "
                             f"both must be positive multiples of {m} (VAE factor {vsf} x UNet downsampling)")
        return (batch_size, pipe.unet.config.in_channels, num_frames, height // vsf, width // vsf)

    def flow_schedule(self, pipe: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        timesteps, sigmas = vp_flow_schedule(pipe.scheduler, num_steps, device)
        sigmas[-1] = 0.0  # the last step lands on x̂0 (module docstring)
        return timesteps, sigmas

    def initial_latents(self, pipe: Any, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        z = noise.float() * float(pipe.scheduler.init_noise_sigma)                     # pipe.prepare_latents
        return vp_to_flow(z, alpha_bar_from_sigma(torch.as_tensor(sigma, device=z.device)))

    def encode_prompts(self, pipe: Any, prompts: List[str], negative_prompt: str, do_cfg: bool,
                       max_sequence_length: int, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """CLIP's last hidden states ``[B, 77, D]`` (the tokenizer's fixed length; ``max_sequence_length`` is unused),
        and the negative prompt's (the pipeline's ``encode_prompt``; an empty negative prompt = ``""``)."""
        negative = [negative_prompt] * len(prompts) if do_cfg else None
        pos, neg = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompt=negative)
        return pos.to(dtype), (neg.to(dtype) if do_cfg else None)

    def forward(self, pipe: Any, denoiser: Any, latents: torch.Tensor, timestep: torch.Tensor,
                prompt_embeds: torch.Tensor) -> torch.Tensor:
        alpha_bar = alpha_bar_at(pipe.scheduler, timestep, latents)                   # [B, 1, 1, 1, 1]
        z = flow_to_vp(latents, alpha_bar)
        out = denoiser(z.to(latents.dtype), timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        return vp_velocity(out, z, alpha_bar, pipe.scheduler.config.get("prediction_type", "epsilon"))

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        b, c, f, h, w = latents.shape
        z = (latents / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
        frames = vae.decode(z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), return_dict=False)[0]
        video = frames.reshape(b, f, *frames.shape[1:])                                 # [B, F, C, H, W] in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, pipe: Any, videos: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        b, f = videos.shape[:2]
        x = (videos.reshape(b * f, *videos.shape[2:]) * 2 - 1).to(device=vae.device, dtype=vae.dtype)
        z = vae.encode(x, return_dict=False)[0].mode() * vae.config.scaling_factor      # posterior mean
        return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)
