"""Loading configs: YAML file, then dotted ``key=value`` overrides, then validation; saving and ``--help``.

Works for any config dataclass tree built from :mod:`pisces_rl.config.base` (``GRPOConfig`` today, a
``BackpropConfig`` later)::

    cfg = load_config(GRPOConfig, "recipes/configs/grpo_tiny_cpu.yaml",
                      ["train.max_steps=2", "output_dir=runs/x", "model.lora_target_modules=[to_q,to_k]"])

Override syntax (applied left to right, after the file):

* ``section.field=value``: the value is parsed as YAML (``[a,b]``, ``{k: 1.0}``, ``null``, ``1e-4``) and
  checked against the field's type. ``str`` fields take the text verbatim (``output_dir=2024`` stays a
  string, ``logging.report_to=none`` is not null); quote it to force YAML parsing. An ``Optional[str]``
  field takes ``null``/``~``/``None`` as null.
* ``section={field: value, ...}``: sets several fields of a section; other fields keep their values.
* a renamed field's old name (``train.group_size=8``) sets the new one (``train.num_generations``) and warns.
* ``mapping.key=value`` for a ``dict`` field: everything after the field name is *one* key, dots and
  colons included, so ``rewards.weights.my_pkg.rewards:sharpness=0.5`` adds or changes the weight of the
  reward ``my_pkg.rewards:sharpness``; ``rewards.weights.ot_semantic=null`` removes an entry and
  ``rewards.weights={ot_quality: 1.0}`` replaces the whole mapping.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import yaml

from .base import (ConfigError, coerce, config_keys, field_types, from_dict, merge_into, renamed_key, to_plain,
                   type_name, union_args, unknown_key_error)

__all__ = ["load_config", "apply_overrides", "load_yaml", "to_dict", "save_yaml", "describe", "parse_cli"]

_NULLS = {"null", "Null", "NULL", "~", "None"}


def load_yaml(path: Union[str, os.PathLike]) -> dict:
    """Read a YAML config file into a dict (an empty file gives ``{}``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found (working directory: {os.getcwd()}); "
                          "pass the path of an existing YAML file, e.g. --config recipes/configs/grpo_tiny_cpu.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections at the top level, "
                          f"got a {type(data).__name__}")
    return dict(data)


def load_config(cls: type, path: Union[str, os.PathLike, None] = None,
                overrides: Union[Sequence[str], Mapping[str, Any], str] = ()) -> Any:
    """Build and validate config ``cls`` from the defaults, an optional YAML file and overrides.

    ``overrides`` is a list of ``"key=value"`` strings (see the module docstring) or a mapping of dotted
    keys to Python values. Raises :class:`ConfigError` naming the key and the fix.
    """
    data = load_yaml(path) if path is not None else {}
    cfg = from_dict(cls, data)
    cfg = apply_overrides(cfg, overrides)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def apply_overrides(cfg: Any, overrides: Union[Sequence[str], Mapping[str, Any], str] = ()) -> Any:
    """A copy of ``cfg`` with the overrides applied in order (no validation; call ``validate()``)."""
    cfg = copy.deepcopy(cfg)
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            _apply(cfg, str(key), value, raw=False)
        return cfg
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value; write e.g. train.max_steps=2")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has no key; write e.g. train.max_steps=2")
        _apply(cfg, key, text.strip(), raw=True)
    return cfg


def _takes_str(tp: Any) -> bool:
    """``str`` or ``Optional[str]``: such fields take override text verbatim."""
    args = union_args(tp)
    return tp is str or (args is not None and str in args and all(a in (str, type(None)) for a in args))


def _parse(value: Any, tp: Any, key: str, raw: bool) -> Any:
    """Parse override text (``raw``) or take a Python value, then coerce it to ``tp``."""
    if not raw:
        return coerce(value, tp, key)
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    if _takes_str(tp) and not quoted:
        if value in _NULLS and type(None) in typing.get_args(tp):
            return None
        return value
    return coerce(_yaml_value(value, key), tp, key)


def _yaml_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {text!r} as a YAML value ({getattr(exc, 'problem', exc)})", key) from None


def _apply(cfg: Any, key: str, value: Any, raw: bool) -> None:
    parts = key.split(".")
    obj = cfg
    for i, name in enumerate(parts):
        prefix = ".".join(parts[:i])
        types_ = field_types(type(obj))
        if name not in types_:
            name = renamed_key(type(obj), name, prefix) or name   # deprecated alias -> new name, with a warning
            parts[i] = name
        if name not in types_:
            raise unknown_key_error(name, type(obj), prefix)
        full, tp, current, rest = ".".join(parts[: i + 1]), types_[name], getattr(obj, name), parts[i + 1:]
        if dataclasses.is_dataclass(current):
            if rest:
                obj = current
                continue
            mapping = _yaml_value(value, full) if raw else value
            if not isinstance(mapping, Mapping):
                raise ConfigError(f"is a section; set one of its keys (e.g. {config_keys(tp, full + '.')[0]}=...) "
                                  f"or give a mapping ({full}={{key: value}})", full)
            merge_into(current, mapping, full)
            return
        if not rest:
            setattr(obj, name, _parse(value, tp, full, raw))
            return
        if typing.get_origin(tp) is not dict or not isinstance(current, dict):
            raise ConfigError(f"has no sub-key '{'.'.join(rest)}' (its type is {type_name(tp)}, not a mapping)", full)
        entry = ".".join(rest)  # the rest of the path is one mapping key: dots and colons are part of it
        value_tp = (typing.get_args(tp) or (Any, Any))[1]
        updated = dict(current)
        text_is_null = raw and value.strip() in _NULLS | {""}
        if value is None or text_is_null:
            if entry not in updated:
                raise ConfigError(f"cannot remove '{entry}': not present (entries: {', '.join(map(str, updated)) or 'none'})",
                                  full)
            del updated[entry]
        else:
            updated[entry] = _parse(value, value_tp, f"{full}.{entry}", raw)
        setattr(obj, name, updated)
        return


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples become lists)."""
    return to_plain(cfg)


def save_yaml(cfg: Any, path: Union[str, os.PathLike]) -> str:
    """Write the resolved config as YAML (directories created); ``load_config`` reads it back unchanged."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = (f"# Resolved {type(cfg).__name__} of this run. Reload it with\n"
              f"#   load_config({type(cfg).__name__}, '{os.path.basename(path)}')\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(header)
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=False, allow_unicode=True)
    os.replace(tmp, path)
    return path


def describe(cls_or_cfg: Any) -> str:
    """Every dotted key with its type, default (or current value for an instance), choices and help."""
    is_instance = not isinstance(cls_or_cfg, type)
    root = cls_or_cfg if is_instance else cls_or_cfg()
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        types_ = field_types(type(obj))
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value, key = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                lines.append(f"\n[{key}] {f.metadata.get('help', '')}".rstrip())
                walk(value, key + ".")
                continue
            choices = f.metadata.get("choices")
            extra = f"  (one of: {', '.join(choices)})" if choices else ""
            shown = yaml.safe_dump(to_dict(value) if isinstance(value, tuple) else value,
                                   default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
            lines.append(f"  {key}: {type_name(types_[f.name])} = {shown}{extra}")
            if f.metadata.get("help"):
                lines.append(f"      {f.metadata['help']}")
        renamed = getattr(type(obj), "_renamed", {})
        if renamed:
            lines.append("  deprecated names (still read, with a warning): "
                         + ", ".join(f"{prefix}{o} -> {prefix}{n}" for o, n in renamed.items()))

    walk(root, "")
    title = f"{type(root).__name__} ({'current values' if is_instance else 'defaults'})"
    return title + "\n" + "\n".join(lines).lstrip("\n") + "\n"


def parse_cli(cls: type, argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> Any:
    """Recipe command line: ``[--config PATH] [key=value ...]``; ``--help`` lists every field.

    Prints the problem and exits with status 2 on a bad command line or config (like ``argparse``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "recipe")
    usage = f"usage: {prog} [--config PATH] [key=value ...]"
    path: Optional[str] = None
    overrides: list[str] = []

    def fail(message: str):
        print(f"{usage}\n{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(f"{usage}\n\nOverride any key below as key=value, e.g. train.max_steps=2 output_dir=runs/x\n")
            print(describe(cls))
            raise SystemExit(0)
        if arg == "--config" or arg.startswith("--config="):
            if path is not None:
                fail("--config given twice")
            if arg == "--config":
                if i + 1 >= len(argv):
                    fail("--config needs a path")
                i += 1
                path = argv[i]
            else:
                path = arg.split("=", 1)[1]
        elif "=" in arg:
            overrides.append(arg[2:] if arg.startswith("--") else arg)
        else:
            fail(f"unexpected argument {arg!r}; give --config PATH and key=value overrides")
        i += 1
    try:
        return load_config(cls, path, overrides)
    except ConfigError as exc:
        fail(str(exc))
