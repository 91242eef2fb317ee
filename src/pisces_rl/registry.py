"""Names that plug into the core: a world (or any package) registers what it provides; the core only looks it up.

The core (``models``, ``encoders``, ``rewards``, ``trainer``, ``data``, ``config``) never imports a world. A world
registers its names here, and is found through the entry-point group ``pisces_rl.plugins`` (``setup.cfg``): each
entry point is a callable that registers its names, run once, the first time any name is looked up. ShapesWorld
declares ``shapes = pisces_rl.worlds.shapes.plugin:register``; a third-party world does the same in its own
package metadata. ``register`` can also be called directly (tests, notebooks).

Kinds, and what a registered value is:

* ``"model"`` / ``"encoder"`` / ``"ot_map"``: ``name -> callable() -> directory`` (``model.pretrained: shapes``,
  ``rewards.encoder: shapes``, ``rewards.ot_map: shapes`` / ``shapes:l2``); the callable raises
  ``FileNotFoundError`` with the fix when the artifact is not there;
* ``"prompts"``: ``prefix -> callable(spec) -> list[str]`` for prompt sources ``<prefix>:...``
  (``data.prompts: shapes:train:256``);
* ``"judge"``: ``name -> callable(videos [B, F, C, H, W], prompts) -> {metric: value}`` (``logging.judge``);
* ``"videos"``: ``name -> callable(num_videos, num_frames, height, width) -> datasets.Dataset``
  (``train.video_dataset`` of direct backprop).

Example::

    >>> from pisces_rl import registry
    >>> registry.register("judge", "brightness", lambda videos, prompts: {"total": float(videos.mean())})
    >>> registry.lookup("judge", "brightness") is not None
    True
"""
from __future__ import annotations

import logging
from typing import Any, Optional

__all__ = ["KINDS", "register", "unregister", "lookup", "names", "resolve_artifact", "load_plugins"]

KINDS = ("model", "encoder", "ot_map", "prompts", "judge", "videos")
ENTRY_POINT_GROUP = "pisces_rl.plugins"

_registry: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_plugins_loaded = False
logger = logging.getLogger("pisces_rl.registry")


def _kind(kind: str) -> dict:
    if kind not in _registry:
        raise ValueError(f"unknown registry kind {kind!r}; use one of {KINDS}")
    return _registry[kind]


def register(kind: str, name: str, value: Any) -> None:
    """Make ``name`` mean ``value`` for ``kind`` (see the module docstring); a later registration replaces it."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a registered name must be a non-empty string, got {name!r}")
    _kind(kind)[name] = value


def unregister(kind: str, name: str) -> None:
    """Remove ``name`` from ``kind`` (no error if absent)."""
    _kind(kind).pop(name, None)


def load_plugins() -> None:
    """Run every ``pisces_rl.plugins`` entry point once (they call :func:`register`). A plugin that fails to load
    is logged and skipped, so one broken package does not stop runs that do not use it."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()()
        except Exception as exc:  # noqa: BLE001 - reported, the rest still load
            logger.warning("pisces_rl plugin %r (%s) failed to load: %s: %s", entry.name, entry.value,
                           type(exc).__name__, exc)


def lookup(kind: str, name: Any) -> Optional[Any]:
    """The value registered as ``name`` for ``kind``, or None (plugins are loaded on first use)."""
    table = _kind(kind)
    if not isinstance(name, str):
        return None
    if name not in table:
        load_plugins()
    return table.get(name)


def names(kind: str) -> tuple:
    """Every name registered for ``kind`` (plugins included), sorted."""
    load_plugins()
    return tuple(sorted(_kind(kind)))


def resolve_artifact(kind: str, name: Any) -> Optional[str]:
    """The directory a registered ``model`` / ``encoder`` / ``ot_map`` name stands for, or None if ``name`` is not
    registered (then it is a path, hub id or built-in name for the caller)."""
    if kind not in ("model", "encoder", "ot_map"):
        raise ValueError(f"{kind!r} is not an artifact kind; use model, encoder or ot_map")
    resolver = lookup(kind, name)
    return None if resolver is None else str(resolver())
