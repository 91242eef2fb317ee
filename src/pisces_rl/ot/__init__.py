"""Optimal-transport pieces of the PISCES rewards.

* :func:`unbalanced_sinkhorn` — batched entropic unbalanced OT (token-level semantic reward, Alg. 3);
* :class:`NeuralOTMap` / :class:`L2RegressionMap` — text→video embedding maps (quality reward), with
  :func:`load_map` to load either from a ``save_pretrained`` directory;
* :func:`mutual_knn` / :func:`distance_spearman` — held-out alignment metrics used to select the map.
"""
from .metrics import distance_spearman, mutual_knn
from .neural_map import L2RegressionMap, NeuralOTMap, load_map
from .sinkhorn import marginal_relaxation, unbalanced_sinkhorn

__all__ = [
    "unbalanced_sinkhorn",
    "marginal_relaxation",
    "NeuralOTMap",
    "L2RegressionMap",
    "load_map",
    "mutual_knn",
    "distance_spearman",
]
