"""peft LoRA on a diffusers denoiser: add, extract, save in diffusers format, load, disable.

The recipe is the one of the diffusers LoRA training scripts: freeze the base model,
``model.add_adapter(LoraConfig(..., init_lora_weights="gaussian"))`` (A ~ N(0, 1/r), B = 0, so the
initial policy equals the base model), upcast the trainable parameters to float32, and save only the
LoRA weights with ``<Pipeline>.save_lora_weights`` so that a plain ``pipe.load_lora_weights(dir)``
restores them. With full fine-tuning (no adapter) :func:`save_denoiser` writes the whole denoiser in
diffusers format instead.

:class:`UpdateRatio` measures how far one optimiser step moved the model, ``‖ΔW‖ / ‖W‖`` (logged as
``train/update_ratio``): for LoRA, ΔW is the change of the merged update ``scale·B·A`` of every adapted
layer and W its frozen base weight; for full fine-tuning, the change of every trainable parameter.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["add_lora", "lora_state_dict", "save_lora", "load_lora", "lora_disabled", "lora_layers",
           "merged_delta_sq_norm", "UpdateRatio", "save_denoiser", "ADAPTER_NAME"]

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
              state_dict: Optional[Dict[str, torch.Tensor]] = None, is_main_process: bool = True,
              weight_name: Optional[str] = None) -> None:
    """Write ``pytorch_lora_weights.safetensors`` (or ``weight_name``; + adapter config metadata) loadable by
    ``pipeline_cls.load_lora_weights(save_directory[, weight_name=...])``."""
    weights = lora_state_dict(model, state_dict)
    metadata = model.peft_config[ADAPTER_NAME].to_dict()
    name = _denoiser_name(pipeline_cls)
    pipeline_cls.save_lora_weights(save_directory, is_main_process=is_main_process, weight_name=weight_name,
                                   **{f"{name}_lora_layers": weights, f"{name}_lora_adapter_metadata": metadata})


def _denoiser_name(pipeline_cls) -> str:
    """The pipeline's LoRA-loadable denoiser component: ``"transformer"`` (Wan, CogVideoX, ...) or ``"unet"``
    (``StableDiffusionLoraLoaderMixin`` pipelines such as ``TextToVideoSDPipeline``): the first of
    ``_lora_loadable_modules``, the prefix of its keys in the saved file."""
    modules = list(getattr(pipeline_cls, "_lora_loadable_modules", None) or ["transformer"])
    return "unet" if "unet" in modules else modules[0]


def load_lora(pipeline_cls, model: torch.nn.Module, directory: str, weight_name: Optional[str] = None) -> None:
    """Load LoRA weights saved by :func:`save_lora` (or any diffusers-format Wan LoRA of the same
    rank and targets; file ``weight_name`` of ``directory`` if given) into the existing ``"default"`` adapter
    of ``model``, in place."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    if not os.path.exists(directory):
        raise FileNotFoundError(f"LoRA weights not found at {directory!r}; point model.lora_path at a directory "
                                "written by VideoPolicy.save_lora (or a pipeline's save_lora_weights)")
    full = pipeline_cls.lora_state_dict(directory, **({"weight_name": weight_name} if weight_name else {}))
    if isinstance(full, tuple):  # (state_dict, network_alphas[, metadata]) for StableDiffusionLoraLoaderMixin
        full = full[0]
    name = _denoiser_name(pipeline_cls)
    prefix = f"{name}."
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{directory!r} holds no {name} LoRA weights (keys must start with '{prefix}')")
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


def save_denoiser(model: torch.nn.Module, save_directory: str,
                  state_dict: Optional[Dict[str, torch.Tensor]] = None, max_shard_size: str = "10GB") -> None:
    """Write a fully fine-tuned diffusers model (config + ``diffusion_pytorch_model*.safetensors``, sharded with
    an index above ``max_shard_size``, as ``ModelMixin.save_pretrained``) that ``type(model).from_pretrained``
    loads.

    Args:
        state_dict: the weights to write (gathered from ZeRO-3 shards, or e.g. EMA weights); entries it lacks
            (persistent buffers, ...) are taken from ``model``. Default: ``model.state_dict()``.
    Raises:
        ValueError: keys that are not the model's; a weight that would come from an empty ZeRO-3 partition.
    """
    from huggingface_hub import save_torch_state_dict

    own = model.state_dict()
    given = {} if state_dict is None else {k[len("module."):] if k.startswith("module.") else k: v
                                          for k, v in state_dict.items()}
    unknown = sorted(set(given) - set(own))
    if unknown:
        raise ValueError(f"{len(unknown)} weights are not {type(model).__name__} entries (e.g. {unknown[:3]})")
    sharded = {n for n, p in model.named_parameters() if hasattr(p, "ds_id")}
    missing = sorted(sharded - set(given))
    if missing:
        raise ValueError(f"{len(missing)} weights are ZeRO-3 partitions (e.g. {missing[0]!r}); pass the gathered "
                         "state dict (pisces_rl.trainer.gather_full_state_dict)")
    state = {k: given.get(k, v).detach().to("cpu").contiguous() for k, v in own.items()}
    os.makedirs(save_directory, exist_ok=True)
    model.save_config(save_directory)
    save_torch_state_dict(state, save_directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=max_shard_size)


@contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base (LoRA bypassed) inside the block; adapters are re-enabled on exit."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


# ---------------------------------------------------------------------------------------------- update ratio
def lora_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """``[(name, peft LoraLayer)]`` of every layer of ``model`` carrying the ``"default"`` adapter."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER_NAME in getattr(m, "lora_A", {})]


def merged_delta_sq_norm(a0: torch.Tensor, b0: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """``‖scale·(B1·A1 − B0·A0)‖_F²`` without forming the ``[out, in]`` matrix (float64).

    ``A: [r, in]``, ``B: [out, r]`` (conv adapters are flattened to these shapes). With ``ΔA = A1 − A0``,
    ``ΔB = B1 − B0``: ``B1A1 − B0A0 = ΔB·A1 + B0·ΔA = U·V`` for ``U = [ΔB, B0]`` ``[out, 2r]`` and
    ``V = [A1; ΔA]`` ``[2r, in]``, and ``‖UV‖² = Σ (UᵀU) ⊙ (VVᵀ)`` (two ``[2r, 2r]`` Gram matrices). Writing
    the difference through ``ΔA, ΔB`` avoids subtracting two large, nearly equal products.
    """
    a0, a1 = a0.flatten(1).double(), a1.flatten(1).double()
    b0, b1 = b0.flatten(1).double(), b1.flatten(1).double()
    u = torch.cat([b1 - b0, b0], dim=1)                                     # [out, 2r]
    v = torch.cat([a1, a1 - a0], dim=0)                                     # [2r, in]
    return (u.T @ u * (v @ v.T)).sum().clamp_min(0) * float(scale) ** 2


def _zero3(params: Sequence[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The elements of ``p`` this process holds: all of them, or under ZeRO-3 its partition (without the
    alignment padding of the last partition, which DeepSpeed leaves uninitialised)."""
    if not hasattr(p, "ds_tensor"):
        return p.detach()
    import torch.distributed as dist

    shard = p.ds_tensor.detach()
    size = shard.numel()
    rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
    valid = max(0, min(size, p.ds_numel - rank * size))
    return shard.narrow(0, 0, valid)


def _all_reduce_sum(values: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Sum ``values`` over the processes that partition ``params`` (ZeRO-3); a no-op otherwise."""
    if not _zero3(params):
        return values
    import torch.distributed as dist

    group = getattr(params[0], "ds_process_group", None)
    out = values.to(params[0].ds_tensor.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.cpu()


class UpdateRatio:
    """``‖W_now − W_then‖ / ‖W‖`` of a denoiser, for logging how far the optimiser moves it.

    Two modes, chosen from the model:

    * **LoRA** (the model has peft layers with the ``"default"`` adapter): per adapted layer
      ``ΔW = scale·(B_now·A_now − B_then·A_then)`` ``[out, in]`` (:func:`merged_delta_sq_norm`), aggregated as
      ``sqrt(Σ_layers ‖ΔW‖²) / sqrt(Σ_layers ‖W_base‖²)``. The snapshot holds only A and B.
    * **full** (no adapter): ``sqrt(Σ_p ‖p_now − p_then‖²) / sqrt(Σ_p ‖p_then‖²)`` over the trainable
      parameters. The snapshot is one copy of them, in their own dtype, on their device (under ZeRO-3 only
      this process's partition).

    Distributed: DDP and ZeRO-1/2 hold whole weights on every process, so every process computes the same
    value locally. Under ZeRO-3 the LoRA factors are all-gathered for the measurement and the base norms and
    full-model sums are computed on each partition and all-reduced -- a **collective**: every process must
    call :meth:`snapshot` and :meth:`measure` / :meth:`step` together. No forward pass is involved.

    Usage (the trainer): ``tracker = UpdateRatio(model)`` before the first step, then ``tracker.step()``
    after each optimiser step (measure against the previous snapshot, then re-snapshot). Call
    :meth:`snapshot` again after anything else changes the weights (e.g. loading a checkpoint).
    """

    def __init__(self, model: torch.nn.Module):
        self.layers = [(n, m) for n, m in lora_layers(model)
                       if m.lora_A[ADAPTER_NAME].weight.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("UpdateRatio needs a model with trainable parameters")
        self.mode = "lora" if self.layers else "full"
        self._base_sq: Optional[float] = None
        self._then = None
        self.snapshot()

    # -------------------------------------------------------------- state
    def _lora_factors(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """``[(A, B)]`` per adapted layer, whole (gathered under ZeRO-3), detached clones."""
        factors = [(m.lora_A[ADAPTER_NAME].weight, m.lora_B[ADAPTER_NAME].weight) for _, m in self.layers]
        flat = [t for pair in factors for t in pair]
        gather = _gathered(flat)
        with gather:
            return [(a.detach().clone(), b.detach().clone()) for a, b in factors]

    def state(self):
        """A snapshot of the current weights (what :meth:`measure` compares against)."""
        if self.mode == "lora":
            return self._lora_factors()
        return [_local(p).clone() for p in self.params]

    def snapshot(self) -> None:
        """Remember the current weights as the reference of the next :meth:`measure`."""
        self._then = self.state()

    def _base_norm_sq(self) -> float:
        """``Σ ‖W_base‖²`` over the adapted layers (frozen: computed once)."""
        if self._base_sq is None:
            weights = [m.get_base_layer().weight for _, m in self.layers]
            local = torch.stack([_local(w).double().pow(2).sum().cpu() for w in weights]).sum()
            self._base_sq = float(_all_reduce_sum(local.reshape(1), weights)[0])
        return self._base_sq

    # -------------------------------------------------------------- measurement
    def measure(self, then=None) -> float:
        """``‖ΔW‖ / ‖W‖`` between ``then`` (default: the last snapshot) and now; NaN if ``‖W‖ = 0``."""
        then = self._then if then is None else then
        if self.mode == "lora":
            now = self._lora_factors()
            delta_sq = sum(float(merged_delta_sq_norm(a0, b0, a1, b1, m.scaling[ADAPTER_NAME]))
                           for (a0, b0), (a1, b1), (_, m) in zip(then, now, self.layers))
            base_sq = self._base_norm_sq()
        else:
            sums = torch.zeros(2, dtype=torch.float64)
            for p, old in zip(self.params, then):
                new = _local(p)
                sums[0] += torch.linalg.vector_norm(new.float() - old.float(), dtype=torch.float64).cpu() ** 2
                sums[1] += torch.linalg.vector_norm(old, dtype=torch.float64).cpu() ** 2
            delta_sq, base_sq = (float(v) for v in _all_reduce_sum(sums, self.params))
        return math.sqrt(delta_sq) / math.sqrt(base_sq) if base_sq > 0 else float("nan")

    def step(self) -> float:
        """:meth:`measure` against the last snapshot, then snapshot the current weights."""
        ratio = self.measure()
        self.snapshot()
        return ratio


def _gathered(params: Sequence[torch.nn.Parameter]):
    """Context in which ZeRO-3-partitioned ``params`` are whole on every process (no-op otherwise)."""
    if not _zero3(params):
        from contextlib import nullcontext

        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
