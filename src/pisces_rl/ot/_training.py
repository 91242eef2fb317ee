"""Training plumbing shared by the text→video maps of :mod:`pisces_rl.ot.neural_map`: batches, checks, metrics."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .metrics import distance_spearman, mutual_knn

MKNN_K = 10


class _Batches:
    """Random training batches (with replacement) from a seeded generator; moved to the model's device."""

    def __init__(self, text: Tensor, video: Tensor, batch_size: int, device: torch.device, seed: int):
        self.text, self.video, self.batch_size, self.device = text, video, batch_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def _rows(self, data: Tensor, idx: Tensor) -> Tensor:
        return data[idx.to(data.device)].to(self.device, non_blocking=True)

    def _idx(self) -> Tensor:
        return torch.randint(len(self.text), (self.batch_size,), generator=self.gen)

    def text_batch(self) -> Tensor:  # [batch, D] from μ
        return self._rows(self.text, self._idx())

    def video_batch(self) -> Tensor:  # [batch, D] from ν, drawn independently of text_batch
        return self._rows(self.video, self._idx())

    def pairs(self) -> tuple[Tensor, Tensor]:  # paired ([batch, D], [batch, D])
        idx = self._idx()
        return self._rows(self.text, idx), self._rows(self.video, idx)


def _evaluate(fn: Callable[[Tensor], Tensor], text: Tensor, video: Tensor) -> dict:
    """Held-out paired metrics of ``fn(text)`` against ``video``: mutual-kNN (k = 10, or N − 1) and Spearman ρ."""
    mapped = fn(text)
    k = min(MKNN_K, len(text) - 1)
    return {"mknn": mutual_knn(mapped, video, k=k), "spearman": distance_spearman(mapped, video)}


def _check_fit_args(model, text, video, steps, batch_size, lr, val_fraction, eval_every, max_eval_pairs) -> None:
    name = type(model).__name__
    for label, t in (("text_embeddings", text), ("video_embeddings", video)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != model.dim:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}.fit expects {label} [N, {model.dim}] (dim={model.dim}), got {shape}")
    if len(text) != len(video):
        raise ValueError(f"{name}.fit needs paired embeddings (row i of each describes one caption/video), got "
                         f"{len(text)} texts and {len(video)} videos")
    if not (bool(torch.isfinite(text).all()) and bool(torch.isfinite(video).all())):
        raise ValueError(f"{name}.fit got NaN/inf embeddings; drop those rows first")
    if int(steps) != steps or steps < 1 or int(batch_size) != batch_size or batch_size < 1 or not lr > 0:
        raise ValueError(f"{name}.fit needs integer steps >= 1, batch_size >= 1 and lr > 0, got steps={steps}, "
                         f"batch_size={batch_size}, lr={lr}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if eval_every is not None and (int(eval_every) != eval_every or eval_every < 1):
        raise ValueError(f"eval_every must be a positive integer or None, got {eval_every}")
    if max_eval_pairs < 3:
        raise ValueError(f"max_eval_pairs must be >= 3, got {max_eval_pairs}")


def _cosine_schedules(optimizers, steps: int, min_lr_ratio: float = 0.0):
    """Cosine decay of each optimizer's lr over ``steps`` to ``min_lr_ratio * lr``."""
    return [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=min_lr_ratio * opt.defaults["lr"])
            for opt in optimizers]
