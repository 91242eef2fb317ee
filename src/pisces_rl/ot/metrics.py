"""Paired-embedding alignment metrics used to select the text→video OT map (PISCES, arXiv 2602.01624, Table 4).

Both metrics compare two embeddings of the *same* ``N`` items (row ``i`` of ``a`` and of ``b`` describe one
caption/video pair) by the neighbourhood structure each induces, so they are unchanged when either side is
rotated or (for the mutual-kNN) rescaled:

* :func:`mutual_knn` — mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
  Hypothesis"): the average fraction of the ``k`` nearest neighbours of item ``i`` that agree between ``a`` and ``b``.
* :func:`distance_spearman` — Spearman rank correlation between the pairwise Euclidean distances of ``a`` and of ``b``.

Example::

    >>> x = torch.randn(100, 16)
    >>> mutual_knn(x, 3 * x, k=10), distance_spearman(x, x + 1.0)
    (1.0, 1.0)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mutual_knn", "distance_spearman"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise ValueError(f"{name} expects two torch.Tensors [N, D], got {type(a).__name__}, {type(b).__name__}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"{name} expects paired embeddings a[N, Da], b[N, Db] with the same N, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


@torch.no_grad()
def knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of each row's ``k`` nearest other rows by cosine similarity (self excluded)."""
    x = F.normalize(x.detach().double(), dim=-1)
    sim = x @ x.T  # [N, N]
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


@torch.no_grad()
def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mutual k-NN alignment of paired embeddings ``a[N, Da]`` and ``b[N, Db]``, in [0, 1].

    ``mKNN = (1/N) Σ_i |kNN_a(i) ∩ kNN_b(i)| / k``, where ``kNN_a(i)`` are the ``k`` rows of ``a`` with the
    highest cosine similarity to ``a_i`` (``i`` itself excluded). 1 means identical neighbourhoods; for unrelated
    embeddings it is about ``k / (N - 1)``. Needs ``1 <= k < N``.
    """
    _check_pair(a, b, "mutual_knn")
    n = a.shape[0]
    if isinstance(k, bool) or int(k) != k or not 1 <= k < n:
        raise ValueError(f"mutual_knn needs an integer 1 <= k < N = {n}, got k={k}; lower k or pass more pairs")
    k = int(k)
    na, nb = knn_indices(a, k), knn_indices(b.to(a.device), k)  # [N, k] each
    hits = torch.zeros(n, n, dtype=torch.int8, device=a.device)
    hits.scatter_(1, na, 1)
    shared = hits.gather(1, nb).sum(dim=1)  # [N] neighbours of i found in both lists
    return float(shared.double().mean() / k)


@torch.no_grad()
def distance_spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman ρ between the pairwise Euclidean distances of paired embeddings ``x[N, Dx]`` and ``y[N, Dy]``.

    With ``d^x_{ij} = ||x_i − x_j||₂`` over the ``N(N−1)/2`` pairs ``i < j``, returns the Pearson correlation of the
    ranks of ``d^x`` and ``d^y`` (ties share their average rank, as in ``scipy.stats.spearmanr``). Needs
    ``N >= 3``; returns NaN if one side has all distances equal.
    """
    _check_pair(x, y, "distance_spearman")
    if x.shape[0] < 3:
        raise ValueError(f"distance_spearman needs at least 3 pairs, got {x.shape[0]}")
    rx = _average_ranks(torch.pdist(x.detach().double()))
    ry = _average_ranks(torch.pdist(y.detach().double().to(x.device)))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = rx.norm() * ry.norm()
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # last rank of each distinct value
    return (ends - (counts.double() - 1) / 2)[inverse]
