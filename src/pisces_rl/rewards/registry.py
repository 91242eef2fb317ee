"""Turn reward specs (objects, classes, names, import paths) into callables, and build the server.

Spec forms accepted by :func:`resolve_reward`:

* a callable object (function, bound method, reward instance): returned as is;
* a class: instantiated once, with the ``options`` its ``__init__`` accepts;
* a built-in name: ``"ot_quality"`` (:class:`OTQualityReward`), ``"ot_semantic"``
  (:class:`OTSemanticReward`); both need ``encoder=`` among the options;
* an import path ``"pkg.module:attribute"`` (``attribute`` may be dotted, ``"mod:Class.method"``):
  the module is imported and the attribute resolved as above.

In YAML, a reward is its spec used as a key of the ``rewards`` mapping::

    rewards:
      weights: {ot_quality: 1.0, ot_semantic: 1.0, my_pkg.rewards:sharpness: 0.5}

:func:`build_reward_server` reads a ``RewardsConfig`` (or any object / mapping with its fields),
loads the encoder once, shares it between the two OT rewards and returns a :class:`RewardServer`.
Heavy modules (transformers, the encoders) are only imported when a built-in reward is used.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union

import torch

from .base import RewardError

__all__ = ["BUILTIN_REWARDS", "resolve_reward", "build_reward_server"]

BUILTIN_REWARDS: dict[str, str] = {
    "ot_quality": "pisces_rl.rewards.ot_quality:OTQualityReward",
    "ot_semantic": "pisces_rl.rewards.ot_semantic:OTSemanticReward",
}
"""Short names usable as reward specs, and the import path each one stands for."""

_FORM_HINT = ("use a built-in name ({builtins}) or an import path 'package.module:function_or_class'"
              .format(builtins=", ".join(sorted(BUILTIN_REWARDS))))


def _import_attribute(spec: str) -> Any:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise RewardError(f"reward spec '{spec}' is neither a built-in reward nor an import path; {_FORM_HINT}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise RewardError(
                f"reward spec '{spec}': cannot import module '{module_name}' ({exc}); install the package "
                "or add its folder to PYTHONPATH, and check the spelling"
            ) from exc
        raise RewardError(
            f"reward spec '{spec}': importing module '{module_name}' failed because one of its own imports "
            f"is missing ({exc}); install that dependency"
        ) from exc
    except Exception as exc:
        raise RewardError(
            f"reward spec '{spec}': importing module '{module_name}' raised {type(exc).__name__}: {exc}; "
            "fix the error in that module"
        ) from exc
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RewardError(
                f"reward spec '{spec}': '{module_name}' has no attribute '{attr_path}'; callables defined "
                f"there: {', '.join(public) or 'none'}"
            )
        target = getattr(target, part)
    return target


def _instantiate(cls: type, spec_label: str, options: dict[str, Any]) -> Any:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = options if takes_any else {k: v for k, v in options.items() if k in params}
    missing = [name for name, p in params.items()
               if p.default is inspect.Parameter.empty and name not in accepted
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        hint = (" build the OT rewards with build_reward_server(cfg), which loads the encoder, or pass encoder=..."
                if "encoder" in missing else f" pass {', '.join(m + '=...' for m in missing)} as options")
        raise RewardError(
            f"reward '{spec_label}': {cls.__name__}.__init__ needs {', '.join(missing)};{hint}"
        )
    try:
        instance = cls(**accepted)
    except Exception as exc:
        raise RewardError(
            f"reward '{spec_label}': constructing {cls.__name__}({', '.join(accepted)}) raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not callable(instance):
        raise RewardError(
            f"reward '{spec_label}': {cls.__name__} instances are not callable; give the class a "
            "__call__(self, videos, prompts, **kwargs) method"
        )
    return instance


def resolve_reward(spec: Union[str, Callable, type], **options: Any) -> Callable:
    """Resolve a reward spec into a callable ``reward(videos[B, F, C, H, W], prompts, **kw) -> [B]``.

    ``options`` are constructor arguments offered to a class spec: it receives those its
    ``__init__`` accepts (all of them if it takes ``**kwargs``), so one pool, e.g.
    ``encoder=..., device=...``, can be offered to every spec. Functions and instances take no
    construction options and are returned unchanged.

    Raises :class:`RewardError` naming the spec and the fix for an unknown name, a module that
    cannot be imported, a missing attribute, a non-callable target, or a failing constructor.
    """
    if isinstance(spec, type):
        return _instantiate(spec, spec.__name__, options)
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise RewardError(
            f"reward spec {spec!r} has type {type(spec).__name__}; pass a callable, a class, or a string; {_FORM_HINT}"
        )
    label = spec
    spec = spec.strip()
    target = _import_attribute(BUILTIN_REWARDS.get(spec, spec))
    if isinstance(target, type):
        return _instantiate(target, label, options)
    if not callable(target):
        raise RewardError(
            f"reward spec '{label}' points to a {type(target).__name__}, which is not callable; point it at "
            "a function reward(videos, prompts, **kwargs) or a reward class"
        )
    return target


_CONFIG_DEFAULTS: dict[str, Any] = {
    "weights": {"ot_quality": 1.0, "ot_semantic": 1.0},
    "encoder": "tiny",
    "ot_map": None,
    "use_ot": True,
    "gamma": 0.2,
    "eta": 0.2,
    "epsilon": 0.05,
    "mass": 0.9,
    "cost_embeddings": "layer_qk",
    "num_frames": None,
    "temporal_windows": 1,
    "max_batch_size": 8,
    "max_frames_per_call": None,
    "on_error": "raise",
}


def _read_config(cfg: Any) -> SimpleNamespace:
    """Fields of a RewardsConfig-like object or mapping, defaults filled in (schema in docs/architecture.md)."""
    if cfg is None:
        return SimpleNamespace(**_CONFIG_DEFAULTS)
    if isinstance(cfg, Mapping):
        if cfg and not any(k in _CONFIG_DEFAULTS for k in cfg):  # shorthand: the mapping *is* the weights
            cfg = {"weights": dict(cfg)}
        unknown = sorted(set(cfg) - set(_CONFIG_DEFAULTS))
        if unknown:
            raise RewardError(
                f"unknown rewards config key(s) {unknown}; valid keys: {sorted(_CONFIG_DEFAULTS)} "
                "(reward specs go under 'weights')"
            )
        return SimpleNamespace(**{**_CONFIG_DEFAULTS, **cfg})
    return SimpleNamespace(**{k: getattr(cfg, k, d) for k, d in _CONFIG_DEFAULTS.items()})


def _load_encoder(source: Any, device: Optional[torch.device]) -> Any:
    """``"tiny"`` / ``"tiny:SEED"`` / a checkpoint dir -> a frozen encoder on ``device``; objects pass through."""
    if not isinstance(source, str):  # an already-built encoder object
        if device is not None and hasattr(source, "to"):
            source = source.to(device) or source
        return source
    from pisces_rl.encoders import load_encoder

    try:
        return load_encoder(source, device=device)
    except Exception as exc:
        raise RewardError(
            f"could not load the reward encoder from rewards.encoder={source!r} ({type(exc).__name__}: {exc}); "
            "set it to 'tiny' or to a directory saved with BlipVideoTextEncoder.save_pretrained"
        ) from exc


def _load_ot_map(path: str, device: Optional[torch.device]) -> Any:
    from pisces_rl.ot.neural_map import load_map
    from pisces_rl.registry import resolve_artifact

    try:
        ot_map = load_map(resolve_artifact("ot_map", path) or path)
    except Exception as exc:
        raise RewardError(
            f"could not load the OT map from rewards.ot_map={path!r} ({type(exc).__name__}: {exc}); point it at a "
            "directory written by NeuralOTMap.save_pretrained, 'shapes' after `make world`, or set it to null to use raw "
            "text embeddings"
        ) from exc
    if isinstance(ot_map, torch.nn.Module):
        ot_map.eval().requires_grad_(False)
    if device is not None and hasattr(ot_map, "to"):
        ot_map = ot_map.to(device) or ot_map
    return ot_map


def build_reward_server(cfg: Any = None, device: Union[str, torch.device, None] = None, logger: Any = None):
    """Build the :class:`RewardServer` described by a ``RewardsConfig``.

    ``cfg`` may be a ``pisces_rl.config.RewardsConfig``, any object with its attributes, a mapping
    of its fields, or the ``weights`` mapping itself (``{"ot_quality": 1.0, "pkg.mod:fn": 0.5}``);
    missing fields take the schema defaults. The encoder (``"tiny"`` or a checkpoint dir) is loaded
    once, frozen, moved to ``device`` and shared by ``ot_quality`` and ``ot_semantic``; the OT map
    is loaded only for ``ot_quality`` with ``use_ot=True``. Other specs are resolved with
    :func:`resolve_reward`; reward classes are offered ``device=``. ``device`` also becomes the
    server's default device for rewards that declare none.
    """
    from .server import RewardServer

    c = _read_config(cfg)
    if not isinstance(c.weights, Mapping) or not c.weights:
        raise RewardError(
            f"rewards.weights must be a non-empty mapping of reward spec -> weight, got {c.weights!r}; "
            "e.g. {ot_quality: 1.0, ot_semantic: 1.0}"
        )
    device = torch.device(device) if device is not None else None
    uses_builtin = [name for name in c.weights if str(name).strip() in BUILTIN_REWARDS]
    encoder = _load_encoder(c.encoder, device) if uses_builtin else None
    ot_map = None
    if "ot_quality" in uses_builtin and c.use_ot and c.ot_map is not None:
        ot_map = c.ot_map if not isinstance(c.ot_map, str) else _load_ot_map(c.ot_map, device)
    builtin_options = {"encoder": encoder, "ot_map": ot_map, "use_ot": c.use_ot, "gamma": c.gamma,
                       "eta": c.eta, "epsilon": c.epsilon, "mass": c.mass, "cost_embeddings": c.cost_embeddings,
                       "device": device}
    rewards = {}
    for spec, weight in c.weights.items():
        is_builtin = str(spec).strip() in BUILTIN_REWARDS
        options = builtin_options if is_builtin else ({"device": device} if device is not None else {})
        rewards[str(spec)] = (resolve_reward(spec, **options), weight)
    return RewardServer(rewards, max_batch_size=c.max_batch_size, on_error=c.on_error,
                        num_frames=c.num_frames, temporal_windows=c.temporal_windows,
                        logger=logger, device=device, max_frames_per_call=c.max_frames_per_call)
