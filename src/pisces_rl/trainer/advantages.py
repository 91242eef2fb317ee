"""Group-baseline advantages for GRPO (PISCES §(d); Flow-GRPO / DanceGRPO / trl style).

Every prompt is sampled ``G`` times (``train.num_generations``); the ``G`` videos of one prompt form a
*group*. Each video's advantage is its reward minus its group's mean, scaled as ``train.scale_rewards``
says (trl ``GRPOConfig.scale_rewards``, same names and meaning)::

    A_i = clip( (r_i - mean_g) / (S + eps), -c, +c )          eps = 1e-4 (trl GRPOTrainer, Flow-GRPO)

    mean_g = (1 / n_g) * sum_{j in g} r_j
    S = std_g       scale="group": sqrt((1 / n_g) * sum_{j in g} (r_j - mean_g)^2), the group's own std
    S = std_batch   scale="batch": std of the rewards of the whole batch, *all processes* together
    S = 1, eps = 0  scale="none":  no scaling (Dr. GRPO), A_i = r_i - mean_g

``n_g`` counts the group's *valid* samples only (see NaN handling). Standard deviations are population
ones (``unbiased=False``), as in Flow-GRPO's ``stat_tracking.py`` (``np.std``); trl uses Bessel's correction
(``nanstd``), which differs by ``sqrt(n / (n - 1))``. With ``"group"`` every group is rescaled to unit
spread however small its differences are: a near-tied group of noisy rewards becomes ``+-1`` advantages of
pure noise (G = 2 and rewards ``(a, b)`` give ``(-1, +1)`` as soon as ``|a - b| >> eps``). ``"batch"``
(Flow-GRPO's ``sample.global_std=True`` in its SD3 configs, trl's "PPO Lite" option) keeps the differences
between groups: a near-tied group gets near-zero advantages when other groups spread.

Two ways of combining R rewards (``weights`` w_r, default 1 each):

* ``mode="sum"`` (weighted sum, then normalise; trl's ``sum_then_normalize``)::

      r_i = sum_r w_r * s_ir          (rewards that are NaN for sample i are left out of its sum)
      A_i = normalise(r_i)                                                -> [B]

* ``mode="per_reward"`` (the released PISCES code): every reward column is normalised on its own::

      A_ir = normalise(s_ir)                                              -> [B, R]

  and the loss adds the R clipped surrogates with weights w_r (:func:`~pisces_rl.trainer.losses.clipped_policy_loss`).
  Weights are therefore *not* applied here in this mode; with ``"batch"`` each column has its own batch std.

Edge cases, handled explicitly:

* **NaN scores** mean "reward not applicable" (the reward plug-in returned ``None``/NaN, or the reward
  server skipped a failing call). A NaN sample gets advantage **0** and is **excluded** from its group's
  mean and from every std, so it neither moves the policy nor distorts the statistics of its siblings. In
  ``"sum"`` mode a sample is NaN only if *all* its rewards are NaN; if a reward is missing for just some
  members of a group, their sums are on a different footing -- prefer ``"per_reward"`` then.
* **Zero-variance groups** (every valid member got the same reward, or only one valid member) get
  advantage exactly 0: values are centred on a member of the group before averaging, in float64, so
  identical rewards give exact zeros instead of rounding noise divided by ``eps``.
* ``+/-inf`` scores are rejected: they are a bug in a reward, not "not applicable".

Distributed training: the group-keeping sampler places *whole groups* on each process, so group means
and group stds are exact on each process alone. The batch std is not: gather every process's scores with
:func:`gather_scores` and pass them as ``batch_scores`` (the GRPO trainer does). Pass ``group_size=G`` to
have the whole-group assumption checked (a group split across processes would show up locally with fewer
than G members).
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence, Union

import torch

__all__ = ["group_advantages", "group_index", "gather_scores", "SCALE_REWARDS"]

SCALE_REWARDS = ("group", "batch", "none")  # trl GRPOConfig.scale_rewards values
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


def _population_std(values: torch.Tensor) -> torch.Tensor:
    """NaN-aware population std of a float64 column ``[N]`` (0 if fewer than 2 valid values)."""
    valid = values[~torch.isnan(values)]
    if valid.numel() < 2:
        return values.new_zeros(())
    x = valid - valid[0]                                                 # centred: equal values -> exact 0
    return (x - x.mean()).pow(2).mean().sqrt()


def _normalise_column(values: torch.Tensor, inv: torch.Tensor, n_groups: int, eps: float, scale: str,
                      batch_values: Optional[torch.Tensor]) -> torch.Tensor:
    """Group-centre one float64 column ``[B]`` and scale it; NaN entries -> 0 and excluded from stats."""
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
    if scale == "none":
        return dev
    if scale == "group":
        var = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inv, dev * dev) / count.clamp_min(1)
        denom = var.sqrt()[inv] + eps                                    # [B] population std of the group
    else:  # "batch": one std over every valid reward of the batch (all processes when gathered)
        denom = (_population_std(values if batch_values is None else batch_values) + eps).expand(b)
    return dev / torch.where(denom > 0, denom, torch.ones_like(denom))  # 0 for invalid and zero-variance


def _columns(s: torch.Tensor, w: torch.Tensor, mode: str) -> torch.Tensor:
    """``[B, R]`` float64 scores -> the columns to normalise: ``[B, 1]`` weighted totals or ``[B, R]``."""
    if mode == "per_reward":
        return s
    present = ~torch.isnan(s)                                            # [B, R]
    total = torch.where(present, s * w, s.new_zeros(())).sum(dim=1)     # [B], nan-safe weighted sum
    total[~present.any(dim=1)] = float("nan")                            # all rewards missing -> NaN
    return total[:, None]


def _as_scores(scores, name: str) -> torch.Tensor:
    """``[B]`` / ``[B, R]`` scores as a float64 CPU ``[B, R]`` tensor; inf is an error."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.dim() not in (1, 2):
        raise ValueError(f"{name} must be [B] or [B, R], got shape {tuple(scores.shape)}")
    s = scores.detach().to("cpu", torch.float64)
    s = s[:, None] if s.dim() == 1 else s
    if torch.isinf(s).any():
        raise ValueError(f"{name} contain +/-inf; a reward returned an infinite value "
                         "(return NaN/None for 'not applicable' instead)")
    return s


def gather_scores(values: torch.Tensor, accelerator) -> torch.Tensor:
    """Every process's ``values`` concatenated in rank order, on the CPU: ``[B, ...] -> [P*B, ...]``.

    For ``scale="batch"``: pass the result as ``batch_scores`` of :func:`group_advantages`. Every process must
    call it with the same shape (the group-keeping sampler gives each the same number of whole groups).
    ``accelerator`` is an ``accelerate.Accelerator``; with one process ``values`` is returned unchanged.
    """
    if accelerator.num_processes == 1:
        return values
    return accelerator.gather(values.detach().float().to(accelerator.device).contiguous()).cpu()


def group_advantages(
    scores: torch.Tensor,
    group_ids: GroupIds,
    weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    mode: str = "sum",
    clip: Optional[float] = 5.0,
    eps: float = 1e-4,
    group_size: Optional[int] = None,
    scale: str = "group",
    batch_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Group-baseline, scaled, clipped advantages (formulas in the module docstring).

    Args:
        scores: ``[B, R]`` per-reward scores (NaN = not applicable) or ``[B]`` already-combined totals
            (treated as ``[B, 1]``).
        group_ids: ``[B]`` group label of every sample (int tensor or sequence of hashables, e.g. prompts).
        weights: ``[R]`` reward weights, default all 1. Used by ``"sum"`` only (``"per_reward"`` applies them
            in the loss).
        mode: ``"sum"`` -> ``[B]``; ``"per_reward"`` -> ``[B, R]``.
        clip: advantages are clamped to ``[-clip, clip]``; ``None`` disables clipping.
        eps: added to the std in the denominator (``1e-4`` as trl's GRPOTrainer and Flow-GRPO's
            ``stat_tracking.py``); unused with ``scale="none"``.
        group_size: if given, every group must have exactly this many members (checks that the sampler kept
            whole groups on this process, which makes per-process group statistics exact).
        scale: ``"group"`` (each group's std), ``"batch"`` (one std over the batch) or ``"none"``.
        batch_scores: ``scale="batch"`` only: the scores of the *whole* batch, every process's (same layout as
            ``scores``, see :func:`gather_scores`); default ``scores`` (one process).

    Returns:
        float32 advantages on ``scores.device``: ``[B]`` (``"sum"``) or ``[B, R]`` (``"per_reward"``).

    Example::

        >>> group_advantages(torch.tensor([1., 3., 5., 5.]), torch.tensor([0, 0, 1, 1]))
        tensor([-0.9999,  0.9999,  0.0000,  0.0000])
        >>> group_advantages(torch.tensor([1., 3., 5., 5.]), torch.tensor([0, 0, 1, 1]), scale="none")
        tensor([-1.,  1.,  0.,  0.])
    """
    if mode not in ("sum", "per_reward"):
        raise ValueError(f"mode must be 'sum' or 'per_reward', got {mode!r} (set train.advantage_mode)")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {', '.join(SCALE_REWARDS)}, got {scale!r} (set train.scale_rewards)")
    device = scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu")
    s = _as_scores(scores, "scores")                                     # [B, R]
    b, r = s.shape
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
    cols = _columns(s, w, mode)                                          # [B, 1] or [B, R]
    batch_cols = None
    if batch_scores is not None and scale == "batch":
        full = _as_scores(batch_scores, "batch_scores")
        if full.shape[1] != r:
            raise ValueError(f"batch_scores has {full.shape[1]} reward columns but scores has {r}; gather the "
                             "same values on every process (gather_scores)")
        batch_cols = _columns(full, w, mode)
    adv = torch.stack([_normalise_column(cols[:, k], inv, n_groups, eps, scale,
                                         None if batch_cols is None else batch_cols[:, k])
                       for k in range(cols.shape[1])], dim=1)            # [B, 1] or [B, R]
    if mode == "sum":
        adv = adv[:, 0]                                                  # [B]
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(device=device, dtype=torch.float32)
