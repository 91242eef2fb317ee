"""Pre-flight checks of a run's input files and paths, before any model is built.

    from pisces_rl.config.inputs import check_inputs
    check_inputs(cfg)        # raises ConfigError("data.prompts: prompt file 'p.txt' not found ...")

``load_config`` checks types and ranges; this module checks what the run will *read*, so that a missing prompt
file or OT map stops the run in a second with one line naming the key and the fix, instead of a traceback after
a 1.3B model has loaded. Each input is checked only if the run uses it:

===========================  =====================================================================================
key                          must be
===========================  =====================================================================================
``model.pretrained``         ``tiny``; ``shapes`` (the built world); a directory with ``model_index.json``; or a
                             hub id ``org/name`` that is in the local Hugging Face cache or on a reachable Hub
``model.lora_path``          a local LoRA directory (``*.safetensors`` / ``*.bin``) or such a file (never a hub id)
``rewards.encoder``          (when ``ot_quality``/``ot_semantic`` are used) ``tiny[:SEED]``, ``shapes``, a
                             checkpoint directory (``config.json``, weights, tokenizer files), or a hub id as above
``rewards.ot_map``           (when ``ot_quality`` uses a map) ``shapes``/``shapes:l2`` or a local map directory
                             (``config.json`` naming a ``map_type``, ``model.safetensors``); never a hub id
``rewards.weights.<spec>``   an importable ``package.module:function`` (or class)
``data.prompts``             a prompt source that loads and holds prompts (file readable, not empty, has
``data.prompt_column``       the column); ``data.eval_source`` likewise when it is used
``train.video_dataset``      (backprop, ``latent_source=dataset``) ``shapes`` or a ``save_to_disk`` directory
                             with a ``video`` and the ``train.caption_column`` column
``logging.judge``            ``none``, ``shapesbench`` or an importable ``package.module:function``
===========================  =====================================================================================

A world name (``shapes``) whose artifact is not built says to run ``make world``. Recipes call
:func:`check_inputs` right after parsing the command line (and print ``error: <key>: <message>`` with exit
status 2, see :func:`exit_on_config_error`); ``TrainerBase`` calls it for the parts its arguments do not replace.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .base import ConfigError

__all__ = ["check_inputs", "looks_like_hub_id", "pop_debug", "exit_on_config_error"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BUILTIN_REWARDS = ("ot_quality", "ot_semantic")   # rewards that load rewards.encoder (pisces_rl.rewards.registry)
_WORLD_ROLES = {"model.pretrained": "model", "rewards.encoder": "encoder", "rewards.ot_map": "ot_map"}
_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
_LORA_SUFFIXES = (".safetensors", ".bin")


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` that is not an existing path: the form of a Hugging Face Hub repository id."""
    return bool(_HUB_ID.match(value)) and not os.path.exists(os.path.expanduser(value))


def check_inputs(cfg: Any, *, model: bool = True, rewards: bool = True, data: bool = True) -> None:
    """Check every input path of run config ``cfg`` (a ``GRPOConfig`` or ``BackpropConfig``) that the run reads.

    ``model=False`` / ``rewards=False`` / ``data=False`` skip the inputs a caller replaces (a ready policy, a
    reward server, a prompt list or dataset). Raises :class:`ConfigError` naming the key and the fix; builds
    nothing (it may read small files: the prompt list, a dataset's metadata, JSON configs).
    """
    if model:
        _check_pipeline(cfg.model.pretrained)
        if cfg.model.lora_path:
            _check_lora(cfg.model.lora_path)
    if rewards:
        _check_rewards(cfg.rewards)
    if data:
        _check_data(cfg)
    _check_judge(cfg.logging.judge)


# ------------------------------------------------------------------------------------------------- model
def _check_pipeline(value: str) -> None:
    key = "model.pretrained"
    if value == "tiny" or _world(key, value):
        return
    path = _existing(value)
    if path is None:
        if looks_like_hub_id(value):
            return _check_hub(key, value, "model_index.json")
        raise ConfigError(f"{value!r} is not an existing directory (working directory: {os.getcwd()}); give a "
                          "diffusers pipeline directory, a hub id such as 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers', "
                          "'tiny' or 'shapes'", key)
    _need_files(key, path, [("model_index.json",)], "a diffusers pipeline directory (save_pretrained)")


def _check_lora(value: str) -> None:
    key = "model.lora_path"
    path = _existing(value)
    if path is None:
        hub = " LoRA weights are read from disk, not from the Hub: download them first and give the directory;" \
            if looks_like_hub_id(value) else ""
        raise ConfigError(f"{value!r} does not exist (working directory: {os.getcwd()});{hub} point it at a "
                          "directory written by VideoPolicy.save_lora (a run's output_dir/lora) or null", key)
    files = [path] if path.is_file() else list(path.iterdir())
    if not any(f.is_file() and f.name.endswith(_LORA_SUFFIXES) for f in files):
        raise ConfigError(f"{str(path)!r} holds no LoRA weights (*.safetensors or *.bin); point it at a run's "
                          "output_dir/lora (pytorch_lora_weights.safetensors)", key)


# ----------------------------------------------------------------------------------------------- rewards
def _check_rewards(r: Any) -> None:
    names = [str(n).strip() for n in r.weights]
    for name in names:
        if name not in _BUILTIN_REWARDS:
            _check_import(f"rewards.weights.{name}", name)
    if any(n in _BUILTIN_REWARDS for n in names):
        _check_encoder(r.encoder)
    if "ot_quality" in names and r.use_ot and r.ot_map is not None:
        _check_ot_map(r.ot_map)


def _check_encoder(value: str) -> None:
    key = "rewards.encoder"
    if re.fullmatch(r"tiny(:\d+)?", value) or _world(key, value):
        return
    path = _existing(value)
    if path is None:
        if looks_like_hub_id(value):
            return _check_hub(key, value, "config.json")
        raise ConfigError(f"{value!r} is not an existing directory (working directory: {os.getcwd()}); give a "
                          "BLIP-ITM checkpoint directory, 'tiny' or 'shapes' (docs/encoders.md)", key)
    _need_files(key, path, [("config.json",), _ENCODER_WEIGHTS, _TOKENIZER_FILES],
                "a video-text encoder checkpoint (BlipVideoTextEncoder.save_pretrained, or a copy of "
                "Salesforce/blip-itm-base-coco)")


def _check_ot_map(value: str) -> None:
    key = "rewards.ot_map"
    if _world(key, value):
        return
    path = _existing(value)
    if path is None or not path.is_dir():
        hub = " An OT map is never downloaded: 'org/name' here is a local path." if looks_like_hub_id(value) else ""
        raise ConfigError(f"{value!r} is not an existing directory (working directory: {os.getcwd()}).{hub} Fit "
                          f"one with `pisces-rl fit-ot-map --output {value}`, use 'shapes' after `make world`, or "
                          "set rewards.ot_map=null (raw text embeddings)", key)
    fix = "a directory written by NeuralOTMap.save_pretrained or `pisces-rl fit-ot-map --output DIR`"
    _need_files(key, path, [("config.json",), ("model.safetensors",)], fix)
    try:
        map_type = json.loads((path / "config.json").read_text()).get("map_type")
    except (ValueError, AttributeError):
        map_type = None
    if not map_type:
        raise ConfigError(f"{str(path / 'config.json')!r} names no map_type, so it is not an OT map; give {fix}",
                          key)


# -------------------------------------------------------------------------------------------------- data
def _check_data(cfg: Any) -> None:
    d, t = cfg.data, cfg.train
    latent_source = getattr(t, "latent_source", "generated")
    if latent_source != "dataset":
        _load_prompts("data.prompts", d.prompts, d.prompt_column)
    if not d.eval_prompts and d.eval_source:
        _load_prompts("data.eval_source", d.eval_source, d.prompt_column)
    if latent_source == "dataset" and t.video_dataset != "shapes":
        _check_video_dataset(t.video_dataset, t.caption_column)


def _load_prompts(key: str, source: str, column: str) -> None:
    from pisces_rl.data.prompts import TABLE_FORMATS, load_prompts

    quiet = contextlib.nullcontext()
    if os.path.splitext(source)[1].lower() in TABLE_FORMATS:  # read through datasets: no progress bar for a check
        quiet = _no_progress_bars()
    try:
        with quiet:
            load_prompts(source, column)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc), key) from None
    except ValueError as exc:
        raise ConfigError(str(exc), "data.prompt_column" if "has no column" in str(exc) else key) from None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _check_video_dataset(value: str, caption_column: str) -> None:
    key = "train.video_dataset"
    path = _existing(value)
    if path is None or not path.is_dir():
        raise ConfigError(f"{value!r} is not an existing directory (working directory: {os.getcwd()}); use "
                          "'shapes' or a directory written by datasets.Dataset.save_to_disk", key)
    import datasets

    try:
        columns = datasets.load_from_disk(str(path)).column_names
    except Exception as exc:  # datasets raises several types for a folder that is not a saved dataset
        raise ConfigError(f"{str(path)!r} is not a dataset saved with save_to_disk ({type(exc).__name__}: {exc}); "
                          "save one with Dataset.save_to_disk(dir)", key) from None
    if isinstance(columns, dict):      # a DatasetDict: the trainer needs one split
        raise ConfigError(f"{str(path)!r} holds several splits ({', '.join(columns)}); save the training split "
                          "alone (dataset_dict['train'].save_to_disk(dir))", key)
    for column, which in (("video", key), (caption_column, "train.caption_column")):
        if column not in columns:
            raise ConfigError(f"the dataset {str(path)!r} has no column {column!r} (columns: {', '.join(columns)}); "
                              + ("it needs uint8 videos [F, H, W, 3] in 'video'" if column == "video" else
                                 "set train.caption_column to the column holding the prompts"), which)


# ---------------------------------------------------------------------------------------------- judge etc.
def _check_judge(value: str) -> None:
    from pisces_rl.registry import lookup

    if value == "none" or lookup("judge", value) is not None:
        return
    _check_import("logging.judge", value)


def _check_import(key: str, spec: str) -> None:
    from pisces_rl.rewards.base import RewardError
    from pisces_rl.rewards.registry import _import_attribute

    try:
        target = _import_attribute(spec)
    except RewardError as exc:
        raise ConfigError(str(exc), key) from None
    if not callable(target):
        raise ConfigError(f"{spec!r} points to a {type(target).__name__}, which is not callable; point it at a "
                          "function or a class", key)


# -------------------------------------------------------------------------------------------------- helpers
def _existing(value: str) -> Optional[Path]:
    path = Path(os.path.expanduser(value))
    return path if path.exists() else None


def _world(key: str, value: str) -> bool:
    """True if ``value`` names a ShapesWorld artifact for ``key`` and it is built; ConfigError if it is not."""
    from pisces_rl.registry import lookup, resolve_artifact

    if lookup(_WORLD_ROLES[key], value) is None:
        return False
    try:
        resolve_artifact(_WORLD_ROLES[key], value)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc), key) from None
    return True


def _need_files(key: str, path: Path, groups: Sequence[Sequence[str]], what: str) -> None:
    """``path`` must be a directory holding, for each group, at least one of the group's file names."""
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is a file; give {what}", key)
    for group in groups:
        if not any((path / name).is_file() for name in group):
            need = group[0] if len(group) == 1 else "one of " + ", ".join(group)
            raise ConfigError(f"{str(path)!r} has no {need}, so it is not {what}", key)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def _check_hub(key: str, repo_id: str, probe_file: str) -> None:
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    problem = _hub_problem(repo_id, probe_file, _offline(), cache)
    if problem:
        raise ConfigError(f"{repo_id!r} is not a local directory, and as a Hugging Face Hub id {problem}. Download it "
                          f"where the Hub is reachable (`hf download {repo_id} --local-dir DIR`) and set {key}=DIR",
                          key)


def _hub_problem(repo_id: str, probe_file: str, offline: bool, cache: str) -> Optional[str]:
    """None if ``repo_id`` is in the Hugging Face cache ``cache`` or the Hub confirms it; else what is wrong."""
    import huggingface_hub as hf

    if isinstance(hf.try_to_load_from_cache(repo_id, probe_file, cache_dir=cache), str):
        return None
    if offline:
        return f"it is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set"
    problem = _ask_hub(repo_id)
    return f"it is not in the local Hugging Face cache ({cache}) and {problem}" if problem else None


@functools.lru_cache(maxsize=None)
def _ask_hub(repo_id: str) -> Optional[str]:
    """None if the Hub knows ``repo_id`` (asked once per process), else why not."""
    import huggingface_hub as hf
    from huggingface_hub import errors

    try:
        hf.HfApi().model_info(repo_id, timeout=10)
    except errors.GatedRepoError:
        return "it is a gated repository: accept its licence on the Hub and log in (`hf auth login`)"
    except errors.RepositoryNotFoundError:
        return "no such repository exists on the Hub (check the spelling)"
    except Exception as exc:  # no network, proxy, timeout...
        return f"the Hub cannot be reached ({type(exc).__name__}: {str(exc)[:120]})"
    return None


# --------------------------------------------------------------------------------------- recipe error output
def pop_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    args = list(argv)
    return [a for a in args if a != "--debug"], "--debug" in args


@contextlib.contextmanager
def exit_on_config_error(debug: bool = False) -> Iterator[None]:
    """Inside the block, a :class:`ConfigError` prints ``error: <key>: <message>`` on stderr and exits with status
    2 (the full traceback first when ``debug``). Recipes wrap their whole run in it."""
    try:
        yield
    except ConfigError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
