"""Building the ``accelerate.Accelerator`` for RL post-training, with DeepSpeed and CPU quirks handled.

What :func:`build_accelerator` takes care of (all measured with accelerate 1.15 / DeepSpeed 0.19):

* **Multi-process on CPU.** Without CUDA, accelerate falls back to ``DistributedType.NO`` in every
  process unless told it is a CPU job -- each rank then trains alone while ``num_processes`` still says 2.
  When launched with several processes on a machine without CUDA we therefore pass ``cpu=True`` (plain
  DDP, ``MULTI_CPU``) and the ``gloo`` process-group backend. Setting ``ACCELERATE_USE_CPU=1`` by hand
  does the same for DDP configs.
* **DeepSpeed on CPU.** DeepSpeed must *not* see ``ACCELERATE_USE_CPU=1`` (accelerate then silently drops
  DeepSpeed and runs DDP); it needs the ``gloo`` backend instead, which we pass. The first DeepSpeed
  start compiles a small shared-memory op (~40 s, cached under ``~/.cache/torch_extensions``).
* **DeepSpeed without a DataLoader.** RL trainers generate their own batches, so ``accelerate.prepare``
  cannot infer ``train_micro_batch_size_per_gpu`` and would fail on ``"auto"``; we fill it in (and
  ``gradient_accumulation_steps``, ``gradient_clipping``) when the config leaves them ``"auto"``.

Saving trained weights: :func:`gather_lora_state_dict` (LoRA: small, every process) and
:func:`gather_full_state_dict` (full fine-tuning: the whole denoiser, gathered a bucket of parameters at a time
under ZeRO-3 and kept on the main process only).

Manual gradient accumulation (several ``backward`` calls per optimiser step, e.g. micro-batches x
denoising steps) must go through :func:`gradient_sync`: under DeepSpeed ``accelerator.backward`` also
runs the optimiser step unless told that the call is not an accumulation boundary.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

__all__ = ["build_accelerator", "is_deepspeed", "zero_stage", "gather_lora_state_dict", "gather_full_state_dict",
           "gradient_sync"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def build_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    log_with=None,
    project_dir: Optional[str] = None,
    train_micro_batch_size: Optional[int] = None,
    *,
    max_grad_norm: Optional[float] = None,
    deepspeed_plugin=None,
    kwargs_handlers: Optional[list] = None,
):
    """Create the :class:`accelerate.Accelerator` for a (possibly distributed, possibly CPU-only) run.

    Args:
        mixed_precision: ``"no" | "bf16" | "fp16"``. Under DeepSpeed the precision comes from its config.
        gradient_accumulation_steps: accelerate's accumulation steps; also written into a DeepSpeed config
            whose value is ``"auto"``.
        log_with: tracker name(s) for accelerate (``"tensorboard"``, ``"wandb"``) or None; see
            :func:`pisces_rl.trainer.tracking.init_trackers`, which can also add them later.
        project_dir: run directory; trackers log under ``project_dir/logs``.
        train_micro_batch_size: samples per process per backward, written into a DeepSpeed config whose
            ``train_micro_batch_size_per_gpu`` is ``"auto"`` (default 1: DeepSpeed only uses it for
            bookkeeping because no DataLoader goes through ``prepare``).
        max_grad_norm: written into a DeepSpeed config as ``gradient_clipping`` when that is ``"auto"`` or
            absent (DeepSpeed clips inside its step; ``accelerator.clip_grad_norm_`` only reports the norm).
        deepspeed_plugin: an ``accelerate.utils.DeepSpeedPlugin`` to use instead of the launch config's.
        kwargs_handlers: extra accelerate kwargs handlers.

    Raises:
        ValueError: DeepSpeed requested together with ``ACCELERATE_USE_CPU=1``; a bad argument.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    if int(gradient_accumulation_steps) < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    use_ds = deepspeed_plugin is not None or _flag("ACCELERATE_USE_DEEPSPEED")
    if use_ds and _flag("ACCELERATE_USE_CPU"):
        raise ValueError("ACCELERATE_USE_CPU=1 silently turns DeepSpeed off (accelerate would run plain DDP). "
                         "Unset ACCELERATE_USE_CPU when launching with a DeepSpeed config; on CPU the gloo "
                         "backend is selected automatically.")
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1          # started by torchrun / accelerate launch
    no_cuda = not torch.cuda.is_available()
    if no_cuda:  # say CPU up front: DeepSpeed's own detection (imported by accelerate) warns it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    handlers = list(kwargs_handlers or [])
    if launched and no_cuda and not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    project = None
    if project_dir is not None:
        project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=os.path.join(str(project_dir), "logs"))
    acc = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=int(gradient_accumulation_steps),
        log_with=log_with,
        project_config=project,
        deepspeed_plugin=deepspeed_plugin,
        kwargs_handlers=handlers,
        cpu=bool(launched and no_cuda and not use_ds),
    )
    if is_deepspeed(acc):
        _fill_deepspeed_config(acc.state.deepspeed_plugin.deepspeed_config,
                               micro_batch=train_micro_batch_size or 1,
                               accumulation=int(gradient_accumulation_steps), max_grad_norm=max_grad_norm)
    return acc


def _fill_deepspeed_config(cfg: dict, *, micro_batch: int, accumulation: int,
                           max_grad_norm: Optional[float]) -> None:
    """Replace ``"auto"``/missing batch fields of a DeepSpeed config dict in place."""
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    if cfg.get("gradient_accumulation_steps", "auto") == "auto":
        cfg["gradient_accumulation_steps"] = accumulation
    if max_grad_norm is not None and cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(max_grad_norm)


def is_deepspeed(accelerator) -> bool:
    """True when ``accelerator`` runs under DeepSpeed."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    """DeepSpeed ZeRO stage (0-3); 0 when not running under DeepSpeed."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def gradient_sync(accelerator, model, sync: bool) -> Iterator[None]:
    """Context for one ``accelerator.backward`` call of a hand-written accumulation loop.

    ``sync=False`` for every call but the last before ``optimizer.step()``, ``sync=True`` for the last::

        for i, loss in enumerate(losses):                 # window = len(losses)
            with gradient_sync(accelerator, model, sync=(i == len(losses) - 1)):
                accelerator.backward(loss / len(losses))
        optimizer.step(); optimizer.zero_grad()

    DDP: non-boundary calls skip the gradient all-reduce (``no_sync``). DeepSpeed: non-boundary calls only
    accumulate; the boundary call runs DeepSpeed's step (clipping + optimiser + zero_grad), and the
    wrapped ``optimizer.step()`` is a no-op. Requires ``gradient_accumulation_steps == 1`` in accelerate
    and DeepSpeed (the default of :func:`build_accelerator`), so that no second loss scaling happens.
    """
    state = accelerator.gradient_state
    previous = state.sync_gradients
    ctx = contextlib.nullcontext() if sync or is_deepspeed(accelerator) else accelerator.no_sync(model)
    state._set_sync_gradients(bool(sync))
    try:
        with ctx:
            yield
    finally:
        state._set_sync_gradients(previous)


def gather_lora_state_dict(
    accelerator,
    model,
    state_dict_fn: Optional[Callable[[torch.nn.Module], dict]] = None,
) -> dict[str, torch.Tensor]:
    """Full (un-sharded) LoRA/trainable weights of a prepared model, as CPU tensors, on every process.

    **Collective**: every process must call it (under ZeRO-3 the shards are all-gathered with
    ``deepspeed.zero.GatheredParameters``; under ZeRO-0/1/2, DDP and single process every rank already
    holds full weights). Only the trainable parameters are gathered, so the frozen base model is never
    materialised.

    Args:
        accelerator: the run's accelerator.
        model: the model returned by ``accelerator.prepare`` (or its unwrapped module).
        state_dict_fn: maps the unwrapped module to the dict to save. Default: ``peft``'s
            ``get_peft_model_state_dict`` when the module carries a ``peft_config`` (peft models and diffusers
            models after ``add_adapter``; keys are then what ``save_lora_weights`` expects), otherwise every
            parameter with ``requires_grad``.

    Returns:
        ``{name: tensor}`` -- detached CPU clones in the parameters' own dtype.
    """
    module = accelerator.unwrap_model(model)
    if state_dict_fn is None:
        if getattr(module, "peft_config", None):
            from peft import get_peft_model_state_dict

            state_dict_fn = get_peft_model_state_dict
        else:
            def state_dict_fn(m):
                return {n: p for n, p in m.named_parameters() if p.requires_grad}
    trainable = [p for p in module.parameters() if p.requires_grad]
    if zero_stage(accelerator) == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    with gather:
        state = {k: v.detach().to("cpu", copy=True) for k, v in state_dict_fn(module).items()}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"{len(empty)} entries are empty ZeRO-3 shards (e.g. {empty[0]!r}): state_dict_fn returned "
                         "frozen parameters, which are not gathered; return only trainable (LoRA) weights")
    return state


def gather_full_state_dict(accelerator, model, bucket_numel: int = 2**27,
                           main_process_only: bool = True) -> dict[str, torch.Tensor]:
    """The whole (un-sharded) state dict of a prepared model, as CPU tensors -- for full fine-tuning.

    **Collective**: every process must call it. Under ZeRO-3 parameters are all-gathered
    (``deepspeed.zero.GatheredParameters``) a bucket of at most ``bucket_numel`` elements at a time (default
    2^27, 512 MB of fp32), so a model that does not fit one device is never materialised whole on it; the
    copies go to host memory on the main process only (``main_process_only``). Elsewhere every process
    already holds whole weights. Persistent buffers are included, non-persistent ones (e.g. RoPE tables)
    are not, as in ``module.state_dict()``.

    Returns:
        ``{name: tensor}`` -- detached CPU clones in the parameters' own dtype; ``{}`` on the other processes
        when ``main_process_only``.
    """
    module = accelerator.unwrap_model(model)
    keep = accelerator.is_main_process or not main_process_only
    state: dict[str, torch.Tensor] = {}
    params = list(module.named_parameters())
    zero3 = zero_stage(accelerator) == 3
    start = 0
    while start < len(params):                                       # same buckets on every process
        stop, size = start, 0
        while stop < len(params) and (stop == start or size + _numel(params[stop][1]) <= bucket_numel):
            size += _numel(params[stop][1])
            stop += 1
        bucket = params[start:stop]
        if zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None)
        else:
            gather = contextlib.nullcontext()
        with gather:
            if keep:
                state.update({n: p.detach().to("cpu", copy=True) for n, p in bucket})
        start = stop
    if keep:
        for prefix, sub in module.named_modules():
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and name not in sub._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = buf.detach().to("cpu", copy=True)
    return state


def _numel(p: torch.nn.Parameter) -> int:
    """Elements of ``p`` once gathered (``ds_numel`` under ZeRO-3, where ``p.numel()`` is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))
