"""Typed-config machinery shared by every pisces_rl config: errors, fields with help, type coercion.

A config is a tree of dataclasses. Leaves are plain values annotated with ``bool``, ``int``, ``float``,
``str``, ``Optional[...]``, ``list[X]``, ``tuple[...]`` or ``dict[str, X]``; inner nodes ("sections") are
dataclasses themselves. Every field has a default and a help text (:func:`option`, :func:`section`), so a
config can always be built from nothing and printed with its documentation.

Values coming from YAML are coerced against the annotation with a few deliberate rules:

* ``int -> float`` is fine, and so are strings that parse as numbers (``"1e-4"`` -- YAML 1.1 reads
  ``1e-4`` without a dot as a string);
* a float with an integral value is accepted for an ``int`` (``1000.0``), any other float is not;
* ``bool`` is strict: only ``true``/``false`` (never ``0``/``1``, never a string);
* a ``str`` field does not take numbers or booleans (quote them in YAML);
* lists and tuples take YAML sequences; a fixed-length tuple checks the length.

Renamed fields keep their old names as deprecated aliases (``ConfigBase._renamed``): YAML keys, ``key=value``
overrides, constructor keywords and attribute access with the old name still work, with one ``FutureWarning``
line naming the new key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Optional, Union

__all__ = [
    "ConfigError", "ConfigBase", "option", "section", "require", "coerce", "type_name",
    "from_dict", "merge_into", "config_keys", "field_types", "suggest", "validate_config",
    "unknown_key_error", "union_args", "to_plain", "renamed_key",
]


class ConfigError(ValueError):
    """A config problem: unknown key, wrong type or inconsistent value. ``key`` is the dotted path, if any."""

    def __init__(self, message: str, key: Optional[str] = None):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error, with ``prefix`` prepended to its key (used when a section reports a problem)."""
        if not prefix:
            return self
        return ConfigError(self.message, f"{prefix}.{self.key}" if self.key else prefix)


def option(default: Any, help: str, *, choices: Optional[Iterable[str]] = None) -> Any:
    """A documented dataclass field. Mutable defaults (list/dict) are copied per instance.

    ``choices``, if given, restricts the value to those strings; :func:`validate_config` checks it.
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A documented field holding a nested config dataclass, default-constructed."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message, key)


def _closest(word: Any, candidates: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: Any, candidates: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest candidate, or an empty string."""
    match = _closest(word, candidates)
    return f" Did you mean '{match}'?" if match else ""


class _ConfigMeta(type):
    """Lets a config class take the deprecated names of its renamed fields as constructor keywords."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        for old, new in getattr(cls, "_renamed", {}).items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{cls.__name__}() got both '{old}' and its new name '{new}'; keep only '{new}'")
                _warn_renamed(f"{cls.__name__}({old}=...)", f"{cls.__name__}({new}=...)")
                kwargs[new] = kwargs.pop(old)
        return super().__call__(*args, **kwargs)


class ConfigBase(metaclass=_ConfigMeta):
    """Base class of config dataclasses: generic validation and ``to_dict``.

    Subclasses override :meth:`_check` for their own ranges and cross-field rules, raising
    :class:`ConfigError` with keys relative to themselves (``require(x > 0, "epsilon", ...)``).
    A section may set the class attribute ``_shorthand_field`` to the name of a mapping field: a YAML
    mapping for the section whose keys are *not* field names is then read as that field's value.
    A section may set ``_renamed = {"old_name": "new_name"}`` (a plain class attribute, not a field): the old
    name keeps working in YAML, overrides, constructor keywords and attribute access, with a ``FutureWarning``
    naming the new key.
    """

    _shorthand_field: Optional[str] = None
    _renamed: typing.ClassVar[dict] = {}

    def __getattr__(self, name: str) -> Any:          # only reached when normal lookup fails
        new = type(self)._renamed.get(name)
        if new is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        _warn_renamed(f"{type(self).__name__}.{name}", f"{type(self).__name__}.{new}", stacklevel=2)
        return getattr(self, new)

    def __setattr__(self, name: str, value: Any) -> None:
        new = type(self)._renamed.get(name)
        if new is not None:
            _warn_renamed(f"{type(self).__name__}.{name}", f"{type(self).__name__}.{new}", stacklevel=2)
            name = new
        object.__setattr__(self, name, value)

    def validate(self):
        """Check types, choices and ranges of this config and all nested sections; returns ``self``."""
        validate_config(self)
        return self

    def _check(self) -> None:
        """Section-specific checks (override)."""

    def to_dict(self) -> dict:
        """Plain nested dict (tuples become lists), ready for YAML/JSON and experiment trackers."""
        return to_plain(self)


# ----------------------------------------------------------------------------------------------- types
@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(f"cannot resolve the field types of {cls.__name__} ({exc}); define config classes at "
                        "module level so that their annotations can be resolved") from None
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def union_args(tp: Any) -> Optional[tuple]:
    """Members of a ``Union``/``X | None`` annotation, or ``None`` if ``tp`` is not a union."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def type_name(tp: Any) -> str:
    """Readable name of an annotation: ``float``, ``list[str]``, ``str or null``."""
    if tp is type(None):
        return "null"
    args = union_args(tp)
    if args is not None:
        return " or ".join(type_name(a) for a in args)
    origin = typing.get_origin(tp)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _type_error(value: Any, tp: Any, key: str, hint: str = "") -> ConfigError:
    shown = "null" if value is None else f"{type(value).__name__} {value!r}"
    return ConfigError(f"expected {type_name(tp)}, got {shown}{hint}", key)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where it is safe; raise :class:`ConfigError`."""
    if tp is Any:
        return value
    args = union_args(tp)
    if args is not None:
        options = [a for a in args if a is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            raise _type_error(value, tp, key)
        for option_tp in options:
            try:
                return coerce(value, option_tp, key)
            except ConfigError:
                if len(options) == 1:
                    raise
        raise _type_error(value, tp, key)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if value is None:
        raise _type_error(value, tp, key, " (null is not allowed here)")
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key, " (write true or false)")
    if tp is int:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, tp, key)
        if isinstance(value, float):
            if not value.is_integer():
                raise _type_error(value, tp, key, " (not a whole number)")
            value = int(value)
        return value
    if tp is float:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, tp, key)
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        hint = "YAML reads yes/no/on/off as booleans; " if isinstance(value, bool) else ""
        raise _type_error(value, tp, key, f" ({hint}quote the value to keep it a string)")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key, f" (write a list, e.g. {key}=[a,b])")
        return [coerce(v, targs[0] if targs else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key, f" (write a list, e.g. {key}=[a,b])")
        if len(targs) == 2 and targs[1] is Ellipsis:
            return tuple(coerce(v, targs[0], f"{key}[{i}]") for i, v in enumerate(value))
        if targs and len(value) != len(targs):
            raise _type_error(value, tp, key, f" (needs exactly {len(targs)} items)")
        return tuple(coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, targs or [Any] * len(value))))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(value, tp, key, f" (write a mapping, e.g. {key}={{name: 1.0}})")
        ktp, vtp = targs if targs else (Any, Any)
        return {coerce(k, ktp, f"{key} (a key)"): coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(value, tp, key)


def _number(text: str) -> Any:
    """``"1e-4"`` -> 0.0001, ``"3"`` -> 3; anything else is returned unchanged (and rejected by the caller)."""
    for parse in (int, float):
        try:
            return parse(text.strip())
        except ValueError:
            pass
    return text


# ------------------------------------------------------------------------------------ renamed keys
def _warn_renamed(old: str, new: str, stacklevel: int = 2) -> None:
    warnings.warn(f"'{old}' is deprecated, use '{new}' (same meaning)", FutureWarning, stacklevel=stacklevel + 1)


def renamed_key(cls: type, name: Any, prefix: str = "") -> Optional[str]:
    """The new field name if ``name`` is a deprecated alias of a field of ``cls`` (warns), else ``None``."""
    new = getattr(cls, "_renamed", {}).get(name)
    if new is not None:
        dot = f"{prefix}." if prefix else ""
        _warn_renamed(f"{dot}{name}", f"{dot}{new}", stacklevel=2)
    return new


# ------------------------------------------------------------------------------------ building a tree
def config_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config class, depth first (``["model.pretrained", ..., "output_dir"]``)."""
    keys = []
    for name, tp in field_types(cls).items():
        full = f"{prefix}{name}"
        keys.extend(config_keys(tp, full + ".") if dataclasses.is_dataclass(tp) else [full])
    return keys


def unknown_key_error(name: Any, cls: type, prefix: str) -> ConfigError:
    """ConfigError for an unknown key under ``prefix``, with a suggestion and the valid keys there."""
    names = list(field_types(cls))
    dot = f"{prefix}." if prefix else ""
    guess = _closest(name, names)
    if guess is None:  # maybe it belongs to a nested section: ``max_steps`` -> ``train.max_steps``
        leaves = config_keys(cls)
        leaf = _closest(name, [k.rsplit(".", 1)[-1] for k in leaves])
        guess = next((k for k in leaves if k.rsplit(".", 1)[-1] == leaf), None) if leaf else None
    hint = f" Did you mean '{dot}{guess}'?" if guess else ""
    shorthand = getattr(cls, "_shorthand_field", None)
    if shorthand:
        hint += f" (entries of '{dot}{shorthand}' are set with {dot}{shorthand}.<name>=<value>)"
    where = f"in '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"unknown key '{dot}{name}'.{hint} Valid keys {where}: {', '.join(names)}")


def _expand_shorthand(cls: type, data: Mapping, prefix: str) -> Mapping:
    field_name = getattr(cls, "_shorthand_field", None)
    if not field_name or not data:
        return data
    names = set(field_types(cls))
    inside = [str(k) for k in data if k in names]
    outside = [str(k) for k in data if k not in names]
    if not outside:
        return data  # full form
    if not inside:
        return {field_name: dict(data)}  # shorthand: the whole mapping is the value of that field
    hints = "".join(f" For '{k}':{suggest(k, names)}" for k in outside if suggest(k, names))
    raise ConfigError(
        f"mixes {cls.__name__} fields ({', '.join(inside)}) with other keys ({', '.join(outside)}).{hints} "
        f"Give either the full form ({', '.join(sorted(names))}) or only {{name: value}} pairs, which are read "
        f"as '{field_name}'.", prefix or None)


def merge_into(obj: Any, data: Any, prefix: str = "") -> Any:
    """Set the fields of config ``obj`` from mapping ``data`` (recursing into sections); returns ``obj``."""
    cls = type(obj)
    if data is None:  # an empty YAML section (``train:`` with everything commented out)
        return obj
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}",
                          prefix or None)
    data = _expand_shorthand(cls, data, prefix)
    types_ = field_types(cls)
    for name, value in data.items():
        if name not in types_:
            new = renamed_key(cls, name, prefix)
            if new is None:
                raise unknown_key_error(name, cls, prefix)
            if new in data:
                dot = f"{prefix}." if prefix else ""
                raise ConfigError(f"both '{dot}{name}' and its new name '{dot}{new}' are set; keep only '{dot}{new}'",
                                  f"{dot}{name}")
            name = new
        key = f"{prefix}.{name}" if prefix else name
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and not isinstance(value, type(current)):
            merge_into(current, value, key)
        else:
            setattr(obj, name, coerce(value, types_[name], key))
    return obj


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build config class ``cls`` from a nested mapping; missing keys keep their defaults."""
    try:
        obj = cls()
    except TypeError as exc:
        raise TypeError(f"{cls.__name__}: every config field needs a default ({exc})") from None
    return merge_into(obj, data, prefix)


def validate_config(cfg: Any, prefix: str = "") -> None:
    """Type-check every field, check ``choices``, then run ``_check`` of each section (innermost first)."""
    types_ = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_config(value, key)
            continue
        coerce(value, types_[f.name], key)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{value!r} is not one of {', '.join(choices)}.{suggest(value, choices)}", key)
    check = getattr(cfg, "_check", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise exc.under(prefix) from None


def to_plain(value: Any) -> Any:
    """Plain nested dicts/lists of a config tree (tuples become lists), for YAML and trackers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value
