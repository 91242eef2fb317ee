"""Optimal-transport pieces of the PISCES rewards.

* :func:`unbalanced_sinkhorn` — batched entropic unbalanced OT (token-level semantic reward, Alg. 3);
* :class:`NeuralOTMap` / :class:`L2RegressionMap` — text→video embedding maps (quality reward), with
  :func:`load_map` to load either from a ``save_pretrained`` directory, and :func:`load_released_ot_map` for a
  map released with the PISCES code (a ``.pt`` state dict; ``load_map`` also accepts that file);
* :func:`mutual_knn` / :func:`distance_spearman` — held-out alignment metrics used to select the map.
"""
from .metrics import distance_spearman, mutual_knn
from .neural_map import L2RegressionMap, NeuralOTMap, load_map
from .released import extract_ot_map_state_dict, load_released_ot_map
from .sinkhorn import marginal_relaxation, unbalanced_sinkhorn

__all__ = [
    "unbalanced_sinkhorn",
    "marginal_relaxation",
    "NeuralOTMap",
    "L2RegressionMap",
    "load_map",
    "load_released_ot_map",
    "extract_ot_map_state_dict",
    "mutual_knn",
    "distance_spearman",
]
