"""A run's output directory: never start over a previous run by accident; resume only what a checkpoint means.

``check_output_dir(cfg)`` runs before anything is built (``TrainerBase._setup``) and decides:

* ``output_dir`` holds a previous run (any of :data:`RUN_FILES`) and neither ``checkpoint.resume_from`` nor
  ``overwrite_output_dir`` is set → :class:`ConfigError` naming the three ways on;
* ``overwrite_output_dir=true`` → the previous run's files (exactly :data:`RUN_FILES`; nothing else in the
  folder) are removed by the main process before the run writes (:func:`clear_previous_run`);
* a checkpoint to resume from (``latest`` in ``output_dir``, or a given folder) → its saved config is compared
  with this one on the keys that change what the checkpoint's weights and optimiser state mean
  (:data:`RESUME_KEYS`); any difference is a :class:`ConfigError` listing every differing key, old → new.

The saved config is ``trainer_state.json["config"]`` (written with every checkpoint), or for older checkpoints
the run's ``config.yaml`` two folders up. Keys that one side does not have (a config written before a field
existed) are not compared; ``train.group_size`` and ``train.num_generations`` are the same key.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError
from .checkpoint import STATE_FILE, find_checkpoint, list_checkpoints

__all__ = ["RUN_FILES", "RESUME_KEYS", "check_output_dir", "previous_run_files", "clear_previous_run",
           "resume_mismatches", "saved_config"]

RUN_FILES = ("config.yaml", "summary.json", "checkpoints", "lora", "lora_ema", "samples", "logs",
             "before_after.gif", "before_after.mp4", "reward_curve.png")
"""What a run writes into ``output_dir`` (and what ``overwrite_output_dir=true`` removes)."""

RESUME_KEYS = ("model.pretrained", "model.family", "model.finetune", "model.lora_rank", "model.lora_alpha",
               "model.lora_target_modules", "train.prompts_per_step", "train.group_size", "train.cd_target")
"""Keys a resumed run must share with its checkpoint: the base model, the shape of the trained parameters and of
their optimiser state, the group arithmetic of the sampler position, and the objects saved with it (backprop's
EMA). ``model.seed`` joins them when the model is the in-code ``tiny`` one (the seed then *is* the base model)."""

_ALIASES = {"train.group_size": ("train.group_size", "train.num_generations")}


def previous_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Names of :data:`RUN_FILES` present in ``output_dir`` (empty if it does not exist)."""
    root = Path(output_dir)
    return [name for name in RUN_FILES if (root / name).exists()] if root.is_dir() else []


def check_output_dir(cfg: Any) -> bool:
    """Refuse to run over a previous run, check a resume; returns True when the previous run must be cleared
    (``overwrite_output_dir=true``; call :func:`clear_previous_run` on the main process). Builds nothing."""
    out = cfg.output_dir
    overwrite = bool(getattr(cfg, "overwrite_output_dir", False))
    resume = cfg.checkpoint.resume_from
    previous = previous_run_files(out)
    if previous and not overwrite and not resume:
        raise ConfigError(f"{out!r} already holds a run ({', '.join(previous)}); continue it with "
                          "checkpoint.resume_from=latest, start over with overwrite_output_dir=true (removes those "
                          "files), or choose another output_dir", "output_dir")
    checkpoint = _resume_target(out, resume, overwrite)
    if checkpoint is not None:
        saved = saved_config(checkpoint)
        diffs = resume_mismatches(saved, cfg.to_dict()) if saved is not None else []
        if diffs:
            changes = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diffs)
            keys = ", ".join(k for k, _, _ in diffs)
            raise ConfigError(f"{checkpoint} was saved by a run with other values of {keys} ({changes}); a "
                              "checkpoint only continues the run that saved it: set those keys back, or start a new "
                              "run (another output_dir, or overwrite_output_dir=true and checkpoint.resume_from=null)",
                              "checkpoint.resume_from")
    return overwrite and bool(previous)


def _resume_target(out: str, resume: Optional[str], overwrite: bool) -> Optional[str]:
    """The checkpoint folder this run will resume from, or None."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        return None if overwrite or not found else str(found[-1][1])  # overwrite clears them: a fresh start
    try:
        path = find_checkpoint(out, resume)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc), "checkpoint.resume_from") from None
    if overwrite and Path(out).resolve() in Path(path).resolve().parents:
        raise ConfigError(f"overwrite_output_dir=true would delete {path}, the checkpoint to resume from; copy it "
                          "elsewhere first, or drop overwrite_output_dir", "checkpoint.resume_from")
    return path


def saved_config(checkpoint: str | os.PathLike) -> Optional[dict]:
    """The config a checkpoint was saved with (its ``trainer_state.json``, else the run's ``config.yaml``)."""
    path = Path(checkpoint)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    if isinstance(state.get("config"), dict):
        return state["config"]
    run_config = path.parent.parent / "config.yaml"
    if run_config.is_file():
        import yaml

        data = yaml.safe_load(run_config.read_text())
        return data if isinstance(data, dict) else None
    return None


def _get(config: dict, key: str) -> tuple[bool, Any]:
    for name in _ALIASES.get(key, (key,)):
        node: Any = config
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return True, node
    return False, None


def resume_mismatches(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``[(key, saved value, current value)]`` for every :data:`RESUME_KEYS` entry (and ``model.seed`` of a tiny
    model) on which two config dicts differ; keys missing on either side are skipped."""
    keys = list(RESUME_KEYS)
    if _get(saved, "model.pretrained")[1] == "tiny":
        keys.append("model.seed")
    out = []
    for key in keys:
        (has_old, old), (has_new, new) = _get(saved, key), _get(current, key)
        if not (has_old and has_new):
            continue
        if key == "model.lora_target_modules" and isinstance(old, list) and isinstance(new, list):
            same = sorted(map(str, old)) == sorted(map(str, new))
        else:
            same = old == new
        if not same:
            out.append((key, old, new))
    return out


def clear_previous_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove the :data:`RUN_FILES` of a previous run from ``output_dir``; returns the names removed."""
    root = Path(output_dir)
    removed = []
    for name in previous_run_files(root):
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        removed.append(name)
    return removed
