"""The :class:`ModelFamily` protocol and the family registry: ``model.family = name`` -> an adapter instance.

One file per family (``models/wan.py``, ...) implements the protocol and registers itself with
:func:`register_family`; :class:`~pisces_rl.models.base.VideoPolicy` calls only these methods. Shapes: latents
``[B, C, F, h, w]``, videos ``[B, F, C, H, W]`` in [0, 1], text embeddings ``[B, L, D]``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch

__all__ = ["ModelFamily", "register_family", "get_family"]


class ModelFamily(Protocol):
    """What the policy needs from a pipeline family. Implementations are stateless.

    ``guidance`` (optional class attribute, default ``"cfg"``) says what ``sampling.guidance_scale`` means:
    ``"cfg"``: classifier-free guidance, two denoiser branches ``v_u + g (v_c - v_u)`` when ``g > 1``;
    ``"embedded"``: a guidance-distilled denoiser (e.g. HunyuanVideo) that takes the scale as an input: one
    branch, no negative prompt, and the policy calls ``forward(..., guidance=g)``.
    """

    name: str
    sde_type: str
    """The noise type ``sampling.sde_type = "auto"`` samples with (:data:`pisces_rl.rollout.SDE_TYPES`):
    ``"flow_grpo"`` for rectified-flow models, ``"ddim"`` (DDPO) for ε/v-prediction families. Optional: a
    family without it gets ``"flow_grpo"``."""

    def build_tiny_pipeline(self, seed: int) -> Any:
        """A tiny random pipeline built in code (for tests and the embedded default). Families should also take
        keyword-only ``transformer_kwargs`` / ``vae_kwargs`` / ``text_encoder_kwargs`` (dicts overriding the tiny
        configs of the denoiser, VAE and text encoder): ``benchmarks/gpu_families.py`` builds the published
        architectures with random weights through them."""

    def load_pipeline(self, pretrained: str, torch_dtype: torch.dtype) -> Any:
        """``<Pipeline>.from_pretrained`` with a clear error for a missing path."""

    def validate(self, pipe: Any) -> None:
        """Raise ``ValueError`` if ``pipe`` is a configuration the adapter does not support."""

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        """The module that receives the LoRA adapter (e.g. ``pipe.transformer``)."""

    def latent_shape(self, pipe: Any, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        """``(B, C, F, h, w)`` for a video of ``num_frames`` x ``height`` x ``width``; validates the size."""

    def flow_schedule(self, pipe: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [T], sigmas [T+1])`` of the flow-matching schedule, float32. A family whose schedule
        depends on the video size (e.g. LTX-Video's resolution-dependent shift) also takes the keyword
        ``video_size=(num_frames, height, width)``; :meth:`VideoPolicy.flow_schedule` passes it when given."""

    def encode_prompts(self, pipe: Any, prompts: List[str], negative_prompt: str, do_cfg: bool,
                       max_sequence_length: int, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(prompt_embeds [B, L, D], negative_prompt_embeds [B, L, D] or None)``."""

    def forward(self, pipe: Any, denoiser: Callable, latents: torch.Tensor, timestep: torch.Tensor,
                prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One denoiser call: ``latents [B, C, F, h, w]`` (denoiser dtype), ``timestep [B]`` -> velocity
        ``dx/dsigma = eps - x0`` ``[B, C, F, h, w]``. A ``guidance = "embedded"`` family also takes
        ``guidance: float`` (the embedded guidance scale) as a keyword argument."""

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, h, w]`` latents -> ``[B, F, C, H, W]`` videos in [0, 1] (differentiable)."""

    def encode(self, pipe: Any, videos: torch.Tensor) -> torch.Tensor:
        """``[B, F, C, H, W]`` videos in [0, 1] -> ``[B, C, F, h, w]`` latents (the VAE posterior mean in the
        denoiser's latent space, so that ``decode(encode(v))`` reconstructs ``v``). Optional: only training on
        a dataset of videos needs it."""

    def initial_latents(self, pipe: Any, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Optional: the pipeline's initial noise ``[B, C, F, h, w]`` (what ``pipe(latents=noise)`` starts from) as the
        flow latent at the schedule's first level ``sigma``. Absent = the noise itself (flow models start at σ = 1);
        a VP family returns ``vp_to_flow(noise, ᾱ_0)`` (:mod:`pisces_rl.models.vp`)."""

    def decode_checkpointed(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Optional: :meth:`decode`, recomputed piecewise (e.g. per latent frame) in backward to save memory."""

    # Optional hooks (looked up with getattr; absent = the generic behaviour):
    # guidance_scales(pipe, timestep [B], guidance_scale) -> float or [B] tensor: the CFG scale per video (Wan 2.2
    #     A14B: guidance_scale_2 below its expert boundary);
    # save_lora(pipe, denoiser, dir, state_dict, is_main_process) / load_lora(pipe, denoiser, dir) /
    # save_denoiser(pipe, denoiser, dir, state_dict): the saved layout when the trained module is not one diffusers
    #     model (Wan 2.2 A14B: one LoRA file or folder per expert);
    # fuse_lora(pipe, lora, lora_scale): load a saved LoRA into a plain pipeline and fuse it (`pisces-rl generate`).


_FAMILIES: Dict[str, Callable[[], ModelFamily]] = {}


def register_family(name: str):
    """Class decorator: make a :class:`ModelFamily` available as ``model.family = name``."""
    def wrap(cls):
        _FAMILIES[name] = cls
        return cls
    return wrap


def get_family(name: str, options: Optional[Dict[str, Any]] = None) -> ModelFamily:
    """The registered family ``name`` (an instance), built with ``model.family_options`` as keyword arguments."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown model.family {name!r}; available: {sorted(_FAMILIES)} "
                         "(a new family is one file models/<family>.py registering a ModelFamily)")
    cls = _FAMILIES[name]
    options = dict(options or {})
    try:
        accepted = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepted = {}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"model.family_options {unknown} are not options of model.family={name!r}; it accepts "
                         f"{sorted(accepted) or 'none'}")
    return cls(**options)
