"""Wan 2.2 A14B: the two denoising experts as the policy's one trained module, and their LoRA files.

Wan2.2-T2V-A14B (``WanPipeline`` with ``transformer`` and ``transformer_2``) denoises the high-noise steps with
``transformer`` and the low-noise steps with ``transformer_2``. The rule is diffusers'
``pipelines/wan/pipeline_wan.py`` (``WanPipeline.__call__``)::

    boundary_timestep = boundary_ratio * scheduler.config.num_train_timesteps
    t >= boundary_timestep  ->  transformer      (guidance_scale)
    t <  boundary_timestep  ->  transformer_2    (guidance_scale_2; None = guidance_scale)

:class:`WanExperts` holds both experts as submodules (no copies: the pipeline's own modules), so LoRA, the
optimiser, ``accelerate.prepare``, gradient checkpointing and checkpoints see one ``nn.Module``. Its forward
routes each video of the batch by its own timestep (GRPO batches mix steps). LoRA goes on the experts named
in ``model.family_options.experts`` (default: both); the other expert stays frozen and adapter-free.

Saved LoRA layout (diffusers ``WanLoraLoaderMixin``; one file per trained expert, each with
``transformer.``-prefixed keys and the adapter config as metadata)::

    pytorch_lora_weights.safetensors                 # transformer (high noise)
    pytorch_lora_weights_transformer_2.safetensors   # transformer_2 (low noise)

loaded into a plain pipeline with::

    pipe.load_lora_weights(dir)                                                     # if transformer was trained
    pipe.load_lora_weights(dir, weight_name="pytorch_lora_weights_transformer_2.safetensors",
                           load_into_transformer_2=True)                            # if transformer_2 was trained
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Sequence

import torch

from . import lora as _lora

__all__ = ["WanExperts", "EXPERTS", "LORA_WEIGHT_NAMES", "save_experts_lora", "load_experts_lora",
           "save_experts_denoiser", "fuse_experts_lora"]

EXPERTS = ("transformer", "transformer_2")
LORA_WEIGHT_NAMES = {"transformer": "pytorch_lora_weights.safetensors",
                     "transformer_2": "pytorch_lora_weights_transformer_2.safetensors"}


class WanExperts(torch.nn.Module):
    """``transformer`` (t >= boundary) and ``transformer_2`` (t < boundary) behind one forward.

    Args:
        transformer / transformer_2: the pipeline's ``WanTransformer3DModel`` experts.
        boundary_timestep: ``boundary_ratio * num_train_timesteps``.
        trained: the experts that receive the LoRA adapter (``add_adapter``) or, with full fine-tuning,
            gradients (``requires_grad_(True)``).

    Besides ``forward`` it offers the few ``diffusers.ModelMixin`` / peft methods the policy calls
    (``add_adapter``, ``peft_config``, ``disable_adapters``, ``enable_adapters``,
    ``enable_gradient_checkpointing``, ``dtype``), applied to the trained experts.
    """

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_timestep: float,
                 trained: Sequence[str] = EXPERTS):
        super().__init__()
        unknown = sorted(set(trained) - set(EXPERTS))
        if unknown or not trained:
            raise ValueError(f"model.family_options.experts={list(trained)} must be a non-empty subset of "
                             f"{list(EXPERTS)} (transformer = high-noise expert, transformer_2 = low-noise expert)")
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)
        self.trained = tuple(e for e in EXPERTS if e in trained)
        self._keep_in_fp32_modules = list(getattr(transformer, "_keep_in_fp32_modules", None) or [])

    def experts(self) -> Dict[str, torch.nn.Module]:
        """``{name: expert}`` of the trained experts."""
        return {name: getattr(self, name) for name in self.trained}

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool, True where ``transformer`` (high noise) denoises. ``timestep`` is ``[B]`` or, with
        ``expand_timesteps``, ``[B, L]`` (one value per video)."""
        t = timestep if timestep.ndim == 1 else timestep[:, 0]
        return t >= self.boundary_timestep

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs: Any):
        """``hidden_states [B, C, F, h, w]``, ``timestep [B]`` -> ``(velocity [B, C, F, h, w],)``: each video goes
        through the expert its timestep selects (one call per expert present in the batch)."""
        high = self.route(timestep)
        call = dict(return_dict=False, **kwargs)
        if bool(high.all()) or not bool(high.any()):
            name = "transformer" if bool(high.all()) else "transformer_2"
            out = getattr(self, name)(hidden_states=hidden_states, timestep=timestep,
                                      encoder_hidden_states=encoder_hidden_states, **call)[0]
            return (self._touch_idle(out, name),)
        outs, order = [], []
        for expert, rows in ((self.transformer, high.nonzero().flatten()),
                             (self.transformer_2, (~high).nonzero().flatten())):
            outs.append(expert(hidden_states=hidden_states[rows], timestep=timestep[rows],
                               encoder_hidden_states=encoder_hidden_states[rows], **call)[0])
            order.append(rows)
        return (torch.cat(outs)[torch.argsort(torch.cat(order))],)

    def _touch_idle(self, out: torch.Tensor, used: str) -> torch.Tensor:
        """Under autograd, ``out + 0 * (one element of each trainable parameter of the idle expert)``: the value is
        unchanged, the idle expert's trainable parameters get a zero gradient instead of none, so a loss on steps
        that only the frozen expert denoises still back-propagates (``experts: [transformer_2]``) and DDP sees
        every parameter used. (Those steps add nothing to the update; ``sampling.sde_window`` keeps the trained
        steps on the trained expert's side of the boundary.)"""
        idle = [p for name in self.trained if name != used for p in getattr(self, name).parameters()
                if p.requires_grad and not hasattr(p, "ds_id")]        # ZeRO-3 partitions: no unused-parameter check
        if not torch.is_grad_enabled() or not idle:
            return out
        touch = torch.stack([p.reshape(-1)[:1].sum().float() for p in idle]).sum()
        return out + (0.0 * touch).to(out.dtype)

    # ---------------------------------------------------------------- what VideoPolicy / models.lora call
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def peft_config(self) -> Dict[str, Any]:
        """The adapter config (the same on every trained expert)."""
        return getattr(self, self.trained[0]).peft_config

    def add_adapter(self, config: Any, adapter_name: str = _lora.ADAPTER_NAME) -> None:
        for expert in self.experts().values():
            expert.add_adapter(copy.deepcopy(config), adapter_name=adapter_name)

    def disable_adapters(self) -> None:
        for expert in self.experts().values():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.experts().values():
            expert.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        for expert in (self.transformer, self.transformer_2):
            expert.enable_gradient_checkpointing()

    def requires_grad_(self, requires_grad: bool = True) -> "WanExperts":
        """Freezing freezes both experts; unfreezing (full fine-tuning) only the trained ones."""
        for name in EXPERTS:
            getattr(self, name).requires_grad_(requires_grad and name in self.trained)
        return self


def _expert_state(state_dict: Optional[Dict[str, torch.Tensor]], name: str) -> Optional[Dict[str, torch.Tensor]]:
    """The entries of a (gathered, possibly ``module.``-prefixed) :class:`WanExperts` state dict that belong to
    expert ``name``, with the ``<name>.`` prefix removed."""
    if state_dict is None:
        return None
    prefix = name + "."
    stripped = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    return {k[len(prefix):]: v for k, v in stripped.items() if k.startswith(prefix)}


def save_experts_lora(pipeline_cls: Any, experts: WanExperts, directory: str,
                      state_dict: Optional[Dict[str, torch.Tensor]] = None, is_main_process: bool = True) -> None:
    """One diffusers LoRA file per trained expert (:data:`LORA_WEIGHT_NAMES`), see the module docstring."""
    for name, expert in experts.experts().items():
        _lora.save_lora(pipeline_cls, expert, directory, _expert_state(state_dict, name), is_main_process,
                        weight_name=LORA_WEIGHT_NAMES[name])


def load_experts_lora(pipeline_cls: Any, experts: WanExperts, directory: str) -> None:
    """Resume: load every trained expert's file written by :func:`save_experts_lora`."""
    for name, expert in experts.experts().items():
        path = os.path.join(directory, LORA_WEIGHT_NAMES[name])
        if os.path.isdir(directory) and not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} is missing: the LoRA in {directory!r} was not trained on expert {name!r}; "
                                    f"set model.family_options.experts to the experts it holds")
        _lora.load_lora(pipeline_cls, expert, directory, weight_name=LORA_WEIGHT_NAMES[name])


def save_experts_denoiser(experts: WanExperts, directory: str,
                          state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Full fine-tuning: each trained expert in diffusers format under ``directory/<expert>``, e.g.
    ``WanPipeline.from_pretrained(base, transformer_2=WanTransformer3DModel.from_pretrained(dir + "/transformer_2"))``."""
    for name, expert in experts.experts().items():
        _lora.save_denoiser(expert, os.path.join(directory, name), _expert_state(state_dict, name))


def fuse_experts_lora(pipe: Any, lora: str, lora_scale: float = 1.0) -> None:
    """Load each expert's file of ``lora`` (a folder written by :func:`save_experts_lora`, or a hub id) into the plain
    two-expert ``pipe`` with ``load_lora_weights`` and fuse both at ``lora_scale`` (``pisces-rl generate``).

    A local folder loads the files it has; from a hub id both files are tried and a missing one is skipped."""
    local = os.path.isdir(lora)
    loaded = []
    for name, weight_name in LORA_WEIGHT_NAMES.items():
        if local and not os.path.exists(os.path.join(lora, weight_name)):
            continue
        try:
            pipe.load_lora_weights(lora, weight_name=weight_name, adapter_name=f"pisces_{name}",
                                   load_into_transformer_2=name == "transformer_2")
        except OSError:
            if local:
                raise
            continue
        loaded.append(name)
    if not loaded:
        raise FileNotFoundError(f"{lora!r} holds none of {sorted(LORA_WEIGHT_NAMES.values())}; pass the lora/ folder "
                                "of a Wan 2.2 A14B run")
    pipe.fuse_lora(lora_scale=lora_scale, components=loaded)
    pipe.unload_lora_weights()
