"""Example user rewards, importable as ``reward_plugins:<name>`` when ``tests/`` is on ``sys.path``.

Each follows the plug-in contract: ``reward(videos[B, F, C, H, W] in [0, 1], prompts, **kwargs) -> [B]``.
"""
from __future__ import annotations

import torch

NOT_A_REWARD = 3  # a module attribute that is not callable


def sharpness(videos, prompts, **kwargs):
    """Mean absolute vertical pixel difference: [B, F, C, H, W] -> [B]. Differentiable."""
    return (videos[..., 1:, :] - videos[..., :-1, :]).abs().mean(dim=(1, 2, 3, 4))


sharpness.differentiable = True


def brightness(videos, prompts, **kwargs):
    """Mean pixel value as a list of floats: [B, F, C, H, W] -> list of B floats."""
    return [float(v) for v in videos.mean(dim=(1, 2, 3, 4))]


class ContrastReward:
    """A class reward: ``__init__`` runs once (counted in ``built``), ``__call__`` scores."""

    built = 0

    def __init__(self, scale: float = 1.0, device=None):
        type(self).built += 1
        self.scale = scale
        self.device = device

    def __call__(self, videos, prompts, **kwargs):
        return self.scale * videos.std(dim=(1, 2, 3, 4))


class NeedsPath:
    """A reward class with a required constructor argument."""

    def __init__(self, model_path: str):
        self.model_path = model_path

    def __call__(self, videos, prompts, **kwargs):
        return torch.zeros(videos.shape[0])


class BrokenInit:
    """A reward class whose constructor fails."""

    def __init__(self):
        raise OSError("weights file not found")


class NotCallable:
    """Instances have no ``__call__``."""


class Scorers:
    """Namespace holding a static reward, reachable as ``reward_plugins:Scorers.darkness``."""

    @staticmethod
    def darkness(videos, prompts, **kwargs):
        return 1.0 - videos.mean(dim=(1, 2, 3, 4))


def shape_recorder(videos, prompts, **kwargs):
    """Records ``(videos.shape, len(prompts))`` of every call in ``shape_recorder.calls``; scores = mean pixel."""
    shape_recorder.calls.append((tuple(videos.shape), len(prompts)))
    return videos.mean(dim=(1, 2, 3, 4))


shape_recorder.calls = []
