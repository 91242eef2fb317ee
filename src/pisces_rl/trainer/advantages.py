"""Group-normalised advantages for GRPO (PISCES §(d); Flow-GRPO / DanceGRPO style).

Every prompt is sampled ``G`` times; the ``G`` videos of one prompt form a *group*. Each video's
advantage is its reward standardised within its group::

    A_i = clip( (r_i - mean_g) / (std_g + eps), -c, +c )

    mean_g = (1 / n_g) * sum_{j in g} r_j
    std_g  = sqrt( (1 / n_g) * sum_{j in g} (r_j - mean_g)^2 )      # population std (unbiased=False)

``n_g`` counts the group's *valid* samples only (see NaN handling). The population standard deviation
(``unbiased=False``) is used, as in Flow-GRPO: with G = 2 and rewards (a, b) the advantages are exactly
(-1, +1) whatever the gap.

Two ways of combining R rewards (``weights`` w_r, default 1 each):

* ``mode="sum"`` (weighted sum, then normalise)::

      r_i = sum_r w_r * s_ir          (rewards that are NaN for sample i are left out of its sum)
      A_i = normalise_within_group(r_i)                                   -> [B]

* ``mode="per_reward"`` (the released PISCES code): every reward column is normalised on its own::

      A_ir = normalise_within_group(s_ir)                                 -> [B, R]

  and the loss adds the R clipped surrogates with weights w_r (:func:`~pisces_rl.trainer.losses.clipped_policy_loss`).
  Weights are therefore *not* applied here in this mode.

Edge cases, handled explicitly:

* **NaN scores** mean "reward not applicable" (the reward plug-in returned ``None``/NaN, or the reward
  server skipped a failing call). A NaN sample gets advantage **0** and is **excluded** from its group's
  mean/std, so it neither moves the policy nor distorts the statistics of its siblings. In ``"sum"``
  mode a sample is NaN only if *all* its rewards are NaN; if a reward is missing for just some members
  of a group, their sums are on a different footing -- prefer ``"per_reward"`` then.
* **Zero-variance groups** (every valid member got the same reward, or only one valid member) get
  advantage exactly 0: values are centred on a member of the group before averaging, in float64, so
  identical rewards give exact zeros instead of rounding noise divided by ``eps``.
* ``+/-inf`` scores are rejected: they are a bug in a reward, not "not applicable".

Distributed training: the group-keeping sampler places *whole groups* on each process, so normalising
on each process separately is exact -- no all-gather is needed. Pass ``group_size=G`` to have that
assumption checked (a group split across processes would show up locally with fewer than G members).
If your sampler does split groups, gather ``scores`` and ``group_ids`` from all processes first
(``accelerator.gather``), call :func:`group_advantages` on the full batch, and keep your own slice.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence, Union

import torch

__all__ = ["group_advantages", "group_index"]

GroupIds = Union[torch.Tensor, Sequence[Hashable]]


def group_index(group_ids: GroupIds) -> tuple[torch.Tensor, int]:
    """Map arbitrary group labels to contiguous indices.

    Args:
        group_ids: ``[B]`` integer tensor, or a length-B sequence of hashable labels (e.g. prompt strings).

    Returns:
        ``(index[B] int64 in [0, n_groups), n_groups)``; groups are numbered in order of first appearance
        for sequences and in sorted order for tensors.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex:
            raise TypeError(f"group_ids must be an integer tensor (one id per prompt group), got {group_ids.dtype}")
        uniq, inv = torch.unique(group_ids.cpu(), return_inverse=True)
        return inv, len(uniq)
    labels: dict = {}
    try:
        inv = [labels.setdefault(g, len(labels)) for g in group_ids]
    except TypeError as err:
        raise TypeError(f"group_ids must be a tensor or a sequence of hashable labels: {err}") from None
    return torch.tensor(inv, dtype=torch.long), len(labels)


def _normalise_column(values: torch.Tensor, inv: torch.Tensor, n_groups: int, eps: float) -> torch.Tensor:
    """Standardise one float64 column ``[B]`` within groups; NaN entries -> 0 and excluded from stats."""
    valid = ~torch.isnan(values)                                         # [B]
    b = values.shape[0]
    # Centre on the first valid member of each group so equal rewards give exact zeros.
    pos = torch.where(valid, torch.arange(b), torch.full((b,), b))
    first = torch.full((n_groups,), b, dtype=torch.long).scatter_reduce(0, inv, pos, reduce="amin")
    padded = torch.cat([values, values.new_zeros(1)])                   # index b -> 0 for all-NaN groups
    x = torch.where(valid, values - padded[first][inv], values.new_zeros(()))   # [B], 0 where invalid

    count = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inv, valid.to(values.dtype))   # [n_groups]
    mean = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inv, x) / count.clamp_min(1)
    dev = torch.where(valid, x - mean[inv], values.new_zeros(()))       # [B]
    var = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inv, dev * dev) / count.clamp_min(1)
    std = var.sqrt()                                                     # population std, unbiased=False
    return dev / (std[inv] + eps)                                        # 0 for invalid and zero-variance


def group_advantages(
    scores: torch.Tensor,
    group_ids: GroupIds,
    weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    mode: str = "sum",
    clip: Optional[float] = 5.0,
    eps: float = 1e-8,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """Group-normalised, clipped advantages (formulas in the module docstring).

    Args:
        scores: ``[B, R]`` per-reward scores (NaN = not applicable) or ``[B]`` already-combined totals
            (treated as ``[B, 1]``).
        group_ids: ``[B]`` group label of every sample (int tensor or sequence of hashables, e.g. prompts).
        weights: ``[R]`` reward weights, default all 1. Used by ``"sum"`` only (``"per_reward"`` applies them
            in the loss).
        mode: ``"sum"`` -> ``[B]``; ``"per_reward"`` -> ``[B, R]``.
        clip: advantages are clamped to ``[-clip, clip]``; ``None`` disables clipping.
        eps: added to the group std in the denominator.
        group_size: if given, every group must have exactly this many members (checks that the sampler kept
            whole groups on this process, which makes per-process normalisation exact).

    Returns:
        float32 advantages on ``scores.device``: ``[B]`` (``"sum"``) or ``[B, R]`` (``"per_reward"``).

    Example::

        >>> group_advantages(torch.tensor([1., 3., 5., 5.]), torch.tensor([0, 0, 1, 1]))
        tensor([-1.,  1.,  0.,  0.])
    """
    if mode not in ("sum", "per_reward"):
        raise ValueError(f"mode must be 'sum' or 'per_reward', got {mode!r} (set train.advantage_mode)")
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [B] or [B, R], got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        scores = scores.float()
    device = scores.device
    s = scores.detach().to("cpu", torch.float64)
    if s.dim() == 1:
        s = s[:, None]                                                   # [B, 1]
    b, r = s.shape
    if torch.isinf(s).any():
        raise ValueError("scores contain +/-inf; a reward returned an infinite value "
                         "(return NaN/None for 'not applicable' instead)")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip} (set train.adv_clip_max)")

    inv, n_groups = group_index(group_ids)
    if inv.shape[0] != b:
        raise ValueError(f"group_ids has {inv.shape[0]} entries but scores has {b} samples; "
                         "pass one group id per sample")
    if group_size is not None:
        sizes = torch.bincount(inv, minlength=n_groups)
        if (sizes != group_size).any():
            raise ValueError(f"groups must have exactly {group_size} members on every process, got sizes "
                             f"{sorted(set(sizes.tolist()))}; the sampler split a group across processes "
                             "(use GroupSampler, or gather scores from all processes before normalising)")

    w = torch.ones(r, dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64).detach().flatten().cpu()   # [R]
    if w.shape[0] != r:
        raise ValueError(f"weights has {w.shape[0]} entries but scores has {r} reward columns; "
                         "pass one weight per reward (or scores as [B] totals with weights=None)")
    if mode == "sum":
        present = ~torch.isnan(s)                                        # [B, R]
        total = torch.where(present, s * w, s.new_zeros(())).sum(dim=1)  # [B], nan-safe weighted sum
        total[~present.any(dim=1)] = float("nan")                        # all rewards missing -> NaN
        adv = _normalise_column(total, inv, n_groups, eps)               # [B]
    else:
        adv = torch.stack([_normalise_column(s[:, k], inv, n_groups, eps) for k in range(r)], dim=1)  # [B, R]

    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(device=device, dtype=torch.float32)
