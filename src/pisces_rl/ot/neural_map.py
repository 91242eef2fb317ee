"""Text→video embedding maps for the PISCES quality reward: Neural OT and the L2-regression baseline.

:class:`NeuralOTMap` learns the Monge map ``T`` from the distribution μ of text [CLS] embeddings ``y`` to the
distribution ν of real-video embeddings ``x`` with Neural Optimal Transport (Korotin, Selikhanovych & Burnaev,
ICLR 2023; PISCES, arXiv 2602.01624, §3.2). With a critic (Kantorovich potential) ``f``, it solves the max–min
problem::

    sup_f inf_T  E_ν[f(x)] + E_μ[ c(y, T(y)) − f(T(y)) ],     c(y, x) = mean_d (y_d − x_d)²

by alternating ``k_t`` steps of ``loss_T = mse(T(y), y) − mean f(T(y))`` with one step of
``loss_f = mean f(T(y)) − mean f(x)``. Batches of ``y`` and ``x`` are drawn independently: the pairing of the
corpus is only used for model selection on held-out pairs (:func:`~pisces_rl.ot.metrics.mutual_knn` between
``T(Y_val)`` and ``X_val``; :func:`~pisces_rl.ot.metrics.distance_spearman` is reported too), and the best
checkpoint by held-out mutual-kNN is restored when ``fit`` ends.

:class:`L2RegressionMap` (the "L2 regression" row of PISCES Table 4) fits ``g(y) ≈ x`` by MSE on the *pairs*.

Both maps **L2-normalise their input** before mapping, in ``fit`` and in ``__call__`` (PISCES trains and
applies ``T`` on L2-normalised text features); outputs are not normalised. ``input_normalization="none"``
maps the input as given (what the released PISCES trainer does, on InternVideo2 ``text_proj`` features).
Both save as ``config.json`` + ``model.safetensors`` (never pickle).

Architecture and training follow the released PISCES code (roar-ai/pisces ``fastvideo/optimal_transport.py``
and ``train_OT_map.py``): ``T`` and ``f`` are ``Linear → ReLU → LayerNorm → Linear → ReLU → LayerNorm →
Linear`` (state-dict keys ``net.{0,2,3,5,6}`` there, ``transport.{0,2,3,5,6}`` here); Adam (weight decay
1e-10), gradients clipped to norm 1.0 at every step of either network, and a cosine learning-rate decay over
the outer steps to a floor of ``0.05 * lr``. Maps saved before this layout (``Linear → LayerNorm → ReLU``,
no ``layout`` in their config) still load, as ``layout="linear_norm_relu"``. A released PISCES map (a
``.pt`` state dict) loads with :func:`pisces_rl.ot.load_released_ot_map` or :func:`load_map`.

Example::

    >>> ot_map = NeuralOTMap(dim=32, hidden=64)
    >>> history = ot_map.fit(text_emb, video_emb, steps=500, progress=False)   # [N, 32] each
    >>> ot_map.save_pretrained("runs/ot_map")
    >>> NeuralOTMap.from_pretrained("runs/ot_map")(text_emb[:4]).shape
    torch.Size([4, 32])
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._training import _Batches, _check_fit_args, _cosine_schedules, _evaluate

__all__ = ["NeuralOTMap", "L2RegressionMap", "load_map"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LAYOUTS = ("linear_relu_norm", "linear_norm_relu")  # released PISCES order; pisces_rl's order before it
LEGACY_LAYOUT = "linear_norm_relu"  # what a saved config without "layout" holds
NORMALIZATIONS = ("l2", "none")
GRAD_CLIP = 1.0        # released train_OT_map.py --grad-clip
MIN_LR_RATIO = 0.05    # released train_OT_map.py: CosineAnnealingLR(eta_min=0.05 * lr)
WEIGHT_DECAY = 1e-10   # released train_OT_map.py --weight-decay


def mlp(dim_in: int, hidden: int, dim_out: int, layout: str = "linear_relu_norm") -> nn.Sequential:
    """3-layer MLP ``dim_in → hidden → hidden → dim_out``.

    ``"linear_relu_norm"`` (default, the released PISCES ``OptimalTransportMap`` / ``PotentialNetwork``):
    ``Linear, ReLU, LayerNorm, Linear, ReLU, LayerNorm, Linear`` — parameters at indices 0, 2, 3, 5, 6.
    ``"linear_norm_relu"``: ``Linear, LayerNorm, ReLU, ...`` (maps saved by earlier pisces_rl versions).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    def block(width: int) -> list:
        return [nn.ReLU(), nn.LayerNorm(width)] if layout == "linear_relu_norm" else [nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(nn.Linear(dim_in, hidden), *block(hidden), nn.Linear(hidden, hidden), *block(hidden),
                         nn.Linear(hidden, dim_out))


class _EmbeddingMap(nn.Module):
    """Shared plumbing: input normalisation, device handling, save/load and the fit loop with model selection."""

    def __init__(self, dim: int, hidden: int, layout: str = "linear_relu_norm", input_normalization: str = "l2"):
        super().__init__()
        if isinstance(dim, bool) or int(dim) != dim or dim < 1 or int(hidden) != hidden or hidden < 0:
            raise ValueError(f"{type(self).__name__} needs integer dim >= 1 and hidden >= 0, got dim={dim}, "
                             f"hidden={hidden}")
        if layout not in LAYOUTS or input_normalization not in NORMALIZATIONS:
            raise ValueError(f"{type(self).__name__} needs layout in {LAYOUTS} and input_normalization in "
                             f"{NORMALIZATIONS}, got {layout!r}, {input_normalization!r}")
        self.dim, self.hidden = int(dim), int(hidden)
        self.layout, self.input_normalization = layout, input_normalization

    def _prepare(self, text: Tensor) -> Tensor:
        """The map's input: ``text`` L2-normalised (``input_normalization="l2"``) or as given."""
        return F.normalize(text, dim=-1) if self.input_normalization == "l2" else text

    # -- mapping -----------------------------------------------------------------------------------------------
    def _map(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "layout": self.layout,
                "input_normalization": self.input_normalization}

    def forward(self, text: Tensor) -> Tensor:
        """Map text embeddings ``[B, D]`` (or ``[D]``) to the video-embedding space: ``[B, D]`` (or ``[D]``).

        The input is L2-normalised first (unless ``input_normalization="none"``). Runs on the map's device and
        returns on the input's device and dtype; autograd flows when grad mode is on.
        """
        if not isinstance(text, Tensor) or text.dim() not in (1, 2) or text.shape[-1] != self.dim:
            shape = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"{type(self).__name__} expects text embeddings [B, {self.dim}], got {shape}")
        param = next(self.parameters())
        y = self._prepare(text.to(device=param.device, dtype=param.dtype))
        return self._map(y).to(device=text.device, dtype=text.dtype)

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, Path]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (all weights, fp32 on CPU) to ``save_directory``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"map_type": type(self).__name__})
        config = {"map_type": type(self).__name__, **self._config()}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, pretrained_dir: Union[str, Path], device: Union[str, torch.device] = "cpu"):
        """Load a map saved by :meth:`save_pretrained` (in eval mode, on ``device``)."""
        path, config = _read_config(pretrained_dir)
        if config["map_type"] != cls.__name__:
            raise ValueError(f"{str(path)!r} holds a {config['map_type']}, not a {cls.__name__}; load it with "
                             f"{config['map_type']}.from_pretrained(...) or pisces_rl.ot.load_map(...)")
        kwargs = {"layout": LEGACY_LAYOUT, **{k: v for k, v in config.items() if k != "map_type"}}
        try:
            model = cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{path / CONFIG_NAME} has options {cls.__name__} does not take ({exc})") from None
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {WEIGHTS_NAME}; it was not written by save_pretrained "
                                    "(re-save the map, or fit one with `pisces-rl fit-ot-map`)")
        try:
            model.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{weights} does not match its config.json ({exc}); re-save the map") from None
        return model.to(device).eval()

    # -- fitting -----------------------------------------------------------------------------------------------
    def _fit(self, text: Tensor, video: Tensor, *, steps: int, batch_size: int, lr: float, val_fraction: float,
             eval_every: Optional[int], seed: int, progress: bool, max_eval_pairs: int,
             make_step: Callable[[_Batches], Callable[[], dict]]) -> dict:
        """Split, train ``steps`` outer steps, evaluate every ``eval_every``, restore the best checkpoint."""
        _check_fit_args(self, text, video, steps, batch_size, lr, val_fraction, eval_every, max_eval_pairs)
        device = next(self.parameters()).device
        order = torch.randperm(len(text), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(val_fraction * len(text)))
        if 0 < n_val < 3 or len(text) - n_val < 2:
            raise ValueError(f"val_fraction={val_fraction} splits {len(text)} pairs into {n_val} held-out and "
                             f"{len(text) - n_val} training pairs; need >= 3 held-out (or val_fraction=0, no model "
                             "selection) and >= 2 for training")
        val_idx, train_idx = order[:min(n_val, max_eval_pairs)], order[n_val:]
        text = self._prepare(text.detach().float())  # what the map sees (L2-normalised by default)
        video = video.detach().float()
        batches = _Batches(text[train_idx.to(text.device)], video[train_idx.to(video.device)],
                           min(batch_size, len(train_idx)), device, seed + 1)
        val = (text[val_idx.to(text.device)], video[val_idx.to(video.device)]) if n_val else None
        history: dict = {"train": [], "eval": [], "num_train": len(train_idx), "num_val": len(val_idx)}
        if val is not None:
            history["identity"] = _evaluate(lambda y: y, *val)
        eval_every = eval_every or max(1, steps // 10)
        step_fn = make_step(batches)
        best = (-math.inf, None, None)  # (mknn, step, state)
        sums: dict = {}
        from tqdm.auto import tqdm

        bar = tqdm(range(1, steps + 1), desc=f"fit {type(self).__name__}", disable=not progress, unit="step")
        self.train()
        for step in bar:
            for key, value in step_fn().items():
                sums[key] = sums.get(key, 0.0) + value
            if step % eval_every and step != steps:
                continue
            count = step - (history["train"][-1]["step"] if history["train"] else 0)
            history["train"].append({"step": step, **{k: v / count for k, v in sums.items()}})
            sums = {}
            if val is not None:
                self.eval()
                with torch.no_grad():
                    metrics = _evaluate(self._map, *(t.to(device) for t in val))
                self.train()
                history["eval"].append({"step": step, **metrics})
                if metrics["mknn"] > best[0]:
                    best = (metrics["mknn"], step, copy.deepcopy(self.state_dict()))
                bar.set_postfix(mknn=f"{metrics['mknn']:.3f}", best=f"{best[0]:.3f}")
        self.eval()
        if best[2] is not None:
            self.load_state_dict(best[2])
            history["best"] = {"step": best[1], **next(e for e in history["eval"] if e["step"] == best[1])}
        return history


class NeuralOTMap(_EmbeddingMap):
    """Neural OT map ``T: text-emb → video-emb`` with critic ``f`` (both 3-layer MLPs, ReLU + LayerNorm).

    Args:
        dim: embedding size ``D`` (text and video live in the same ``D``-d space, e.g. the encoder's ITC space).
        hidden: hidden width of ``T`` (``D → hidden → hidden → D``) and of ``f`` (``D → hidden → hidden → 1``).
        layout: ``"linear_relu_norm"`` (the released PISCES MLP) or ``"linear_norm_relu"`` (older saved maps).
        input_normalization: ``"l2"`` (default) or ``"none"``.

    ``ot_map(text[B, D]) -> [B, D]`` applies ``T`` to the L2-normalised text embeddings.
    """

    def __init__(self, dim: int = 512, hidden: int = 1024, layout: str = "linear_relu_norm",
                 input_normalization: str = "l2"):
        super().__init__(dim, hidden, layout, input_normalization)
        if self.hidden < 1:
            raise ValueError(f"NeuralOTMap needs hidden >= 1, got {hidden}")
        self.transport = mlp(self.dim, self.hidden, self.dim, layout)  # T
        self.critic = mlp(self.dim, self.hidden, 1, layout)  # f

    def _map(self, y: Tensor) -> Tensor:
        return self.transport(y)

    def potential(self, x: Tensor) -> Tensor:
        """Critic (Kantorovich potential) ``f(x)``: ``[B, D] -> [B]``."""
        return self.critic(x).squeeze(-1)

    def fit(self, text_embeddings: Tensor, video_embeddings: Tensor, *, steps: int, batch_size: int = 128,
            lr: float = 1e-4, k_t: int = 10, val_fraction: float = 0.1, eval_every: Optional[int] = None,
            seed: int = 0, progress: bool = True, max_eval_pairs: int = 2048, grad_clip: Optional[float] = GRAD_CLIP,
            min_lr_ratio: float = MIN_LR_RATIO) -> dict:
        """Train ``T`` and ``f`` on a captioned corpus (Korotin et al. 2023, Alg. 1 with the quadratic cost).

        Args:
            text_embeddings: ``[N, D]`` text [CLS] embeddings (L2-normalised here if they are not).
            video_embeddings: ``[N, D]`` embeddings of the paired real videos (row ``i`` of both = one pair).
            steps: outer steps; each runs ``k_t`` Adam steps on ``T`` and one on ``f`` (fresh batches each).
            batch_size: samples per batch (capped at the training-set size).
            lr: Adam learning rate of ``T`` and ``f`` (weight decay 1e-10), decayed by a cosine schedule over
                ``steps`` to ``min_lr_ratio * lr``.
            k_t: ``T`` steps per critic step.
            val_fraction: share of pairs held out for model selection (0: none, keep the last weights): the
                first ``round(val_fraction * N)`` indices of ``torch.randperm(N)`` drawn with ``seed``.
            eval_every: outer steps between held-out evaluations (default ``steps // 10``); also at the end.
            seed: seeds the train/held-out split and the batch sampling (weights are initialised at construction).
            progress: show a tqdm progress bar.
            max_eval_pairs: cap on the held-out pairs scored (the metrics cost O(N²) memory).
            grad_clip: max gradient norm of each network at each of its steps (None = no clipping); released 1.0.
            min_lr_ratio: the cosine schedule's floor as a fraction of ``lr``; released 0.05.

        Returns:
            ``{"train": [{"step", "loss_T", "loss_f", "lr"}...], "eval": [{"step", "mknn", "spearman"}...],
            "identity": {...}, "best": {...}, "num_train", "num_val"}`` — losses and learning rate (after each
            step) averaged since the previous record; ``identity`` scores the unmapped text; ``best`` is the
            restored checkpoint.
        """
        if isinstance(k_t, bool) or int(k_t) != k_t or k_t < 1:
            raise ValueError(f"k_t must be a positive integer, got {k_t}")
        if (grad_clip is not None and not grad_clip > 0) or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"grad_clip must be > 0 or None and min_lr_ratio in [0, 1], got {grad_clip}, "
                             f"{min_lr_ratio}")
        opt_t = torch.optim.Adam(self.transport.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        opt_f = torch.optim.Adam(self.critic.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        schedules = _cosine_schedules([opt_t, opt_f], int(steps), min_lr_ratio)

        def clip(module: nn.Module) -> None:
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)

        def make_step(batches: _Batches):
            def step() -> dict:
                self.critic.requires_grad_(False)
                for _ in range(int(k_t)):
                    y = batches.text_batch()
                    mapped = self.transport(y)
                    loss_t = F.mse_loss(mapped, y) - self.potential(mapped).mean()
                    opt_t.zero_grad(set_to_none=True)
                    loss_t.backward()
                    clip(self.transport)
                    opt_t.step()
                self.critic.requires_grad_(True)
                with torch.no_grad():
                    mapped = self.transport(batches.text_batch())
                loss_f = self.potential(mapped).mean() - self.potential(batches.video_batch()).mean()
                opt_f.zero_grad(set_to_none=True)
                loss_f.backward()
                clip(self.critic)
                opt_f.step()
                for schedule in schedules:
                    schedule.step()
                return {"loss_T": loss_t.item(), "loss_f": loss_f.item(), "lr": opt_t.param_groups[0]["lr"]}
            return step

        return self._fit(text_embeddings, video_embeddings, steps=int(steps), batch_size=int(batch_size), lr=lr,
                         val_fraction=val_fraction, eval_every=eval_every, seed=seed, progress=progress,
                         max_eval_pairs=max_eval_pairs, make_step=make_step)


class L2RegressionMap(_EmbeddingMap):
    """Regression baseline ``g(y) ≈ x`` fitted by MSE on paired (text, video) embeddings (PISCES Table 4).

    Args:
        dim: embedding size ``D``.
        hidden: hidden width of the 3-layer MLP ``D → hidden → hidden → D`` (ReLU + LayerNorm);
            ``hidden=0`` gives a linear regression ``g(y) = W y + c``.
        layout, input_normalization: as for :class:`NeuralOTMap` (the same MLP as ``T``).

    Trained with plain Adam and a cosine decay to 0 (the released code has no trainer for this baseline).
    """

    def __init__(self, dim: int = 512, hidden: int = 1024, layout: str = "linear_relu_norm",
                 input_normalization: str = "l2"):
        super().__init__(dim, hidden, layout, input_normalization)
        self.regressor = (nn.Linear(self.dim, self.dim) if self.hidden == 0
                          else mlp(self.dim, self.hidden, self.dim, layout))

    def _map(self, y: Tensor) -> Tensor:
        return self.regressor(y)

    def fit(self, text_embeddings: Tensor, video_embeddings: Tensor, *, steps: int, batch_size: int = 128,
            lr: float = 1e-4, val_fraction: float = 0.1, eval_every: Optional[int] = None, seed: int = 0,
            progress: bool = True, max_eval_pairs: int = 2048) -> dict:
        """Minimise ``mse(g(y_i), x_i)`` over paired batches with Adam + cosine decay; ``steps`` Adam steps.

        Arguments, held-out model selection and the returned history are as in :meth:`NeuralOTMap.fit`
        (the train records hold ``loss``).
        """
        opt = torch.optim.Adam(self.regressor.parameters(), lr=lr)
        (schedule,) = _cosine_schedules([opt], int(steps))

        def make_step(batches: _Batches):
            def step() -> dict:
                y, x = batches.pairs()
                loss = F.mse_loss(self.regressor(y), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                return {"loss": loss.item()}
            return step

        return self._fit(text_embeddings, video_embeddings, steps=int(steps), batch_size=int(batch_size), lr=lr,
                         val_fraction=val_fraction, eval_every=eval_every, seed=seed, progress=progress,
                         max_eval_pairs=max_eval_pairs, make_step=make_step)


MAP_CLASSES = {cls.__name__: cls for cls in (NeuralOTMap, L2RegressionMap)}


def _read_config(pretrained_dir: Union[str, Path]) -> tuple[Path, dict]:
    path = Path(pretrained_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"OT map directory {str(path)!r} does not exist; save a map there with "
                                "save_pretrained(...) or fit one with `pisces-rl fit-ot-map --output DIR`")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}; it was not written by save_pretrained "
                                "(re-save the map, or fit one with `pisces-rl fit-ot-map`)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc}); re-save the map") from None
    if not isinstance(config, dict) or config.get("map_type") not in MAP_CLASSES:
        raise ValueError(f"{config_file} does not name a known map_type (expected one of {sorted(MAP_CLASSES)})")
    return path, config


def load_map(pretrained_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> _EmbeddingMap:
    """Load whichever map (``NeuralOTMap`` or ``L2RegressionMap``) ``save_pretrained`` wrote to the directory.

    A *file* (``.pt`` / ``.pth``) is read as a released PISCES OT-map checkpoint
    (:func:`pisces_rl.ot.released.load_released_ot_map`).
    """
    if Path(pretrained_dir).is_file():
        from .released import load_released_ot_map

        return load_released_ot_map(pretrained_dir, device=device)
    _, config = _read_config(pretrained_dir)
    return MAP_CLASSES[config["map_type"]].from_pretrained(pretrained_dir, device=device)
