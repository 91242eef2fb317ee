"""Shared plumbing of the two OT rewards: input checks, prompt de-duplication, grad-mode policy."""
from __future__ import annotations

import contextlib
from dataclasses import fields

import torch
from torch import Tensor

from pisces_rl.encoders.base import TextFeatures, check_videos


def check_batch(videos, prompts, reward: str) -> list[str]:
    """Validate ``videos[B, F, C, H, W]`` in [0, 1] and ``B`` prompts; return the prompts as a list."""
    try:
        check_videos(videos)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{reward}: {exc}") from None
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{reward}: prompts must be a list of strings, one per video")
    prompts = list(prompts)
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{reward}: got {videos.shape[0]} videos but {len(prompts)} prompts; "
                         "pass one prompt per video (repeat a prompt for each of its G samples)")
    return prompts


def encode_prompts(encoder, prompts: list[str]) -> TextFeatures:
    """``encoder.encode_text`` on the distinct prompts only (GRPO repeats each prompt G times), then re-expanded
    to ``B`` rows. Runs without autograd: the text side of both rewards is a constant."""
    position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    with torch.no_grad():
        features = encoder.encode_text(list(position))
    if len(position) == len(prompts):
        return features
    index = torch.tensor([position[p] for p in prompts], device=features.input_ids.device)
    values = {f.name: getattr(features, f.name) for f in fields(features)}
    for name, value in values.items():
        if isinstance(value, Tensor):
            values[name] = value.index_select(0, index)
    values["prompts"] = list(prompts)
    return type(features)(**values)


def grad_context(videos: Tensor):
    """Autograd only when it is enabled *and* the videos require grad (direct backprop); ``no_grad`` otherwise,
    which is what RL scoring wants."""
    if torch.is_grad_enabled() and videos.requires_grad:
        return contextlib.nullcontext()
    return torch.no_grad()


def encoder_device(encoder):
    """The device an encoder's inputs should live on (None when it cannot tell)."""
    device = getattr(encoder, "device", None)
    if device is None and isinstance(encoder, torch.nn.Module):
        device = next((p.device for p in encoder.parameters()), None)
    return device
