"""RewardServer: score a batch of videos with several weighted rewards.

::

    server = RewardServer({"ot_quality": (OTQualityReward(enc, ot_map), 1.0),
                           "sharpness": ("my_pkg.rewards:sharpness", 0.5)},
                          max_batch_size=8, on_error="raise")
    out = server(videos, prompts)          # videos [B, F, C, H, W] in [0, 1]
    out.scores   # [B, R] float32, NaN = not applicable / skipped
    out.total    # [B] weighted sum over the available rewards; NaN if none is available
    out.metrics()

Rules, in the order they apply:

1. Frames. ``num_frames`` keeps that many uniformly spaced frames; ``temporal_windows = W > 1``
   scores ``W`` consecutive windows (``num_frames`` or ``F // W`` frames each) and averages the
   available window scores (see :mod:`pisces_rl.rewards.frames`).
2. Calls. Each reward is called on chunks of at most ``max_batch_size`` videos (and, with
   ``max_frames_per_call = M``, at most ``max(1, M // L)`` videos of ``L`` frames), on its declared
   ``device`` (else the device of its parameters for an ``nn.Module``, else the server's
   ``device``, else where the videos are). Keyword arguments given to the server are forwarded;
   those that hold one value per video (list/tuple of length ``B``, tensor with leading dim ``B``)
   are sliced with the chunk.
3. Results. A reward returns ``Tensor[n]``, a length-``n`` list/tuple/ndarray, or ``None``.
   ``None`` (whole result or a list entry) means *not applicable*: the score is NaN and counted
   under ``not_applicable``. NaN from a reward is an error unless it declares ``allow_nan = True``
   (then NaN also means not applicable); ``inf`` is always an error. Any other shape, length or
   type is an error.
4. Errors. ``on_error="raise"`` raises one :class:`RewardError` naming the reward, what went wrong
   and the fix. ``on_error="skip"`` scores the failing chunk (or the non-finite entries) NaN,
   counts them under ``skipped``, and logs a warning the first time each reward fails.
5. Total. ``total[b] = sum_r w_r * scores[b, r]`` over the rewards with a finite score for ``b``
   (missing ones contribute nothing, as in trl; there is no re-normalisation). If no reward is
   available for ``b`` the total is NaN, never a silent 0: the trainer must drop or mask those
   samples; ``metrics()["reward/total/nan"]`` counts them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .base import RewardError, RewardInfo, reward_info
from .frames import temporal_windows
from .registry import resolve_reward

__all__ = ["RewardServer", "RewardOutput"]

_VALUE_TOLERANCE = 1e-3  # videos may overshoot [0, 1] by this much (decoder rounding)


@dataclass
class RewardOutput:
    """Scores of one batch.

    ``scores`` [B, R] float32 (NaN = not applicable or skipped), ``total`` [B] float32 (NaN when
    no reward is available), ``names`` (R reward keys), ``weights`` [R], and per-reward counts
    of videos that were skipped (``on_error="skip"``) or not applicable in this batch.
    """

    scores: Tensor
    total: Tensor
    names: list[str]
    weights: Tensor
    skipped: dict[str, int] = field(default_factory=dict)
    not_applicable: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        """Scores of one reward: ``[B]``."""
        if name not in self.names:
            raise KeyError(f"no reward named '{name}'; rewards in this output: {self.names}")
        return self.scores[:, self.names.index(name)]

    def metrics(self) -> dict[str, float]:
        """Log-ready numbers: for every reward and for the total, mean and (population) std over
        the available (non-NaN) samples, NaN when there are none; per reward the ``skipped`` and
        ``not_applicable`` counts; ``reward/total/nan`` = samples whose total is NaN."""
        out: dict[str, float] = {}

        def stats(prefix: str, values: Tensor) -> None:
            values = values.detach().float()
            values = values[~torch.isnan(values)]
            if values.numel() == 0:
                out[f"{prefix}/mean"], out[f"{prefix}/std"] = math.nan, math.nan
            else:
                out[f"{prefix}/mean"] = values.mean().item()
                out[f"{prefix}/std"] = values.std(correction=0).item()

        for column, name in enumerate(self.names):
            stats(f"reward/{name}", self.scores[:, column])
            out[f"reward/{name}/skipped"] = self.skipped.get(name, 0)
            out[f"reward/{name}/not_applicable"] = self.not_applicable.get(name, 0)
        stats("reward/total", self.total)
        out["reward/total/nan"] = int(torch.isnan(self.total.detach()).sum().item())
        return out


@dataclass
class _Entry:
    name: str
    fn: Callable
    weight: float

    @property
    def info(self) -> RewardInfo:
        """Read on every call: a reward's device may change after the server was built."""
        return reward_info(self.fn)


class _BadResult(Exception):
    """A reward result that breaks the contract; the message is the problem and its fix."""


def _per_sample(value: Any, batch: int) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == batch
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch


def _check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise RewardError(f"reward '{name}' has weight {weight!r}; give a finite number, e.g. ('{name}', 1.0)")
    return float(weight)


class RewardServer:
    """Weighted set of rewards with batching, device placement, frame control and error policy.

    Args:
        rewards: ``{name: (reward_or_spec, weight)}``; a bare ``reward_or_spec`` means weight 1.0.
            A sequence of rewards or ``(reward, weight)`` pairs is also accepted, keyed by each
            reward's ``name`` (or ``__name__``). Specs are resolved by :func:`resolve_reward`.
        max_batch_size: most videos passed to one reward call.
        on_error: ``"raise"`` or ``"skip"`` (see the module docstring).
        num_frames: frames fed to the rewards, uniformly subsampled; ``None`` = all.
        temporal_windows: ``W > 1`` averages the scores of ``W`` temporal windows.
        max_frames_per_call: at most this many frames (videos x frames per video) per reward call, so
            long videos are scored in smaller chunks; ``None`` = only ``max_batch_size`` limits a call.
        logger: ``logging.Logger`` for skip warnings (default ``pisces_rl.rewards``).
        device: default device for rewards that declare none (and offered to reward classes).
    """

    def __init__(self, rewards: Union[Mapping[str, Any], Sequence[Any]], max_batch_size: int = 8,
                 on_error: str = "raise", num_frames: Optional[int] = None, temporal_windows: int = 1,
                 logger: Optional[logging.Logger] = None, *, device: Union[str, torch.device, None] = None,
                 max_frames_per_call: Optional[int] = None):
        for value, what in ((max_batch_size, "max_batch_size"), (temporal_windows, "temporal_windows")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                       or num_frames < 1):
            raise ValueError(f"num_frames must be a positive integer or None (all frames), got {num_frames!r}")
        if max_frames_per_call is not None and (isinstance(max_frames_per_call, bool)
                                                or not isinstance(max_frames_per_call, int) or max_frames_per_call < 1):
            raise ValueError(f"max_frames_per_call must be a positive integer or None, got {max_frames_per_call!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.max_batch_size, self.on_error = max_batch_size, on_error
        self.num_frames, self.temporal_windows = num_frames, temporal_windows
        self.max_frames_per_call = max_frames_per_call
        self.logger = logger or logging.getLogger("pisces_rl.rewards")
        self.device = torch.device(device) if device is not None else None
        self._entries = self._build_entries(rewards)
        self.skipped_total: dict[str, int] = {e.name: 0 for e in self._entries}
        """Videos skipped per reward since the server was built (``on_error="skip"``)."""
        self._warned: set[str] = set()

    def _build_entries(self, rewards: Any) -> list[_Entry]:
        options = {"device": self.device} if self.device is not None else {}
        if isinstance(rewards, Mapping):
            items = [(name, value) for name, value in rewards.items()]
        elif isinstance(rewards, Sequence) and not isinstance(rewards, str):
            items = [(None, value) for value in rewards]
        else:
            raise RewardError(f"rewards must be a mapping {{name: (reward, weight)}}, got {type(rewards).__name__}")
        if not items:
            raise RewardError("RewardServer needs at least one reward, e.g. {'sharpness': (sharpness, 1.0)}")
        entries: list[_Entry] = []
        for name, value in items:
            label = name if name is not None else repr(value)
            if isinstance(value, (tuple, list)):
                if len(value) != 2:
                    raise RewardError(f"reward '{label}' must be given as (reward_or_spec, weight), got {value!r}")
                spec, weight = value
            else:
                spec, weight = value, 1.0
            fn = resolve_reward(spec, **options)
            name = name if name is not None else reward_info(fn).name
            if not isinstance(name, str) or not name:
                raise RewardError(f"reward names must be non-empty strings, got {name!r}")
            if any(e.name == name for e in entries):
                raise RewardError(f"two rewards are named '{name}'; pass a mapping to give them distinct names")
            entries.append(_Entry(name, fn, _check_weight(name, weight)))
        return entries

    @property
    def names(self) -> list[str]:
        """Reward names, in column order of ``RewardOutput.scores``."""
        return [e.name for e in self._entries]

    @property
    def rewards(self) -> dict[str, tuple[Callable, float]]:
        """The rewards in the constructor's form, ``{name: (fn, weight)}`` with ``fn`` resolved (a callable), in
        column order: ``RewardServer({**server.rewards, "extra": (fn, 1.0)})`` builds a server with one more."""
        return {e.name: (e.fn, e.weight) for e in self._entries}

    @property
    def differentiable_names(self) -> list[str]:
        """Rewards declaring ``differentiable=True``: their scores carry gradient in :meth:`differentiable`."""
        return [e.name for e in self._entries if e.info.differentiable]

    @property
    def weights(self) -> Tensor:
        """Reward weights ``[R]`` float32."""
        return torch.tensor([e.weight for e in self._entries], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        rewards = ", ".join(f"{e.name}={e.weight:g}" for e in self._entries)
        return (f"RewardServer({rewards}; max_batch_size={self.max_batch_size}, on_error={self.on_error!r}, "
                f"num_frames={self.num_frames}, temporal_windows={self.temporal_windows})")

    def __call__(self, videos: Tensor, prompts: Sequence[str], **kwargs: Any) -> RewardOutput:
        """Score ``videos`` [B, F, C, H, W] in [0, 1] against ``prompts`` (B strings), without autograd."""
        with torch.no_grad():
            return self._score(videos, prompts, kwargs, grad=False)

    def differentiable(self, videos: Tensor, prompts: Sequence[str], **kwargs: Any) -> RewardOutput:
        """Like ``__call__``, but rewards declaring ``differentiable=True`` run with autograd on, so
        ``scores`` / ``total`` carry a graph back to ``videos`` (direct reward backprop). The other
        rewards run under ``no_grad`` and their scores are constants."""
        return self._score(videos, prompts, kwargs, grad=True)

    # ------------------------------------------------------------------ internals

    def _check_inputs(self, videos: Any, prompts: Any) -> list[str]:
        if not isinstance(videos, Tensor) or videos.dim() != 5 or not videos.is_floating_point():
            got = (f"{videos.dtype} tensor of shape {list(videos.shape)}" if isinstance(videos, Tensor)
                   else type(videos).__name__)
            raise ValueError(f"videos must be a float tensor [B, F, C, H, W] with values in [0, 1], got {got}")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or \
                not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings, one per video")
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"got {videos.shape[0]} videos but {len(prompts)} prompts; pass one prompt per video")
        if videos.numel():
            lo, hi = torch.aminmax(videos.detach())
            lo, hi = lo.item(), hi.item()
            if not (lo >= -_VALUE_TOLERANCE and hi <= 1 + _VALUE_TOLERANCE):
                raise ValueError(
                    f"videos must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                    "decoder output in [-1, 1] becomes (videos + 1) / 2, and NaN/inf must not reach the rewards"
                )
        return list(prompts)

    def _score(self, videos: Tensor, prompts: Sequence[str], kwargs: dict, grad: bool) -> RewardOutput:
        prompts = self._check_inputs(videos, prompts)
        batch, out_device = videos.shape[0], videos.device
        if batch == 0:
            empty = torch.zeros(0, len(self), device=out_device)
            return RewardOutput(empty, empty[:, 0], self.names, self.weights,
                                {n: 0 for n in self.names}, {n: 0 for n in self.names})
        windows = temporal_windows(videos, self.temporal_windows, self.num_frames)  # [W, B, L, C, H, W]
        n_win = windows.shape[0]
        flat = windows.reshape(n_win * batch, *windows.shape[2:])  # [W*B, L, C, H, W], window-major
        flat_prompts = prompts * n_win
        flat_kwargs = {}
        for key, value in kwargs.items():
            sliced = _per_sample(value, batch)
            if sliced and n_win > 1:
                value = torch.cat([value] * n_win) if isinstance(value, Tensor) else list(value) * n_win
            flat_kwargs[key] = (value, sliced)
        moved: dict[Optional[torch.device], Tensor] = {None: flat}
        columns, skipped, not_applicable = [], {}, {}
        for entry in self._entries:
            device = entry.info.device or self.device
            if device not in moved:
                moved[device] = flat.to(device)
            values, na, bad = self._run_reward(entry, moved[device], flat_prompts, flat_kwargs, grad, out_device)
            values, na, bad = values.view(n_win, batch), na.view(n_win, batch), bad.view(n_win, batch)
            if n_win == 1:
                score = values[0]
            else:  # mean over available windows; the clamp keeps gradients finite for all-NaN videos
                ok = ~torch.isnan(values)
                count = ok.sum(0)
                mean = torch.where(ok, values, 0.0).sum(0) / count.clamp(min=1)
                score = torch.where(count > 0, mean, torch.full_like(mean, math.nan))
            skipped[entry.name] = int(bad.any(0).sum().item())
            not_applicable[entry.name] = int((torch.isnan(score).cpu() & ~bad.any(0)).sum().item())
            self.skipped_total[entry.name] += skipped[entry.name]
            columns.append(score)
        scores = torch.stack(columns, dim=1)  # [B, R]
        weights = self.weights
        available = ~torch.isnan(scores)
        weighted = torch.where(available, scores, 0.0) * weights.to(out_device)
        total = torch.where(available.any(1), weighted.sum(1), torch.full((batch,), math.nan, device=out_device))
        return RewardOutput(scores, total, self.names, weights, skipped, not_applicable)

    def _run_reward(self, entry: _Entry, videos: Tensor, prompts: list[str], kwargs: dict, grad: bool,
                    out_device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Score ``videos`` [N, L, C, H, W] chunk by chunk: values [N] float32 on ``out_device``,
        ``na`` [N] (not applicable) and ``bad`` [N] (skipped after an error) masks, on the CPU."""
        track = grad and entry.info.differentiable
        values, na_masks, bad_masks = [], [], []
        per_call = self.max_batch_size
        if self.max_frames_per_call is not None:
            per_call = min(per_call, max(1, self.max_frames_per_call // max(1, videos.shape[1])))
        for start in range(0, videos.shape[0], per_call):
            stop = min(start + per_call, videos.shape[0])
            n = stop - start
            chunk_kwargs = {k: (v[start:stop] if sliced else v) for k, (v, sliced) in kwargs.items()}
            skip_all, failed = torch.ones(n, dtype=torch.bool), True
            try:
                with torch.set_grad_enabled(track):
                    result = entry.fn(videos[start:stop], prompts[start:stop], **chunk_kwargs)
                chunk, na, bad = self._validate(entry, result, n, track, out_device)
                failed = False
            except _BadResult as exc:
                self._fail(entry, f"{exc}", None, start, stop)
                chunk, na, bad = self._nan(n, out_device), ~skip_all, skip_all
            except Exception as exc:
                hint = "lower max_batch_size" if "out of memory" in str(exc).lower() else "fix the reward"
                self._fail(entry, f"raised {type(exc).__name__}: {exc}; {hint}, or build the server with "
                                  "on_error='skip' to score failing videos NaN and continue", exc, start, stop)
                chunk, na, bad = self._nan(n, out_device), ~skip_all, skip_all
            if not failed and bad.any():
                self._fail(entry, f"returned non-finite scores for {int(bad.sum())} of {n} videos; return None for "
                                  "'not applicable' (or declare allow_nan = True on the reward if NaN means that), "
                                  "and keep scores finite", None, start, stop)
                chunk = torch.where(bad.to(out_device), self._nan(n, out_device), chunk)
            values.append(chunk)
            na_masks.append(na.cpu())
            bad_masks.append(bad.cpu())
        return torch.cat(values), torch.cat(na_masks), torch.cat(bad_masks)

    @staticmethod
    def _nan(n: int, device: torch.device) -> Tensor:
        return torch.full((n,), math.nan, dtype=torch.float32, device=device)

    def _fail(self, entry: _Entry, problem: str, exc: Optional[BaseException], start: int, stop: int) -> None:
        where = f"videos {start}..{stop - 1} of the (frame-windowed) batch"
        message = f"reward '{entry.name}' {problem} [{where}]"
        if self.on_error == "raise":
            raise RewardError(message) from exc
        if entry.name not in self._warned:
            self._warned.add(entry.name)
            self.logger.warning("%s; on_error='skip': these videos score NaN, further failures of '%s' are only "
                                "counted (RewardOutput.skipped)", message, entry.name)
        else:
            self.logger.debug("%s; skipped", message)

    def _validate(self, entry: _Entry, result: Any, n: int, track: bool,
                  out_device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Contract check of one chunk's result (see the module docstring, rule 3)."""
        expect = f"return {n} scores (one per video) as a Tensor[{n}], a list of {n} floats, or None"
        if result is None:
            return self._nan(n, out_device), torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        if isinstance(result, np.ndarray):
            numeric = result.dtype.kind in "biuf"
            result = torch.from_numpy(result.astype(np.float64)) if numeric else list(result)
        if isinstance(result, Tensor):
            if result.dim() != 1:
                raise _BadResult(f"returned a tensor of shape {list(result.shape)} for {n} videos; {expect}"
                                 + (" (e.g. .squeeze(-1))" if result.numel() == n else ""))
            if result.shape[0] != n:
                raise _BadResult(f"returned {result.shape[0]} scores for {n} videos; {expect}")
            if result.is_complex():
                raise _BadResult(f"returned complex scores; {expect}")
            scores = result.to(device=out_device, dtype=torch.float32)
            scores = scores if track else scores.detach()
            na = torch.zeros(n, dtype=torch.bool)
        elif isinstance(result, (list, tuple)):
            if track:
                raise _BadResult("declares differentiable=True but returned a list, which carries no gradient; "
                                 f"return a Tensor[{n}] computed from the videos")
            if len(result) != n:
                raise _BadResult(f"returned {len(result)} scores for {n} videos; {expect}")
            floats = []
            for i, item in enumerate(result):
                if isinstance(item, Tensor) and item.numel() == 1:
                    item = item.item()
                if item is not None and not isinstance(item, (bool, int, float, np.number)):
                    raise _BadResult(f"returned a {type(item).__name__} at position {i}; {expect}")
                floats.append(math.nan if item is None else float(item))
            scores = torch.tensor(floats, dtype=torch.float32, device=out_device)
            na = torch.tensor([item is None for item in result], dtype=torch.bool)
        else:
            raise _BadResult(f"returned a {type(result).__name__}; {expect}")
        nan = torch.isnan(scores.detach()).cpu() & ~na
        inf = torch.isinf(scores.detach()).cpu()
        if entry.info.allow_nan:
            na, nan = na | nan, torch.zeros_like(nan)
        return scores, na, nan | inf
