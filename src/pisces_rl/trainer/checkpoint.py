"""Atomic, resumable training checkpoints on top of ``accelerator.save_state``.

Layout under ``output_dir/checkpoints/``::

    checkpoint-000004/              a complete checkpoint (only ever created by one rename)
        trainer_state.json          step, sampler position, metrics, config hash, ... + "checkpoint_info"
        lora/ | transformer/        the trained weights in diffusers format: LoRA (``pipe.load_lora_weights(dir)``)
                                    or, with full fine-tuning, the denoiser (``<Transformer>.from_pretrained(dir)``)
        model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl, ...
                                    (``accelerator.save_state``; DeepSpeed writes its own sub-folder)
    .tmp-step-000006/               a checkpoint being written -- or left behind by a crash; ignored

Writing goes into ``.tmp-step-XXXXXX``; after every process has finished, the main process renames it to
``checkpoint-XXXXXX``. A crash at any point therefore leaves either the previous checkpoints untouched or
a ``.tmp`` folder that :func:`find_checkpoint` ignores (and the next save removes). All processes must see
``output_dir`` (a shared filesystem on multi-node jobs) and resume with the same number of processes.

By default frozen parameters (the base model under LoRA; the frozen reference copy of full fine-tuning is no
module of the accelerator at all) are left out of the checkpoint
(``save_frozen=False``): they are rebuilt from the pretrained weights when the run restarts, and
:func:`load_checkpoint` then loads non-strictly. Resuming restores model, optimiser, schedulers and
objects registered with ``accelerator.register_for_checkpointing``, and every process's RNG states.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["save_checkpoint", "find_checkpoint", "load_checkpoint", "list_checkpoints", "config_hash",
           "STATE_FILE"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
LORA_DIR = "lora"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-step-"
_TRASH_PREFIX = ".trash-step-"


def _name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def config_hash(config: Mapping[str, Any]) -> str:
    """Short, order-independent hash of a (nested) config dict, for ``trainer_state.json``."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir/checkpoints`` as ``[(step, path)]``, oldest first.

    Complete = named ``checkpoint-<digits>`` and holding ``trainer_state.json``; ``.tmp-*`` folders and
    anything else in the folder are ignored.
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _check_json(state: Mapping[str, Any]) -> None:
    for key, value in state.items():
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as err:
            raise TypeError(f"extra_state[{key!r}] is not JSON-serialisable ({err}); convert it to plain "
                            "numbers/strings/lists/dicts (e.g. tensor.tolist(), float(x))") from None


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    *,
    models: Optional[Sequence[Any]] = None,
    extra_state: Optional[Mapping[str, Any]] = None,
    lora_saver: Optional[Callable[[str], None]] = None,
    keep_last: Optional[int] = 2,
    save_frozen: bool = False,
    weights_dir: str = LORA_DIR,
) -> str:
    """Write ``output_dir/checkpoints/checkpoint-<step>`` atomically; call on **every** process.

    Args:
        accelerator: the run's accelerator (model/optimizer prepared by it).
        output_dir: run directory.
        step: training iteration; names the checkpoint and is stored as ``trainer_state["step"]``.
        models: the prepared models that must be in the checkpoint. Each must have gone through
            ``accelerator.prepare`` (otherwise ``save_state`` would silently skip it -> error).
        extra_state: JSON-serialisable trainer state (sampler position, metrics history, config hash...).
        lora_saver: ``lora_saver(directory)`` writes the trained weights into ``directory``
            (``<ckpt>/<weights_dir>``). It is called on every process so that it can gather ZeRO-3 shards
            (:func:`~pisces_rl.trainer.accel.gather_lora_state_dict`,
            :func:`~pisces_rl.trainer.accel.gather_full_state_dict`) and must write on the main process only.
        keep_last: keep this many newest checkpoints (the one just written always survives); ``None`` or 0
            keeps all. Only ``checkpoint-<digits>`` folders are ever deleted.
        save_frozen: also store parameters with ``requires_grad=False`` (default: skip them).
        weights_dir: name of the sub-folder ``lora_saver`` writes: ``"lora"`` (default) or ``"transformer"``
            for a fully fine-tuned denoiser.

    Returns:
        Path of the finished checkpoint, on every process.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not weights_dir or os.sep in weights_dir or weights_dir.startswith("."):
        raise ValueError(f"weights_dir must be a plain folder name such as 'lora' or 'transformer', got {weights_dir!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last must be None or an int >= 0, got {keep_last!r} (set checkpoint.keep_last)")
    state = dict(extra_state or {})
    if "step" in state and state["step"] != step:
        raise ValueError(f"extra_state['step'] = {state['step']} disagrees with step = {step}")
    _check_json(state)
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("the accelerator uses automatic_checkpoint_naming, which makes save_state ignore the "
                         "target folder; build it without (build_accelerator does)")
    prepared = list(accelerator._models)
    for i, m in enumerate(models or []):
        if not any(accelerator.unwrap_model(m) is accelerator.unwrap_model(p) for p in prepared):
            raise ValueError(f"models[{i}] ({type(m).__name__}) was not prepared by this accelerator, so "
                             "accelerator.save_state would not store it; pass it through accelerator.prepare "
                             "(or accelerator.register_for_checkpointing for non-module state)")

    root = Path(output_dir) / CHECKPOINTS
    tmp, final = root / f"{_TMP_PREFIX}{step:06d}", root / _name(step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):                       # left behind by a crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    _save_state(accelerator, str(tmp), save_frozen)
    if lora_saver is not None:
        if accelerator.is_main_process:
            (tmp / weights_dir).mkdir(exist_ok=True)
        accelerator.wait_for_everyone()
        lora_saver(str(tmp / weights_dir))
    if accelerator.is_main_process:
        state.update(step=step, checkpoint_info={
            "format": 1, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "frozen_weights_saved": bool(save_frozen)})
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=2, allow_nan=True)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        trash = root / f"{_TRASH_PREFIX}{step:06d}"
        if final.exists():                                               # re-saving a step (after a resume)
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
        os.rename(tmp, final)                                            # the commit point
        shutil.rmtree(trash, ignore_errors=True)
        _prune(root.parent, keep_last, keep=final)
    accelerator.wait_for_everyone()
    return str(final)


def _save_state(accelerator, directory: str, save_frozen: bool) -> None:
    """``accelerator.save_state``, leaving out frozen parameters unless ``save_frozen``."""
    from accelerate.utils import DistributedType

    if save_frozen:
        accelerator.save_state(directory)
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(directory, exclude_frozen_parameters=True)
        return
    models = list(accelerator._models)

    def drop_frozen(_models, weights, _dir):                             # weights[i] = state dict of models[i]
        for model, sd in zip(models, weights):
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    sd.pop(name, None)

    handle = accelerator.register_save_state_pre_hook(drop_frozen)
    try:
        accelerator.save_state(directory)
    finally:
        handle.remove()


def _prune(output_dir: Path, keep_last: Optional[int], keep: Path) -> None:
    if not keep_last:
        return
    others = [p for _, p in list_checkpoints(output_dir) if p != keep]
    for p in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(output_dir: str | os.PathLike, which: Optional[str] = "latest") -> Optional[str]:
    """Resolve ``checkpoint.resume_from`` to a checkpoint folder.

    Args:
        output_dir: run directory (holds ``checkpoints/``).
        which: ``None``/``""`` -> no resume; ``"latest"`` -> newest complete checkpoint, or ``None`` with a
            warning when there is none (the run then starts fresh); otherwise a checkpoint folder, given as a
            path or as a name inside ``output_dir/checkpoints`` (e.g. ``"checkpoint-000004"``).

    Raises:
        FileNotFoundError: an explicit path that does not exist.
        ValueError: an explicit path that is not a complete checkpoint (e.g. an interrupted ``.tmp`` folder).
    """
    if not which:
        return None
    available = list_checkpoints(output_dir)
    if which == "latest":
        if not available:
            warnings.warn(f"checkpoint.resume_from='latest' but no complete checkpoint under "
                          f"{Path(output_dir) / CHECKPOINTS}; starting from scratch", UserWarning, stacklevel=2)
            return None
        return str(available[-1][1])
    path = Path(which)
    if not path.is_dir() and (Path(output_dir) / CHECKPOINTS / which).is_dir():
        path = Path(output_dir) / CHECKPOINTS / which
    names = ", ".join(p.name for _, p in available) or "none"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.resume_from={which!r} does not exist (available under "
                                f"{Path(output_dir) / CHECKPOINTS}: {names}); set it to 'latest' or an "
                                "existing checkpoint folder")
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE}; an interrupted save?); "
                         f"resume from 'latest' or one of: {names}")
    return str(path)


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG states from ``path``; call on **every** process, after
    ``accelerator.prepare`` (and ``register_for_checkpointing``) with the same objects as when saving.

    Returns:
        The ``trainer_state.json`` dict (``step`` plus whatever ``extra_state`` held).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; use find_checkpoint(output_dir, 'latest')")
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE}; an interrupted save?)")
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    info = state.get("checkpoint_info", {})
    saved_procs = info.get("num_processes", accelerator.num_processes)
    if saved_procs != accelerator.num_processes:
        warnings.warn(f"{path} was written by {saved_procs} processes, now running {accelerator.num_processes}; "
                      "RNG states (and DeepSpeed shards) may not be restored exactly", UserWarning, stacklevel=2)
    kwargs = {}
    if not info.get("frozen_weights_saved", True):
        from accelerate.utils import DistributedType

        ds = accelerator.distributed_type == DistributedType.DEEPSPEED
        kwargs = {"load_module_strict": False} if ds else {"strict": False}
    accelerator.load_state(str(path), **kwargs)
    return state
