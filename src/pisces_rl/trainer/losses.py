"""Losses of the PISCES trainers as small, stateless functions.

* :func:`clipped_policy_loss` -- PPO-clip surrogate on per-step log-probs (GRPO paradigm).
* :func:`gaussian_kl` -- KL between the policy's and the reference model's Gaussian SDE steps
  (Flow-GRPO's scale when given the step's ``dt``).
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
        clip_range: ``eps > 0`` (``train.epsilon``); PISCES/Flow-GRPO use a tiny value such as ``1e-4``.
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
        raise ValueError(f"clip_range must be > 0, got {clip_range} (set train.epsilon)")

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


def _as_column(value: Union[float, torch.Tensor], like: torch.Tensor, name: str) -> torch.Tensor:
    """A float, 0-d, ``[B]`` or broadcastable tensor as a tensor that broadcasts against ``like`` ``[B, ...]``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 1 and t.shape[0] == like.shape[0] and like.dim() > 1:
        t = t.reshape(-1, *([1] * (like.dim() - 1)))                        # [B] -> [B, 1, ..., 1]
    try:
        torch.broadcast_shapes(t.shape, like.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast against mean of shape "
                         f"{tuple(like.shape)}; pass a float, [B], or a broadcastable tensor") from None
    return t


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: Union[float, torch.Tensor],
                dt: Optional[Union[float, torch.Tensor]] = None, noise_block: int = 1) -> torch.Tensor:
    """KL between the policy's and the reference model's Gaussian SDE steps (shared std), per sample.

    One SDE step is ``x' ~ N(mu, std^2 I)`` with ``std = g * sqrt(|dt|)``: ``g`` is the diffusion coefficient
    (Flow-GRPO: ``g = s_t = eta * sqrt(sigma / (1 - sigma))``; DanceGRPO/PISCES: ``g = eta``) and ``dt`` the
    step in noise level. For ``p = N(mu, std^2 I)`` (policy) and ``q = N(mu_ref, std^2 I)`` (LoRA disabled)::

        exact   (dt=None):  mean_d (mu - mu_ref)^2 / (2 std^2)                        -> [B]
        anchor  (dt given): mean_d (mu - mu_ref)^2 / (2 std^2 / |dt|)  = |dt| * exact  -> [B]

    The *anchor* form divides by ``g^2 = std^2 / |dt|``, as Flow-GRPO does: its ``sde_step_with_logprob``
    returns ``std_dev_t = s_t`` (without ``sqrt(-dt)``) and ``train_sd3.py`` computes
    ``kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1,2,3)) / (2 * std_dev_t ** 2)``
    (yifan123/flow_grpo, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` and ``scripts/train_sd3.py``).
    Published ``beta`` values (Flow-GRPO 0.004--0.04) are on that scale; the GRPO trainer uses it. Taking the
    step's own ``std`` and ``dt`` keeps the convention defined for any SDE (``sampling.sde_type``): the exact
    KL is ``anchor / |dt|``, 7 to 55 times larger on typical 16--20 step grids.

    For ``sampling.sde_type = "ddim"`` (DDPO's DDIM step; DDPO itself has no KL) ``mean`` and ``std`` are the flow-
    coordinate ones the step returns and ``dt = sigma_next - sigma`` the flow step, so the trainer's value is
    ``|sigma' - sigma| * mean_d (mu - mu_ref)^2 / (2 std^2)``: the *exact* part is the KL of the two DDIM
    transitions, the same in VP coordinates (mean and std are both scaled by ``sqrt(ab') + sqrt(1 - ab')``), and
    the factor ``|dt|`` puts it on the same (Flow-GRPO) scale as the flow types, ``g^2 = std^2 / |dt|``.

    "mean_d" averages over the latent's elements, like the step log-prob (Flow-GRPO), so the value does not
    grow with the video size. With ``noise_block = k > 1`` the step's density lives on the ``k x k``
    block-constant subspace (:mod:`pisces_rl.rollout.sde`): only the block-averaged mean difference counts,
    ``U^T (mu - mu_ref) = k * avgpool_k(mu - mu_ref)``, averaged over the ``k^2`` times fewer coordinates.
    Then ``exact == log p(mu) - log q(mu)`` with the rollout's own step log-probs.

    Args:
        mean: ``[B, C, F, h, w]`` (any ``[B, ...]``) policy mean of the next latent (with grad).
        ref_mean: ``[B, ...]`` reference mean; detached here (no gradient flows into the reference).
        std: the step's transition std -- a float, 0-d, ``[B]`` (one per sample) or broadcastable tensor; > 0.
        dt: ``sigma_next - sigma`` of the step (sign ignored) -- same forms as ``std``; ``None`` = exact KL.
        noise_block: ``k`` of the rollout's low-dimensional exploration (1 = every element); must divide the
            last two dimensions.

    Returns:
        ``[B]`` KL per sample (>= 0, zero when the (block-averaged) means agree).

    Example::

        >>> mu, ref = torch.zeros(1, 4), torch.full((1, 4), 0.2)
        >>> gaussian_kl(mu, ref, std=0.1, dt=-0.04)     # 0.04 / (2 * 0.01 / 0.04)
        tensor([0.0800])
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} != ref_mean shape {tuple(ref_mean.shape)}")
    if mean.dim() == 0:
        raise ValueError("mean must have a batch dimension [B, ...]")
    sigma = _as_column(std, mean, "std")
    if (sigma.detach() <= 0).any():
        raise ValueError("std must be > 0 for the KL term (a deterministic eta = 0 step has no KL); "
                         "sample with sampling.eta > 0 or set train.beta = 0")
    scale = 2.0 * sigma * sigma                                               # 2 std^2
    if dt is not None:
        step = _as_column(dt, mean, "dt").abs()
        if (step.detach() <= 0).any():
            raise ValueError("dt must be non-zero (sigma_next - sigma of the step)")
        scale = scale / step                                                  # 2 g^2 = 2 std^2 / |dt|
    diff = mean - ref_mean.detach()
    k = int(noise_block)
    if k > 1:
        if diff.dim() < 3 or diff.shape[-1] % k or diff.shape[-2] % k:
            raise ValueError(f"noise_block={k} must divide the latent height and width {tuple(diff.shape[-2:])}")
        *lead, h, w = diff.shape
        diff = diff.reshape(*lead, h // k, k, w // k, k).mean(dim=(-3, -1)) * k   # U^T (mu - mu_ref)
    elif k < 1:
        raise ValueError(f"noise_block must be >= 1, got {noise_block}")
    return _per_sample_mean(diff * diff / scale)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber distance per sample (consistency-distillation loss ``L_CD``), element-wise::

        L(x, y) = mean_d( sqrt((x - y)^2 + c^2) - c )             -> [B],  d = elements per sample

    The form of the PISCES code (roar-ai/pisces ``fastvideo/distill_grpo.py``:
    ``torch.mean(torch.sqrt((model_pred - target) ** 2 + huber_c ** 2) - huber_c)``, ``huber_c = 0.001``),
    diffusers' LCM scripts (``examples/consistency_distillation/train_lcm_distill_*.py``, ``--loss_type huber``)
    and FastVideo: each element behaves like ``(x-y)^2 / (2c)`` for ``|x-y| << c`` and like ``|x-y|`` above
    (L1-like), and the loss is smooth everywhere (``c > 0``). Averaging over the ``d`` elements keeps ``c`` on
    the scale of one element and the loss independent of resolution; their batch mean is ``L.mean()``.

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
        raise ValueError(f"c must be > 0 (c = 0 is the L1 distance, not differentiable at 0), got {c}")
    diff = x - y
    return _per_sample_mean(torch.sqrt(diff * diff + c * c) - c)
