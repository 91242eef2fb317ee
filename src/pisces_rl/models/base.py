"""The policy: a diffusers text-to-video pipeline whose denoiser is trained, through a peft LoRA adapter
(``finetune="lora"``) or as a whole (``finetune="full"``, with a frozen copy of the base denoiser as reference).

Family-specific code (prompt encoding, latent shape, the denoiser call, VAE decode) lives behind the
small :class:`ModelFamily` protocol (``models/family.py``), one file per family (``models/wan.py``); everything else here is
family-agnostic. Shapes: latents ``[B, C, F, h, w]``, videos ``[B, F, C, H, W]`` in [0, 1], text
embeddings ``[B, L, D]``.
"""
from __future__ import annotations

import copy
import inspect
import logging
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint

from . import lora as _lora
from .family import ModelFamily, get_family, register_family
from .schedule import flow_match_schedule, with_shift

__all__ = ["ModelFamily", "register_family", "get_family", "flow_match_schedule", "VideoPolicy", "build_policy",
           "resolve_dtype", "FINETUNE_MODES", "with_shift"]

FINETUNE_MODES = ("lora", "full")

logger = logging.getLogger(__name__)


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

