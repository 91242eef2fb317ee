"""Entropic unbalanced optimal transport (PISCES Algorithm 3), log-domain and batched.

Problem (Chizat et al. 2018; PISCES, arXiv 2602.01624, Alg. 3)::

    P* = argmin_P  <P, C> + eps * KL(P | 1) + rho * KL(P 1 | a) + rho * KL(P^T 1 | b)

with the KL-relaxed marginals weighted by ``rho = eps * m / (1 - m)``, where ``m`` is the
*transported mass* fraction. Writing ``tau = rho / (rho + eps)`` (which equals ``m``), the
log-domain scaling iterations are::

    log u <- tau * (log a - LSE_j(-C_ij / eps + log v_j))
    log v <- tau * (log b - LSE_i(-C_ij / eps + log u_i))
    P_ij   = exp(log u_i - C_ij / eps + log v_j)

``m >= 0.999`` is treated as balanced OT (``tau = 1``, plain log-domain Sinkhorn).
At convergence the plan equals POT's
``ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=eps, reg_m=rho, reg_type="entropy")``.

Example::

    >>> C = torch.rand(8, 4, 24, 513)            # [batch, heads, N text tokens, M video tokens]
    >>> P = unbalanced_sinkhorn(C, epsilon=0.05, mass=0.9)
    >>> P.shape
    torch.Size([8, 4, 24, 513])
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["unbalanced_sinkhorn", "marginal_relaxation"]

BALANCED_MASS = 0.999


def marginal_relaxation(epsilon: float, mass: float) -> float:
    """``rho = eps * m / (1 - m)``: the KL marginal weight that transports fraction ``m``.

    Returns ``inf`` for ``mass >= 0.999`` (balanced OT).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    if mass >= BALANCED_MASS:
        return float("inf")
    return epsilon * mass / (1.0 - mass)


def _log_marginal(w: Optional[torch.Tensor], shape: torch.Size, n: int, like: torch.Tensor) -> torch.Tensor:
    """Log of a marginal broadcast to ``shape[:-1] + (n,)``; uniform ``1/n`` when ``w`` is None."""
    if w is None:
        return torch.full((*shape, n), -torch.log(torch.tensor(float(n), dtype=like.dtype)).item(),
                          dtype=like.dtype, device=like.device)
    w = w.to(dtype=like.dtype, device=like.device)
    if (w < 0).any():
        raise ValueError("marginal weights must be non-negative")
    return torch.log(w).expand(*shape, n)


def unbalanced_sinkhorn(
    cost: torch.Tensor,
    epsilon: float = 0.05,
    mass: float = 0.9,
    max_iter: int = 200,
    tol: float = 1e-3,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Entropic unbalanced OT plan with KL-relaxed marginals, batched over leading dims.

    Args:
        cost: ``[..., N, M]`` cost matrices (any leading batch dims, e.g. ``[B, heads, N, M]``).
        epsilon: entropic regularisation ``eps``.
        mass: transported fraction ``m`` in (0, 1]; ``>= 0.999`` means balanced OT.
        max_iter: maximum number of (u, v) updates.
        tol: stop when both log-potential updates move less than ``tol`` (sup norm over the batch).
        a: source marginal ``[..., N]`` (broadcastable); uniform ``1/N`` if None. Zeros mask rows out.
        b: target marginal ``[..., M]`` (broadcastable); uniform ``1/M`` if None. Zeros mask columns out.

    Returns:
        The plan ``P`` of shape ``[..., N, M]`` (same dtype as ``cost``). Masked rows/columns are 0.
    """
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape [..., N, M], got {tuple(cost.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    rho = marginal_relaxation(epsilon, mass)
    tau = 1.0 if rho == float("inf") else rho / (rho + epsilon)

    *batch, n, m = cost.shape
    batch = torch.Size(batch)
    log_a = _log_marginal(a, batch, n, cost)  # [..., N]
    log_b = _log_marginal(b, batch, m, cost)  # [..., M]
    log_k = -cost / epsilon  # [..., N, M]

    log_u = torch.zeros_like(log_a)
    log_v = torch.zeros_like(log_b)
    for _ in range(max_iter):
        new_u = tau * (log_a - torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1))
        new_v = tau * (log_b - torch.logsumexp(log_k + new_u.unsqueeze(-1), dim=-2))
        du = _sup_change(new_u, log_u)
        dv = _sup_change(new_v, log_v)
        log_u, log_v = new_u, new_v
        if du < tol and dv < tol:
            break
    return torch.exp(log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2))


def _sup_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """Sup-norm change between two log-potentials, ignoring masked (-inf) entries."""
    finite = torch.isfinite(new) & torch.isfinite(old)
    if not finite.any():
        return 0.0
    return (new - old).abs().masked_fill(~finite, 0.0).max().item()
