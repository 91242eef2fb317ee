"""The reward plug-in contract.

A reward is any callable with the signature ::

    reward(videos, prompts, **kwargs) -> Tensor[B] | list[float | None] | ndarray[B] | None

* ``videos``: float tensor ``[B, F, C, H, W]`` with values in ``[0, 1]`` (already subsampled to the
  frames the :class:`~pisces_rl.rewards.server.RewardServer` was asked to score);
* ``prompts``: ``list[str]`` of length ``B``;
* ``kwargs``: whatever the caller passed to the server (per-sample values are sliced along with the
  videos), so a reward should accept ``**kwargs``.

It returns one score per video. "Not applicable" is spelled ``None``: either the whole result
(no score for any video in the batch) or single entries of a returned list. A NaN score is treated
as a bug and raises, unless the reward declares ``allow_nan = True``, in which case NaN also means
"not applicable". ``inf`` is always an error.

Optional attributes a reward may declare (a plain function can carry them too:
``sharpness.differentiable = True``):

``name`` (str)
    Key used when the reward is registered without an explicit one (sequence form of the server).
``device`` (str | torch.device)
    Videos are moved there before the call. ``torch.nn.Module`` rewards without it are called on
    the device of their first parameter.
``differentiable`` (bool, default False)
    The score carries an autograd graph back to ``videos``; used by
    :meth:`RewardServer.differentiable` (direct reward backprop).
``allow_nan`` (bool, default False)
    NaN in the result means "not applicable" instead of "error".

A class whose ``__init__`` loads a model once and whose ``__call__`` scores is the usual way to
write a model-based reward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

__all__ = ["RewardFn", "RewardError", "RewardInfo", "RewardResult", "reward_info"]

RewardResult = Union[Tensor, Sequence[Optional[float]], None]
"""What a reward may return: ``Tensor[B]``, a length-``B`` list/tuple/ndarray (``None`` entries
allowed), or ``None`` for "not applicable to any video of this batch"."""


class RewardError(RuntimeError):
    """A reward could not be resolved, failed, or returned something that breaks the contract.

    The message names the reward and says how to fix it.
    """


@runtime_checkable
class RewardFn(Protocol):
    """Structural type of a reward: ``(videos[B, F, C, H, W] in [0, 1], prompts, **kwargs) -> [B]``.

    See the module docstring for the return conventions and the optional attributes
    (``name``, ``device``, ``differentiable``, ``allow_nan``).
    """

    def __call__(self, videos: Tensor, prompts: list[str], **kwargs: Any) -> RewardResult:
        ...


@dataclass(frozen=True)
class RewardInfo:
    """The optional attributes of a reward, with their defaults filled in."""

    name: str
    device: Optional[torch.device]
    differentiable: bool
    allow_nan: bool


def _module_device(fn: Any) -> Optional[torch.device]:
    if isinstance(fn, torch.nn.Module):
        for tensor in fn.parameters():
            return tensor.device
        for tensor in fn.buffers():
            return tensor.device
    return None


def reward_info(fn: Any) -> RewardInfo:
    """Read a reward's optional attributes.

    ``name`` falls back to ``__name__`` (functions) or the class name (instances); ``device`` to
    the first parameter's device for ``nn.Module`` rewards, else ``None`` (no move).
    """
    name = getattr(fn, "name", None)
    if not isinstance(name, str) or not name:
        name = getattr(fn, "__name__", None) or type(fn).__name__
    device = getattr(fn, "device", None)
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise RewardError(
                f"reward '{name}' declares device={device!r}, which is not a device; "
                "set it to a string such as 'cpu' or 'cuda:0', or a torch.device"
            ) from exc
    else:
        device = _module_device(fn)
    return RewardInfo(
        name=name,
        device=device,
        differentiable=bool(getattr(fn, "differentiable", False)),
        allow_nan=bool(getattr(fn, "allow_nan", False)),
    )
