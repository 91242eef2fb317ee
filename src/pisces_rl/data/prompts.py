"""Prompt sources: text/table files (through ``datasets``), the shipped VBench list and built-in lists.

    load_prompts("prompts.txt")                 # one prompt per line; blank lines and '#' comments skipped
    load_prompts("prompts.csv", column="caption")  # .jsonl / .json / .csv / .parquet via datasets, offline
    load_prompts("vbench")                      # the 944 distinct prompts of VBench's full list
    load_prompts("vbench:color")                # only those VBench uses for one dimension
    load_prompts("builtin:tiny")                # a few short ShapesWorld-style prompts, for smoke runs
    load_prompts("shapes:heldout:32")           # ShapesWorld template prompts: split (all|train|heldout), count

Prompts are stripped of surrounding whitespace and kept in file order, duplicates included.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
from importlib import resources
from typing import Any, Iterable, Optional, Sequence, Union

__all__ = ["load_prompts", "vbench_prompts", "vbench_entries", "vbench_dimensions", "BUILTIN_PROMPTS",
           "TABLE_FORMATS"]

BUILTIN_PROMPTS: dict[str, tuple[str, ...]] = {
    "tiny": (
        "a red circle moving left",
        "a blue square moving right",
        "a green triangle moving up",
        "a yellow circle moving down",
        "two red squares moving right",
        "a white triangle staying still",
        "a blue circle and a red square moving left",
        "three green circles moving down",
    ),
}

TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> builder

_VBENCH_FILE = "vbench_prompts.json"


def _clean(values: Iterable[Any], where: str, unit: str = "item") -> list[str]:
    """Strip every prompt; reject non-strings and empty strings, naming the position."""
    prompts = []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {unit} {i} is a {type(value).__name__} ({value!r}), not a prompt string")
        text = value.strip()
        if not text:
            raise ValueError(f"{where}: {unit} {i} is an empty prompt; remove it or fill it in")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{where} holds no prompts")
    return prompts


# ------------------------------------------------------------------------------------------ VBench
@functools.lru_cache(maxsize=1)
def _vbench_data() -> dict:
    text = resources.files("pisces_rl.data").joinpath(_VBENCH_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def vbench_entries() -> list[dict]:
    """VBench's full prompt list as shipped: ``{"prompt", "dimension", ["auxiliary_info"]}`` per entry (946)."""
    return [dict(e) for e in _vbench_data()["prompts"]]


def vbench_dimensions() -> list[str]:
    """The 16 VBench dimensions, sorted."""
    return sorted({d for e in _vbench_data()["prompts"] for d in e["dimension"]})


def vbench_prompts(dimension: Optional[str] = None) -> list[str]:
    """Distinct VBench prompts in list order (944: two prompts are listed twice under different dimensions).

    ``dimension`` keeps only prompts VBench uses for that dimension (e.g. ``"color"``).
    """
    if dimension is not None and dimension not in vbench_dimensions():
        close = difflib.get_close_matches(dimension, vbench_dimensions(), n=1)
        hint = f" Did you mean 'vbench:{close[0]}'?" if close else ""
        raise ValueError(f"unknown VBench dimension {dimension!r}.{hint} Dimensions: {', '.join(vbench_dimensions())}")
    seen: dict[str, None] = {}
    for entry in _vbench_data()["prompts"]:
        if dimension is None or dimension in entry["dimension"]:
            seen.setdefault(entry["prompt"], None)
    return list(seen)


# -------------------------------------------------------------------------------------------- files
def _registered_prompts(name: str) -> Optional[list[str]]:
    """``<prefix>:...`` of a prompt source a world registered (e.g. ``shapes:train:256``), else None."""
    from .. import registry

    source = registry.lookup("prompts", name.partition(":")[0]) if ":" in name else None
    return None if source is None else _clean(source(name), name)


def _read_txt(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file '{path}' holds no prompts (blank lines and '#' comments are skipped)")
    return prompts


def _read_table(path: str, builder: str, column: str) -> list[str]:
    if builder != "parquet":
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        if not lines:
            raise ValueError(f"prompt file '{path}' is empty")
        if builder == "csv" and len(lines) < 2:
            raise ValueError(f"prompt file '{path}' has a header line but no rows")
    from datasets import load_dataset

    try:
        ds = load_dataset(builder, data_files=path, split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise ValueError(f"could not read prompts from '{path}' with the datasets '{builder}' loader "
                         f"({type(exc).__name__}: {exc}); check the file format") from exc
    if column not in ds.column_names:
        close = difflib.get_close_matches(column, ds.column_names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"prompt file '{path}' has no column '{column}'.{hint} Columns: "
                         f"{', '.join(ds.column_names)}; set the column (data.prompt_column)")
    return _clean(ds[column], f"prompt file '{path}' (column '{column}')", unit="row")


def load_prompts(source: Union[str, os.PathLike, Sequence[str]], column: str = "prompt") -> list[str]:
    """Prompts from ``source``: a file path, ``"vbench"``, ``"vbench:<dimension>"``, ``"builtin:<name>"``,
    or a list of strings (checked and stripped). ``column`` names the prompt column of table files.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unsupported format, an empty
    source, a missing column or an empty/non-string prompt -- each naming the problem and the fix.
    """
    if isinstance(source, (list, tuple)):
        return _clean(source, "the prompt list")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"prompt source must be a path, 'vbench', 'builtin:<name>' or a list of strings, "
                         f"got {type(source).__name__}")
    name = os.fspath(source).strip()
    if name == "vbench" or name.startswith("vbench:"):
        return vbench_prompts(name.partition(":")[2] or None)
    registered = _registered_prompts(name)
    if registered is not None:
        return registered
    if name.startswith("builtin:"):
        key = name.partition(":")[2]
        if key not in BUILTIN_PROMPTS:
            raise ValueError(f"unknown built-in prompt list {key!r}; available: "
                             f"{', '.join('builtin:' + k for k in BUILTIN_PROMPTS)}")
        return list(BUILTIN_PROMPTS[key])
    suffix = os.path.splitext(name)[1].lower()
    if not os.path.exists(name):
        raise FileNotFoundError(f"prompt file '{name}' not found (working directory: {os.getcwd()}); give an "
                                f"existing .txt/{'/'.join(TABLE_FORMATS)} file, 'vbench' or 'builtin:tiny'")
    if os.path.isdir(name):
        raise ValueError(f"prompt source '{name}' is a directory; give a .txt/{'/'.join(TABLE_FORMATS)} file")
    if suffix == ".txt":
        return _read_txt(name)
    if suffix in TABLE_FORMATS:
        return _read_table(name, TABLE_FORMATS[suffix], column)
    raise ValueError(f"prompt file '{name}' has an unsupported extension {suffix or '(none)'!r}; use .txt "
                     f"(one prompt per line) or {', '.join(TABLE_FORMATS)}")
