"""HunyuanVideo text-to-video adapter (``diffusers.HunyuanVideoPipeline``): the only HunyuanVideo-specific code.

Mirrors diffusers 0.42.1 ``pipelines/hunyuan_video/pipeline_hunyuan_video.py`` (``HunyuanVideoPipeline.__call__``):

* **Embedded guidance.** HunyuanVideo-T2V is guidance-distilled: the scale is an input of the transformer,
  ``guidance = torch.tensor([g] * B, dtype=transformer_dtype) * 1000`` (step 6 of ``__call__``), one branch,
  no negative prompt. So ``guidance = "embedded"`` here and ``sampling.guidance_scale`` is that ``g`` (the
  pipeline's ``guidance_scale``, default 6.0). True CFG (``true_cfg_scale`` with a negative prompt, off by
  default in the pipeline) is not supported. DanceGRPO (``fastvideo/train_grpo_hunyuan.py``,
  ``run_sample_step`` and ``grpo_one_step``) feeds ``guidance=torch.tensor([6018.0], dtype=bfloat16)`` in
  rollouts and in training, which is 6016 in bfloat16, the value ``g = 6.0`` gives the pipeline in bfloat16.
* **Conditioning, packed.** The transformer needs the Llama hidden states ``[B, L, D]`` (``D = 4096``), their
  attention mask ``[B, L]`` and the CLIP pooled projection ``[B, P]`` (``P = 768``). The policy and ``Rollout``
  carry one ``[B, L, D]`` tensor per prompt (rows selected, concatenated, cast), so :meth:`encode_prompts`
  packs the three into one ``[B, 1 + L, W]`` tensor, ``W = max(D, P) + 1`` (:func:`pack_conditioning`)::

      packed[:, 0, :P]     = pooled CLIP projection      (row 0; the rest of row 0 is 0)
      packed[:, 1:, :D]    = Llama hidden states         (after the template's crop_start)
      packed[:, 1:, W - 1] = attention mask, 0 / 1       (exact in any float dtype)

  and :meth:`forward` unpacks it. Casting the packed tensor to the transformer dtype is what the pipeline does
  to each part (``prompt_embeds / prompt_attention_mask / pooled_prompt_embeds .to(transformer_dtype)``). The
  pooled projection as an extra first row is FastVideo's layout, used by DanceGRPO's ``hunyuan_hf`` transformer
  (``models/hunyuan_hf/modeling_hunyuan.py``: ``pooled_projections = encoder_hidden_states[:, 0, :768]``).
* **Schedule.** ``sigmas = np.linspace(1, 0, T + 1)[:-1]`` through ``FlowMatchEulerDiscreteScheduler`` (its
  ``shift``), terminal 0 appended: DanceGRPO's ``sd3_time_shift(shift, linspace(1, 0, T + 1))``.
* **Latents / VAE.** ``[B, 16, (F - 1)/4 + 1, H/8, W/8]``; decode ``vae.decode(z / scaling_factor)`` then
  ``(x / 2 + 0.5).clamp(0, 1)``; :meth:`encode` is the posterior mean times ``scaling_factor``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from .family import register_family
from .family_utils import check_video_size, load_diffusers_pipeline
from .schedule import flow_match_schedule
from .hunyuan_video_tiny import build_tiny_hunyuan_video_pipeline

__all__ = ["HunyuanVideoFamily", "pack_conditioning", "unpack_conditioning", "build_tiny_hunyuan_video_pipeline"]


def pack_conditioning(hidden: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``hidden [B, L, D]``, ``mask [B, L]`` (0/1), ``pooled [B, P]`` -> ``[B, 1 + L, max(D, P) + 1]`` in
    ``hidden``'s dtype (layout in the module docstring)."""
    b, seq, d = hidden.shape
    p = pooled.shape[-1]
    packed = hidden.new_zeros(b, 1 + seq, max(d, p) + 1)
    packed[:, 0, :p] = pooled.to(hidden.dtype)
    packed[:, 1:, :d] = hidden
    packed[:, 1:, -1] = mask.to(hidden.dtype)
    return packed


def unpack_conditioning(packed: torch.Tensor, text_dim: int, pooled_dim: int
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_conditioning`: ``(hidden [B, L, D], mask [B, L], pooled [B, P])``, all in
    ``packed``'s dtype (as the pipeline casts each to the transformer dtype)."""
    width = max(text_dim, pooled_dim) + 1
    if packed.ndim != 3 or packed.shape[-1] != width or packed.shape[1] < 2:
        raise ValueError(f"HunyuanVideo conditioning must be [B, 1 + L, {width}] (packed by "
                         f"HunyuanVideoFamily.encode_prompts), got {tuple(packed.shape)}")
    return packed[:, 1:, :text_dim], packed[:, 1:, -1], packed[:, 0, :pooled_dim]


@register_family("hunyuan_video")
class HunyuanVideoFamily:
    """:class:`~pisces_rl.models.family.ModelFamily` for ``HunyuanVideoPipeline`` (HunyuanVideo T2V).

    ``guidance = "embedded"``: see the module docstring. Prompt embeddings are packed ``[B, 1 + L, W]``.
    """

    name = "hunyuan_video"
    guidance = "embedded"

    def build_tiny_pipeline(self, seed: int = 0, **overrides: Any) -> Any:
        """The tiny test pipeline; ``overrides`` (``transformer_kwargs``, ``vae_kwargs``, ``text_encoder_kwargs``,
        ``text_encoder_2_kwargs``) go to :func:`.hunyuan_video_tiny.build_tiny_hunyuan_video_pipeline`."""
        return build_tiny_hunyuan_video_pipeline(seed=seed, **overrides)

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        from diffusers import HunyuanVideoPipeline

        pipe = load_diffusers_pipeline(HunyuanVideoPipeline, pretrained, torch_dtype,
                                       "hunyuanvideo-community/HunyuanVideo")
        pipe.vae.enable_tiling()  # as DanceGRPO's sample_reference_model and the diffusers example
        return pipe

    def validate(self, pipe: Any) -> None:
        from diffusers import HunyuanVideoPipeline

        if not isinstance(pipe, HunyuanVideoPipeline):
            raise ValueError(f"model.family='hunyuan_video' needs a HunyuanVideoPipeline, got {type(pipe).__name__}; "
                             "set model.family")
        cfg = pipe.transformer.config
        if not cfg.guidance_embeds:
            raise ValueError("this HunyuanVideo transformer has guidance_embeds=False (not guidance-distilled); the "
                             "adapter feeds sampling.guidance_scale as embedded guidance and has no CFG branch")
        if cfg.image_condition_type is not None:
            raise ValueError("image-to-video HunyuanVideo transformers (image_condition_type) are not supported; "
                             "use the text-to-video checkpoint")

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        cfg = pipe.transformer.config
        # HunyuanVideoPipeline.check_inputs: multiples of 16
        check_video_size("HunyuanVideo", num_frames, tf, height, width, max(16, sf * cfg.patch_size))
        return (batch_size, cfg.in_channels, (num_frames - 1) // tf + 1, height // sf, width // sf)

    def flow_schedule(self, pipe: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"sampling.num_inference_steps must be a positive integer, got {num_steps!r}")
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1]  # HunyuanVideoPipeline.__call__, step 4
        return flow_match_schedule(pipe.scheduler, num_steps, device, sigmas=sigmas)

    def encode_prompts(self, pipe: Any, prompts: List[str], negative_prompt: str, do_cfg: bool,
                       max_sequence_length: int, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(packed [B, 1 + L, W], None)``: ``pipe.encode_prompt`` with the pipeline's default template
        (``DEFAULT_PROMPT_TEMPLATE``, ``crop_start`` 95), packed by :func:`pack_conditioning`. ``L =
        max_sequence_length``. No negative branch (``do_cfg`` and ``negative_prompt`` are not used)."""
        with torch.no_grad():  # frozen text encoders
            hidden, pooled, mask = pipe.encode_prompt(prompt=prompts, device=device,
                                                      max_sequence_length=max_sequence_length)
        return pack_conditioning(hidden.to(dtype), mask, pooled).to(device), None

    def forward(self, pipe: Any, denoiser: Any, latents: torch.Tensor, timestep: torch.Tensor,
                prompt_embeds: torch.Tensor, guidance: float = 6.0) -> torch.Tensor:
        """One transformer call as in ``HunyuanVideoPipeline.__call__``: ``guidance`` (the embedded scale) is
        fed as ``tensor([guidance] * B, dtype=latents.dtype) * 1000``."""
        cfg = pipe.transformer.config
        hidden, mask, pooled = unpack_conditioning(prompt_embeds, cfg.text_embed_dim, cfg.pooled_projection_dim)
        b = latents.shape[0]
        g = torch.full((b,), float(guidance), dtype=latents.dtype, device=latents.device) * 1000.0
        return denoiser(hidden_states=latents, timestep=timestep, encoder_hidden_states=hidden,
                        encoder_attention_mask=mask, pooled_projections=pooled, guidance=g, return_dict=False)[0]

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        video = vae.decode(z, return_dict=False)[0]                      # [B, C, F, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)     # VideoProcessor.postprocess_video("pt")

    def encode(self, pipe: Any, videos: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = (videos.permute(0, 2, 1, 3, 4) * 2 - 1).to(device=vae.device, dtype=vae.dtype)  # [B, C, F, H, W]
        return vae.encode(x, return_dict=False)[0].mode() * vae.config.scaling_factor       # posterior mean

