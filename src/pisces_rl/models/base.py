"""The policy: a diffusers text-to-video pipeline whose denoiser is trained, through a peft LoRA adapter
(``finetune="lora"``) or as a whole (``finetune="full"``, with a frozen copy of the base denoiser as reference).

Family-specific code (prompt encoding, latent shape, the denoiser call, VAE decode) lives behind the
small :class:`ModelFamily` protocol, one file per family (``models/wan.py``); everything else here is
family-agnostic. Shapes: latents ``[B, C, F, h, w]``, videos ``[B, F, C, H, W]`` in [0, 1], text
embeddings ``[B, L, D]``.
"""
from __future__ import annotations

import copy
import inspect
import logging
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint

from . import lora as _lora

__all__ = ["ModelFamily", "register_family", "get_family", "flow_match_schedule", "VideoPolicy", "build_policy",
           "resolve_dtype", "FINETUNE_MODES", "with_shift"]

FINETUNE_MODES = ("lora", "full")

logger = logging.getLogger(__name__)


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


def flow_match_schedule(scheduler: Any, num_steps: int, device: torch.device,
                        sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching ``(timesteps [T], sigmas [T+1])`` from a pipeline's scheduler, respecting its shift.

    ``sigmas`` (``[T]``, unshifted) is passed to ``set_timesteps(sigmas=...)`` as pipelines that choose their
    own grid do (e.g. ``HunyuanVideoPipeline``: ``np.linspace(1, 0, T + 1)[:-1]``); the scheduler shifts them
    and appends the terminal 0. ``None``: the scheduler's default grid for ``num_steps``.

    ``mu``: the exponent of a scheduler configured with ``use_dynamic_shifting`` (resolution-dependent shift,
    ``set_timesteps(mu=...)``; e.g. ``LTXPipeline`` computes it with ``calculate_shift`` from the video's token
    count); required by such a scheduler, ignored by others.

    A ``FlowMatchEulerDiscreteScheduler`` is used as configured. A multistep scheduler configured for
    flow sigmas (e.g. Wan checkpoints' ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)``) is
    replaced by ``FlowMatchEulerDiscreteScheduler(shift=s)``: the SDE sampler is an Euler-type method.
    The pipeline's own scheduler object is not modified.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sampling.num_inference_steps must be a positive integer, got {num_steps!r}")
    cfg = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    elif cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") == "flow_prediction":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                                shift=cfg.get("flow_shift", 1.0) or 1.0)
    else:
        raise ValueError(f"{type(scheduler).__name__} is not a flow-matching scheduler; the SDE sampler needs "
                         "FlowMatchEulerDiscreteScheduler (or a scheduler with use_flow_sigmas=True)")
    dynamic = bool(sched.config.get("use_dynamic_shifting", False))
    if sched.config.get("invert_sigmas", False) or (dynamic and mu is None):
        raise ValueError("schedulers with invert_sigmas, or with use_dynamic_shifting but no `mu` (the family must "
                         "compute it from the video size), are not supported; set a fixed `shift` in the scheduler "
                         "config")
    extra = {"mu": float(mu)} if dynamic else {}
    if sigmas is None:
        sched.set_timesteps(num_steps, device=device, **extra)
    else:
        sched.set_timesteps(sigmas=list(sigmas), device=device, **extra)
    return sched.timesteps.to(device, torch.float32), sched.sigmas.to(device, torch.float32)


def with_shift(scheduler: Any, shift: float) -> Any:
    """A copy of a flow-matching ``scheduler`` with its timestep shift set to ``shift`` (``shift`` of
    ``FlowMatchEulerDiscreteScheduler``, ``flow_shift`` of a scheduler configured with ``use_flow_sigmas``)."""
    cfg = scheduler.config
    key = "shift" if "shift" in cfg else "flow_shift" if "flow_shift" in cfg else None
    if key is None or not (shift > 0):
        raise ValueError(f"model.scheduler_shift={shift!r}: {type(scheduler).__name__} has no flow-matching shift "
                         "to set (or the value is not > 0); set model.scheduler_shift=null")
    return type(scheduler).from_config(cfg, **{key: float(shift)})


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of fp32, bf16, fp16; got {name!r}")
    return _DTYPES[name]


def _cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters/buffers to ``dtype`` in place, keeping the module's
    ``_keep_in_fp32_modules`` (e.g. Wan's time embedder and norms) in float32."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        target = torch.float32 if keep.intersection(name.split(".")) else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)


class VideoPolicy:
    """A diffusers T2V pipeline whose denoiser is trained by LoRA or in full.

    ``finetune="lora"`` (default): the base denoiser is frozen in ``dtype`` and carries a float32 peft LoRA
    adapter; the reference model (KL, teacher, "before" evaluation) is the same denoiser with the adapter
    disabled. ``finetune="full"``: every denoiser weight is trainable and kept in float32 (the master weights;
    under DeepSpeed ZeRO-2/3 the optimiser shards them and keeps its own float32 copy when the run is bf16);
    the reference model is a frozen copy of the base denoiser in ``dtype`` made before training
    (:attr:`reference`; one whole copy per process, also under ZeRO-3). ``lora_*`` arguments are ignored.

    Attributes:
        pipeline: the diffusers pipeline (with LoRA its ``transformer`` carries the ``"default"`` adapter).
        family: the :class:`ModelFamily` adapter.
        finetune: ``"lora"`` or ``"full"``.
        transformer: the trained denoiser (unwrapped module: save/load/disable go here).
        reference: ``finetune="full"`` only: the frozen base denoiser (``None`` with LoRA).
        denoiser: the callable used for forward passes; defaults to ``transformer``. A trainer may set it
            to the distributed wrapper of ``transformer`` (e.g. the module returned by ``accelerator.prepare``).
        dtype: dtype of the frozen weights (base transformer or reference copy) and text encoder (the VAE is
            kept in float32).
    """

    def __init__(self, pipeline: Any, family: ModelFamily, *, lora_rank: int = 8, lora_alpha: float = 8,
                 lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                 dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None,
                 gradient_checkpointing: bool = False, lora_path: Optional[str] = None, seed: int = 0,
                 finetune: str = "lora"):
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"model.finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
        if finetune == "full" and lora_path:
            raise ValueError("model.lora_path loads LoRA weights, but model.finetune=full trains the whole denoiser; "
                             "set model.lora_path=null (or model.finetune=lora)")
        family.validate(pipeline)
        self.pipeline = pipeline
        self.family = family
        self.finetune = finetune
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        for name in ("text_encoder", "text_encoder_2", "vae", "transformer"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
        if getattr(pipeline, "text_encoder", None) is not None:
            _cast_floating(pipeline.text_encoder, dtype)
        _cast_floating(pipeline.vae, torch.float32)
        self.transformer = family.denoiser(pipeline)
        _cast_floating(self.transformer, dtype)
        self.reference: Optional[torch.nn.Module] = None
        if finetune == "full":
            self.reference = copy.deepcopy(self.transformer).eval().to(self.device)
            _cast_floating(self.transformer, torch.float32)           # fp32 master weights
            self.transformer.requires_grad_(True)
        else:
            # LoRA is added before the move so its seeded init is the same whatever the device
            _lora.add_lora(self.transformer, lora_rank, lora_alpha, lora_target_modules, seed=seed)
        pipeline.to(self.device)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if lora_path:
            self.load_lora(lora_path)
        self.denoiser: Callable = self.transformer
        self._use_reference = False

    def set_training_module(self, module: Callable) -> None:
        """Route forward passes through ``module``, a distributed wrapper of :attr:`transformer` (e.g. the
        model returned by ``accelerator.prepare(policy.transformer)``) so gradient sync hooks run."""
        self.denoiser = module

    # ----------------------------------------------------------------- trained weights
    @property
    def weights_dirname(self) -> str:
        """Folder name of the trained weights in a run directory: ``"lora"`` or ``"transformer"`` (full)."""
        return "transformer" if self.finetune == "full" else "lora"

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """The trained parameters, float32, ``requires_grad=True``: the LoRA parameters (every base weight
        frozen), or with ``finetune="full"`` every denoiser parameter."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextmanager
    def lora_disabled(self) -> Iterator["VideoPolicy"]:
        """Inside the block the policy is the base model (the KL / teacher reference): the adapter is
        bypassed (LoRA) or forward passes go to the frozen :attr:`reference` copy (full); restored on exit."""
        if self.finetune == "full":
            previous, self._use_reference = self._use_reference, True
            try:
                yield self
            finally:
                self._use_reference = previous
            return
        with _lora.lora_disabled(self.transformer):
            yield self

    reference_model = lora_disabled  # the name that also reads right for full fine-tuning

    def lora_state_dict(self, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """peft-format LoRA weights, float32 on CPU (see :func:`pisces_rl.models.lora.lora_state_dict`)."""
        self._require_lora("lora_state_dict")
        return _lora.lora_state_dict(self.transformer, state_dict)

    def save_weights(self, save_directory: str, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                     is_main_process: bool = True) -> None:
        """Save what was trained: LoRA weights in diffusers format (``Pipeline.load_lora_weights(dir)``) or,
        with ``finetune="full"``, the whole denoiser in diffusers format (``<Transformer>.from_pretrained(dir)``,
        e.g. ``WanTransformer3DModel.from_pretrained(dir)``, or ``WanPipeline.from_pretrained(base,
        transformer=...)``).

        Args:
            state_dict: optional gathered state dict (ZeRO-3; or e.g. EMA weights): LoRA entries are extracted
                from it, or (full) it holds the denoiser's parameters.
        """
        if self.finetune == "full":
            if is_main_process:
                hook = getattr(self.family, "save_denoiser", None)
                if hook is not None:
                    hook(self.pipeline, self.transformer, save_directory, state_dict)
                else:
                    _lora.save_denoiser(self.transformer, save_directory, state_dict)
            return
        hook = getattr(self.family, "save_lora", None)
        if hook is not None:
            hook(self.pipeline, self.transformer, save_directory, state_dict, is_main_process)
        else:
            _lora.save_lora(type(self.pipeline), self.transformer, save_directory, state_dict, is_main_process)

    def save_lora(self, save_directory: str, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                  is_main_process: bool = True) -> None:
        """Save the LoRA weights in diffusers format: a plain ``Pipeline.load_lora_weights(dir)`` loads them.
        With ``finetune="full"`` this is :meth:`save_weights` (the whole denoiser).

        Args:
            state_dict: optional gathered full denoiser state dict (ZeRO-3); LoRA entries are extracted.
        """
        self.save_weights(save_directory, state_dict, is_main_process)

    def load_lora(self, directory: str) -> None:
        """Load LoRA weights written by :meth:`save_lora` into this policy (resume)."""
        self._require_lora("load_lora")
        hook = getattr(self.family, "load_lora", None)
        if hook is not None:
            hook(self.pipeline, self.transformer, directory)
        else:
            _lora.load_lora(type(self.pipeline), self.transformer, directory)

    def _require_lora(self, what: str) -> None:
        if self.finetune != "lora":
            raise ValueError(f"VideoPolicy.{what} needs LoRA, but model.finetune={self.finetune!r} trains the "
                             "whole denoiser (use save_weights / the saved 'transformer' folder)")

    # ------------------------------------------------------------ model calls
    @property
    def embedded_guidance(self) -> bool:
        """True for a guidance-distilled family (``family.guidance == "embedded"``): ``guidance_scale`` is an
        input of the one denoiser branch, never a second (negative-prompt) branch."""
        return getattr(self.family, "guidance", "cfg") == "embedded"

    def latent_shape(self, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        """``(B, C, F, h, w)``; raises ``ValueError`` for a frame count or size the family cannot produce."""
        return self.family.latent_shape(self.pipeline, batch_size, num_frames, height, width)

    def flow_schedule(self, num_steps: int, video_size: Optional[Tuple[int, int, int]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [T], sigmas [T+1])`` float32 on the policy device. ``video_size = (num_frames, height,
        width)`` reaches families whose schedule depends on it (their ``flow_schedule`` takes ``video_size``)."""
        if video_size is not None and "video_size" in inspect.signature(self.family.flow_schedule).parameters:
            return self.family.flow_schedule(self.pipeline, num_steps, self.device, video_size=tuple(video_size))
        return self.family.flow_schedule(self.pipeline, num_steps, self.device)

    def encode_prompts(self, prompts: List[str], negative_prompt: str = "", do_cfg: bool = False,
                       max_sequence_length: int = 512) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(prompt_embeds [B, L, D], negative_prompt_embeds [B, L, D] or None)`` in the policy dtype
        (``None`` always for an embedded-guidance family: it has no negative branch)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        do_cfg = do_cfg and not self.embedded_guidance
        return self.family.encode_prompts(self.pipeline, list(prompts), negative_prompt, do_cfg,
                                          max_sequence_length, self.device, self.dtype)

    def predict_velocity(self, latents: torch.Tensor, timestep: Union[float, torch.Tensor],
                         prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor] = None,
                         guidance_scale: float = 1.0) -> torch.Tensor:
        """Guided velocity ``v = v_u + g * (v_c - v_u)`` (plain ``v_c`` without CFG), float32. ``g`` is
        ``guidance_scale``, or per video where the family has ``guidance_scales`` (Wan 2.2 A14B's
        ``guidance_scale_2`` below its expert boundary). For an embedded-guidance family
        (:attr:`embedded_guidance`) one branch ``v_c(guidance=g)``; negative embeddings must then be None.

        Args:
            latents: ``[B, C, F, h, w]`` (any dtype; cast to the policy dtype for the denoiser).
            timestep: denoiser timestep, scalar or ``[B]`` (one per video).
            prompt_embeds / negative_prompt_embeds: ``[B, L, D]``; CFG runs when the negative embeddings
                are given and ``guidance_scale > 1``, as one denoiser call on the ``[2B]`` batch.
        Returns:
            ``[B, C, F, h, w]`` float32; differentiable w.r.t. the LoRA parameters under autograd.
        """
        b = latents.shape[0]
        t = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        denoiser, dtype = self.denoiser, self.dtype
        if self.finetune == "full":  # inputs in the dtype of the weights used (fp32 master, bf16 under DeepSpeed)
            module = self.reference if self._use_reference else self.transformer
            denoiser = self.reference if self._use_reference else self.denoiser
            dtype = getattr(module, "dtype", dtype)
            prompt_embeds = prompt_embeds.to(dtype)
            negative_prompt_embeds = None if negative_prompt_embeds is None else negative_prompt_embeds.to(dtype)
        x = latents.to(dtype)
        if self.embedded_guidance:
            if negative_prompt_embeds is not None:
                raise ValueError(f"model family {self.family.name!r} is guidance-distilled (embedded guidance): "
                                 "it has no negative branch; pass negative_prompt_embeds=None")
            return self.family.forward(self.pipeline, denoiser, x, t, prompt_embeds,
                                       guidance=float(guidance_scale)).float()
        if negative_prompt_embeds is not None and guidance_scale > 1.0:
            out = self.family.forward(self.pipeline, denoiser, torch.cat([x, x]), torch.cat([t, t]),
                                      torch.cat([negative_prompt_embeds, prompt_embeds]))
            uncond, cond = out.float().chunk(2)
            scales = getattr(self.family, "guidance_scales", None)
            scale = guidance_scale if scales is None else scales(self.pipeline, t, guidance_scale)
            if torch.is_tensor(scale):
                scale = scale.to(cond).view(-1, *([1] * (cond.dim() - 1)))
            return uncond + scale * (cond - uncond)
        return self.family.forward(self.pipeline, denoiser, x, t, prompt_embeds).float()

    def encode(self, videos: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
        """``[B, F, C, H, W]`` videos in [0, 1] -> ``[B, C, F, h, w]`` float32 latents (VAE posterior mean).

        ``chunk_size`` videos go through the VAE at a time (0 = all at once). Raises ``ValueError`` for a
        frame count or size :meth:`latent_shape` rejects, or a family without a VAE encoder.
        """
        if not hasattr(self.family, "encode"):
            raise ValueError(f"model family {self.family.name!r} has no `encode`; training on a video dataset needs "
                             "one (add `encode(pipe, videos)` to its ModelFamily) or use latents from generation")
        if videos.dim() != 5:
            raise ValueError(f"videos must be [B, F, C, H, W] in [0, 1], got shape {tuple(videos.shape)}")
        if chunk_size < 0:
            raise ValueError(f"encode chunk size must be >= 0, got {chunk_size}")
        b, f, _, h, w = videos.shape
        self.latent_shape(b, f, h, w)  # validates the frame count and size
        step = chunk_size or b
        return torch.cat([self.family.encode(self.pipeline, c).float() for c in videos.split(step)], dim=0)

    def decode(self, latents: torch.Tensor, chunk_size: int = 0, checkpoint: bool = False) -> torch.Tensor:
        """``[B, C, F, h, w]`` latents -> ``[B, F, C, H, W]`` float32 videos in [0, 1].

        ``chunk_size`` videos go through the VAE at a time (0 = all at once). Differentiable; wrap the
        call in ``torch.no_grad()`` when no gradient is needed. ``checkpoint=True`` (used when gradients are
        recorded) recomputes the decode during backward instead of storing its activations: one latent frame
        at a time with the family's ``decode_checkpointed`` if it has one, else one chunk at a time.
        """
        if chunk_size < 0:
            raise ValueError(f"decode chunk size must be >= 0, got {chunk_size}")
        step = chunk_size or latents.shape[0]

        def decode(chunk: torch.Tensor) -> torch.Tensor:
            if not (checkpoint and torch.is_grad_enabled()):
                return self.family.decode(self.pipeline, chunk)
            if hasattr(self.family, "decode_checkpointed"):
                return self.family.decode_checkpointed(self.pipeline, chunk)
            return torch.utils.checkpoint.checkpoint(self.family.decode, self.pipeline, chunk, use_reentrant=False)

        return torch.cat([decode(c).float() for c in latents.split(step)], dim=0)


def build_policy(model_cfg: Any, device: Optional[Union[str, torch.device]] = None) -> VideoPolicy:
    """Build the policy described by a ``ModelConfig``-like object (duck-typed attributes).

    ``model_cfg.pretrained == "tiny"`` builds the family's tiny random pipeline (seed ``model_cfg.seed``);
    anything else is a local directory or hub id loaded with ``from_pretrained`` (no download happens in
    offline environments: a missing path is an error). ``device`` defaults to CUDA when available. On CPU,
    half-precision ``model_cfg.dtype`` falls back to float32 (with a warning).
    """
    get = lambda name, default: getattr(model_cfg, name, default)  # noqa: E731
    family = get_family(get("family", "wan"), get("family_options", None))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(get("dtype", "fp32"))
    if dev.type == "cpu" and dtype != torch.float32:
        logger.warning("model.dtype=%s requested on CPU: keeping the base model in float32", get("dtype", "fp32"))
        dtype = torch.float32
    pretrained = get("pretrained", "tiny")
    if pretrained == "tiny":
        pipe = family.build_tiny_pipeline(seed=int(get("seed", 0)))
    else:
        from pisces_rl.registry import resolve_artifact

        pretrained = resolve_artifact("model", pretrained) or pretrained  # a world's name, e.g. 'shapes'
        pipe = family.load_pipeline(pretrained, torch_dtype=dtype)
    if get("scheduler_shift", None) is not None:  # e.g. DanceGRPO's HunyuanVideo runs: --shift 5 (checkpoint: 7)
        pipe.scheduler = with_shift(pipe.scheduler, get("scheduler_shift", None))
    finetune = get("finetune", "lora")
    if finetune == "full":
        logger.info("model.finetune=full: the whole denoiser is trained (model.lora_* are ignored)")
    return VideoPolicy(
        pipe, family, lora_rank=get("lora_rank", 8), lora_alpha=get("lora_alpha", 8),
        lora_target_modules=get("lora_target_modules", ("to_q", "to_k", "to_v", "to_out.0")), dtype=dtype,
        device=dev, gradient_checkpointing=bool(get("gradient_checkpointing", False)), lora_path=get("lora_path", None),
        seed=int(get("seed", 0)), finetune=finetune,
    )

