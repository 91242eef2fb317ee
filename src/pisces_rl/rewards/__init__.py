"""Rewards: the plug-in contract, the RewardServer, the registry and the PISCES OT rewards.

``OTQualityReward`` and ``OTSemanticReward`` are imported on first access, so importing the server
or writing a plain-function reward does not pull in transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import RewardError, RewardFn, RewardInfo, reward_info
from .frames import subsample_frames, temporal_windows, uniform_frame_indices, window_frame_indices
from .registry import BUILTIN_REWARDS, build_reward_server, resolve_reward
from .server import RewardOutput, RewardServer

_LAZY = {
    "OTQualityReward": "pisces_rl.rewards.ot_quality",
    "OTSemanticReward": "pisces_rl.rewards.ot_semantic",
}

__all__ = [
    "RewardServer", "RewardOutput", "RewardFn", "RewardError", "RewardInfo", "reward_info",
    "resolve_reward", "build_reward_server", "BUILTIN_REWARDS",
    "subsample_frames", "temporal_windows", "uniform_frame_indices", "window_frame_indices",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
