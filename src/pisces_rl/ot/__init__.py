"""Optimal-transport solvers and maps used by the PISCES rewards."""
from .sinkhorn import marginal_relaxation, unbalanced_sinkhorn

__all__ = ["unbalanced_sinkhorn", "marginal_relaxation"]
