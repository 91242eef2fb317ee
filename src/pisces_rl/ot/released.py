"""Load an OT map released with the PISCES code as a :class:`~pisces_rl.ot.NeuralOTMap`.

The released maps (roar-ai/pisces ``fastvideo/optimal_transport.py``, trained by ``train_OT_map.py``) are
``torch.save``-d state dicts of ``OptimalTransportMap``: ``net = Sequential(Linear, ReLU, LayerNorm, Linear, ReLU,
LayerNorm, Linear)``, keys ``net.{0,2,3,5,6}.{weight,bias}``. They come either raw (``ot_map_*.pt``,
``pretrained/OT_map_156000.pt``) or inside a training checkpoint under ``"T"`` (with the critic under ``"f"``);
the released loader also accepts ``"ot_map"``, ``"state_dict"`` and ``"model"``, and strips the ``module.``
(DDP) and ``_orig_mod.`` (``torch.compile``) prefixes. This module does the same, maps ``net.*`` to
``transport.*`` (and a critic under ``"f"`` to ``critic.*``), and infers ``dim`` and ``hidden`` from the
weights. Only tensors are unpickled (``torch.load(weights_only=True)``).

Input normalisation: the released trainer fits ``T`` on InternVideo2 ``text_proj`` features as they come (no L2
normalisation), so a released map is loaded with ``input_normalization="none"`` unless told otherwise.

Example::

    >>> ot_map = load_released_ot_map("pretrained/OT_map_156000.pt")     # NeuralOTMap(dim=512, hidden=1024)
    >>> ot_map(text_cls).shape                                           # [B, 512] -> [B, 512]
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from .neural_map import NeuralOTMap

__all__ = ["extract_ot_map_state_dict", "load_released_ot_map"]

CONTAINER_KEYS = ("T", "ot_map", "state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")
RELEASED_KEYS = {f"net.{i}.{p}" for i in (0, 2, 3, 5, 6) for p in ("weight", "bias")}


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()))


def _strip(state: Mapping) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def extract_ot_map_state_dict(checkpoint: Any) -> dict[str, Tensor]:
    """The ``OptimalTransportMap`` state dict (``net.*`` keys, prefixes stripped) of a released checkpoint.

    ``checkpoint`` is a raw state dict or a mapping holding one under ``"T"``, ``"ot_map"``, ``"state_dict"`` or
    ``"model"`` (first match wins, as in the released ``extract_ot_map_state_dict``).
    """
    state = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in CONTAINER_KEYS:
            if _is_state_dict(checkpoint.get(key)):
                state = checkpoint[key]
                break
    if not _is_state_dict(state):
        raise ValueError("a released PISCES OT map must be a state dict of tensors, raw or under one of "
                         f"{CONTAINER_KEYS}; got {type(checkpoint).__name__}"
                         + (f" with keys {sorted(checkpoint)[:8]}" if isinstance(checkpoint, Mapping) else ""))
    return _strip(state)


def _to_sequential(state: dict[str, Tensor], prefix: str, what: str) -> dict[str, Tensor]:
    if set(state) != RELEASED_KEYS:
        raise ValueError(f"the {what} has keys {sorted(state)}, not the released 3-layer MLP's "
                         f"{sorted(RELEASED_KEYS)} (Linear, ReLU, LayerNorm, Linear, ReLU, LayerNorm, Linear)")
    return {prefix + key[len("net."):]: value for key, value in state.items()}


def load_released_ot_map(source: Union[str, Path, Mapping], input_normalization: str = "none",
                         device: Union[str, torch.device] = "cpu") -> NeuralOTMap:
    """A :class:`NeuralOTMap` (eval mode, on ``device``) holding a released PISCES OT map.

    Args:
        source: path of a ``torch.save``-d checkpoint, or the loaded object (see the module docstring).
        input_normalization: ``"none"`` (default: as the released trainer fits ``T``) or ``"l2"``.
        device: where to put the map.

    The critic ``f`` is loaded too when the checkpoint holds it under ``"f"``; otherwise it keeps its fresh
    initialisation (it is not used to map text).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"released OT map {str(path)!r} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    else:
        checkpoint = source
    transport = _to_sequential(extract_ot_map_state_dict(checkpoint), "transport.", "OT map")
    hidden, dim = transport["transport.0.weight"].shape
    if transport["transport.6.weight"].shape != (dim, hidden):
        raise ValueError(f"the OT map maps {dim} -> {transport['transport.6.weight'].shape[0]} dims; "
                         "a text->video map must keep the embedding size")
    ot_map = NeuralOTMap(dim=dim, hidden=hidden, layout="linear_relu_norm", input_normalization=input_normalization)
    state = {**{k: v for k, v in ot_map.state_dict().items() if k.startswith("critic.")}, **transport}
    critic = checkpoint.get("f") if isinstance(checkpoint, Mapping) else None
    if _is_state_dict(critic):
        state.update(_to_sequential(_strip(critic), "critic.", "critic"))
    ot_map.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return ot_map.to(device).eval()
