"""Losses of the PISCES trainers as small, stateless functions.

* :func:`clipped_policy_loss` -- PPO-clip surrogate on per-step log-probs (GRPO paradigm).
* :func:`gaussian_kl` -- KL between the policy's and the reference model's Gaussian SDE steps.
* :func:`pseudo_huber` -- the consistency-distillation distance ``L_CD`` (direct-backprop paradigm).

Convention shared by all three: one value per sample, ``[B]``, and anything per-element is *averaged*
over the non-batch dimensions. The rollout's Gaussian log-prob of a denoising step is averaged over the
latent's ``d = C*F*H*W`` elements in the same way (Flow-GRPO), so ratios, KL and distances are all on a
"per element" scale that does not change with video resolution.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["clipped_policy_loss", "gaussian_kl", "pseudo_huber"]


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped policy-gradient loss for one denoising step.

    With ``ratio_i = exp(lp_i - old_i)`` and ``eps = clip_range``::

        l_i  = max( -A_i * ratio_i,  -A_i * clip(ratio_i, 1 - eps, 1 + eps) )
        loss = mean_i l_i                                       advantages [B]
        loss = sum_r w_r * mean_i l_ir                          advantages [B, R] (one surrogate per reward)

    Only ``log_prob`` carries gradient; ``old_log_prob`` and ``advantages`` are detached. When
    ``log_prob == old_log_prob`` (first update on a fresh rollout) the loss is ``-mean(A)`` and its
    gradient is ``-mean_i A_i * d lp_i``, the plain policy gradient.

    Args:
        log_prob: ``[B]`` log-prob of the recorded transition under the current policy (with grad).
        old_log_prob: ``[B]`` log-prob recorded at sampling time.
        advantages: ``[B]`` or ``[B, R]`` group-normalised advantages.
        clip_range: ``eps > 0``; PISCES/Flow-GRPO use a tiny value such as ``1e-4``.
        weights: ``[R]`` reward weights for ``[B, R]`` advantages (default all 1); must be None for ``[B]``.

    Returns:
        ``(loss, stats)``: scalar loss, and detached 0-d tensors ``policy_loss``, ``clipfrac``
        (fraction with ``|ratio - 1| > eps``), ``approx_kl`` (``0.5 * mean((lp - old)^2)``),
        ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    if log_prob.dim() != 1:
        raise ValueError(f"log_prob must be [B] (one value per sample), got shape {tuple(log_prob.shape)}")
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(f"old_log_prob shape {tuple(old_log_prob.shape)} != log_prob shape "
                         f"{tuple(log_prob.shape)}")
    if advantages.dim() not in (1, 2) or advantages.shape[0] != log_prob.shape[0]:
        raise ValueError(f"advantages must be [B] or [B, R] with B = {log_prob.shape[0]}, got shape "
                         f"{tuple(advantages.shape)}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range} (set train.clip_range)")

    old = old_log_prob.detach().to(log_prob.dtype)
    adv = advantages.detach().to(device=log_prob.device, dtype=log_prob.dtype)
    diff = log_prob - old                                                    # [B]
    ratio = torch.exp(diff)                                                  # [B]
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)               # [B]

    if adv.dim() == 1:
        if weights is not None:
            raise ValueError("weights are only used with per-reward advantages [B, R]; the [B] advantages "
                             "of mode='sum' already include them -- pass weights=None")
        loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
    else:
        r = adv.shape[1]
        w = torch.ones(r) if weights is None else torch.as_tensor(weights).detach().flatten()
        if w.shape[0] != r:
            raise ValueError(f"weights has {w.shape[0]} entries but advantages has {r} reward columns")
        w = w.to(device=log_prob.device, dtype=log_prob.dtype)               # [R]
        per = torch.maximum(-adv * ratio[:, None], -adv * clipped[:, None])  # [B, R]
        loss = (per.mean(dim=0) * w).sum()

    with torch.no_grad():
        d = diff.detach()
        rt = ratio.detach()
        stats = {
            "policy_loss": loss.detach(),
            "clipfrac": ((rt - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (d * d).mean(),
            "ratio_mean": rt.mean(),
            "ratio_min": rt.min(),
            "ratio_max": rt.max(),
        }
    return loss, stats


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...] -> [B]``: mean over every non-batch dimension (identity for ``[B]``)."""
    return x.reshape(x.shape[0], -1).mean(dim=1) if x.dim() > 1 else x


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: Union[float, torch.Tensor]) -> torch.Tensor:
    """KL between two Gaussian SDE steps that share their standard deviation, per sample.

    For ``p = N(mu, sigma^2 I)`` (policy) and ``q = N(mu_ref, sigma^2 I)`` (reference, LoRA disabled)::

        KL(p || q) = ||mu - mu_ref||^2 / (2 sigma^2)            (summed over the d elements)
        returned   = mean_d (mu - mu_ref)^2 / (2 sigma^2)        -> [B]   (averaged over the d elements)

    i.e. the summed KL divided by ``d``, matching a step log-prob averaged over dimensions.

    Args:
        mean: ``[B, ...]`` policy mean of the next latent (with grad).
        ref_mean: ``[B, ...]`` reference mean; detached here (no gradient flows into the reference).
        std: sigma -- a float, a 0-d tensor, a ``[B]`` tensor (one sigma per sample) or any tensor that
            broadcasts against ``mean``. Must be positive.

    Returns:
        ``[B]`` KL per sample (>= 0, zero when the means agree).
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} != ref_mean shape {tuple(ref_mean.shape)}")
    if mean.dim() == 0:
        raise ValueError("mean must have a batch dimension [B, ...]")
    sigma = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if sigma.dim() == 1 and sigma.shape[0] == mean.shape[0] and mean.dim() > 1:
        sigma = sigma.reshape(-1, *([1] * (mean.dim() - 1)))                 # [B] -> [B, 1, ..., 1]
    try:
        torch.broadcast_shapes(sigma.shape, mean.shape)
    except RuntimeError:
        raise ValueError(f"std of shape {tuple(sigma.shape)} does not broadcast against mean of shape "
                         f"{tuple(mean.shape)}; pass a float, [B], or a broadcastable tensor") from None
    if (sigma.detach() <= 0).any():
        raise ValueError("std must be > 0 for the KL term (a deterministic eta = 0 step has no KL); "
                         "sample with sampling.eta > 0 or set train.kl_beta = 0")
    diff = mean - ref_mean.detach()
    return _per_sample_mean(diff * diff / (2.0 * sigma * sigma))


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber distance per sample (consistency-distillation loss ``L_CD``)::

        L(x, y) = sqrt( ||x - y||^2 / d + c^2 ) - c             -> [B],  d = elements per sample

    The squared norm is divided by ``d`` (a per-element mean), so ``c`` is on the scale of one element
    and the loss does not grow with resolution; the un-normalised form ``sqrt(||x-y||^2 + c'^2) - c'``
    of Song & Dhariwal (2023) corresponds to ``c' = c * sqrt(d)`` and a result ``sqrt(d)`` times larger.
    ``L`` is 0 when ``x == y``, behaves like ``||x-y||^2 / (2 c d)`` for small and like the RMS distance
    for large differences, and is smooth everywhere (``c > 0``).

    Args:
        x: ``[B, ...]`` prediction (with grad).
        y: ``[B, ...]`` target (stop-gradient/EMA or teacher output); not detached here -- detach it
            yourself if it must not receive gradient.
        c: positive constant, default ``0.001``.
    """
    if x.shape != y.shape:
        raise ValueError(f"x shape {tuple(x.shape)} != y shape {tuple(y.shape)}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension [B, ...]")
    if not c > 0:
        raise ValueError(f"c must be > 0 (c = 0 is the RMS distance, not differentiable at 0), got {c}")
    diff = x - y
    return torch.sqrt(_per_sample_mean(diff * diff) + c * c) - c
