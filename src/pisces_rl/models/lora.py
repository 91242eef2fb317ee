"""peft LoRA on a diffusers denoiser: add, extract, save in diffusers format, load, disable.

The recipe is the one of the diffusers LoRA training scripts: freeze the base model,
``model.add_adapter(LoraConfig(..., init_lora_weights="gaussian"))`` (A ~ N(0, 1/r), B = 0, so the
initial policy equals the base model), upcast the trainable parameters to float32, and save only the
LoRA weights with ``<Pipeline>.save_lora_weights`` so that a plain ``pipe.load_lora_weights(dir)``
restores them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence

import torch

__all__ = ["add_lora", "lora_state_dict", "save_lora", "load_lora", "lora_disabled", "ADAPTER_NAME"]

ADAPTER_NAME = "default"


def add_lora(model: torch.nn.Module, rank: int, alpha: float, target_modules: Sequence[str], seed: int = 0) -> None:
    """Freeze ``model`` and attach a trainable float32 LoRA adapter named ``"default"``.

    The random ``A`` matrices are drawn from ``seed`` in a forked RNG (same seed, same adapter, on every
    process); the global RNG is untouched.

    Raises:
        ValueError: for a non-positive rank/alpha or target modules that match no layer.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"model.lora_rank must be a positive integer, got {rank!r}")
    if not alpha or alpha <= 0:
        raise ValueError(f"model.lora_alpha must be > 0, got {alpha!r}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    if not targets:
        raise ValueError("model.lora_target_modules is empty; list layer names such as ['to_q', 'to_k', 'to_v', 'to_out.0']")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"model.lora_target_modules={targets} match no layer of {type(model).__name__} ({err}); "
            f"its Linear layer names include {linear[:12]}"
        ) from err
    cast_training_params(model, dtype=torch.float32)


def lora_state_dict(model: torch.nn.Module, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` in peft format (``blocks.0.attn1.to_q.lora_A.weight``), float32 on CPU.

    Args:
        state_dict: optional full ``model.state_dict()`` gathered elsewhere (e.g.
            ``accelerator.get_state_dict(model)`` under ZeRO-3); its LoRA entries are extracted. A dict that
            already holds only peft-format LoRA keys is accepted as is.
    """
    from peft.utils import get_peft_model_state_dict

    if state_dict is not None:
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        tagged = f".{ADAPTER_NAME}." in "".join(state_dict)
        if not tagged and state_dict and all("lora_" in k for k in state_dict):
            out = dict(state_dict)
        else:
            out = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    else:
        out = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    if not out:
        raise ValueError("no LoRA weights found: the model has no 'default' LoRA adapter (or the given state_dict has none)")
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_lora(pipeline_cls, model: torch.nn.Module, save_directory: str,
              state_dict: Optional[Dict[str, torch.Tensor]] = None, is_main_process: bool = True) -> None:
    """Write ``pytorch_lora_weights.safetensors`` (+ adapter config metadata) loadable by
    ``pipeline_cls.load_lora_weights(save_directory)``."""
    weights = lora_state_dict(model, state_dict)
    metadata = model.peft_config[ADAPTER_NAME].to_dict()
    pipeline_cls.save_lora_weights(
        save_directory, transformer_lora_layers=weights, is_main_process=is_main_process,
        transformer_lora_adapter_metadata=metadata,
    )


def load_lora(pipeline_cls, model: torch.nn.Module, directory: str) -> None:
    """Load LoRA weights saved by :func:`save_lora` (or any diffusers-format Wan LoRA of the same
    rank and targets) into the existing ``"default"`` adapter of ``model``, in place."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    if not os.path.exists(directory):
        raise FileNotFoundError(f"LoRA weights not found at {directory!r}; point model.lora_path at a directory "
                                "written by VideoPolicy.save_lora (or a pipeline's save_lora_weights)")
    full = pipeline_cls.lora_state_dict(directory)
    prefix = "transformer."
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{directory!r} holds no transformer LoRA weights (keys must start with 'transformer.')")
    weights = convert_unet_state_dict_to_peft(weights)
    expected = {k for k in lora_state_dict(model)}
    unknown = sorted(set(weights) - expected)
    missing = sorted(expected - set(weights))
    if unknown or missing:
        raise ValueError(
            f"LoRA weights in {directory!r} do not match this model's adapter (targets "
            f"{sorted(model.peft_config[ADAPTER_NAME].target_modules)}): {len(unknown)} unexpected keys "
            f"(e.g. {unknown[:3]}), {len(missing)} missing (e.g. {missing[:3]}); set model.lora_target_modules "
            "to the targets the weights were trained with"
        )
    try:
        set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    except RuntimeError as err:  # size mismatch
        raise ValueError(
            f"LoRA weights in {directory!r} have a different rank than model.lora_rank="
            f"{model.peft_config[ADAPTER_NAME].r}; set model.lora_rank (and lora_alpha) to the saved values ({err})"
        ) from err


@contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base (LoRA bypassed) inside the block; adapters are re-enabled on exit."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()
