"""Fixed-prompt evaluation of a policy: deterministic samples, reward means, and an optional judge.

A *judge* is a programmatic evaluator that no reward sees (ShapesBench in ShapesWorld, or your own):
``judge(videos[B, F, C, H, W] in [0, 1], prompts: list[str]) -> Mapping[str, float]``. Specs:
``"none"``, ``"shapesbench"``, or ``"package.module:function"``.

"Before" is the base model (LoRA disabled) and "after" the trained policy, on the same prompts and the
same initial noise, so the two are comparable video by video.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..rollout import sample_rollout

__all__ = ["EvalResult", "resolve_judge", "shapesbench_judge", "evaluate_policy", "eval_series"]

Judge = Callable[[torch.Tensor, Sequence[str]], Mapping[str, float]]


def shapesbench_judge(videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """ShapesBench, the judge ShapesWorld registers as ``shapesbench``: Total, Quality, Semantic and every dimension,
    in [0, 1]."""
    judge = resolve_judge("shapesbench")
    if judge is None:
        raise ValueError("no judge 'shapesbench' is registered (ShapesWorld's plugin did not load; reinstall "
                         "pisces_rl with `make install`)")
    return judge(videos, prompts)


def resolve_judge(spec: Optional[str]) -> Optional[Judge]:
    """``None``/``"none"`` -> None; a registered name (:mod:`pisces_rl.registry`, e.g. ``"shapesbench"``) -> that
    judge; ``"pkg.mod:fn"`` -> that callable."""
    from .. import registry

    if spec is None or spec == "none":
        return None
    registered = registry.lookup("judge", spec)
    if registered is not None:
        return registered
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"judge {spec!r}: use 'none', 'shapesbench' or an import path 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"judge {spec!r} could not be imported ({err}); check the module is on PYTHONPATH and "
                         f"defines {name!r}") from err
    if not callable(fn):
        raise ValueError(f"judge {spec!r} is not callable")
    return fn


@dataclass
class EvalResult:
    videos: torch.Tensor          # [B, F, C, H, W] in [0, 1], on CPU
    metrics: dict[str, float]     # "reward/<name>", "reward/total" and, with a judge, "judge/<dimension>"


@torch.no_grad()
def evaluate_policy(policy: Any, rewards: Any, prompts: Sequence[str], sampling: Any, seed: int,
                    judge: Optional[Judge] = None, batch_size: int = 8) -> EvalResult:
    """Sample ``prompts`` deterministically (η = 0, noise seeded by ``seed``) and score them.

    Run it on every process (sharded models need all ranks in the forward); every process gets the same
    result. ``rewards`` is a :class:`~pisces_rl.rewards.RewardServer`.
    """
    det = dataclasses.replace(sampling, eta=0.0) if dataclasses.is_dataclass(sampling) else sampling
    gen = torch.Generator().manual_seed(seed)
    videos = torch.cat([sample_rollout(policy, list(prompts[i:i + batch_size]), det, generator=gen).videos.float().cpu()
                        for i in range(0, len(prompts), batch_size)])
    out = rewards(videos, list(prompts))
    metrics = {f"reward/{name}": _nanmean(out.scores[:, r]) for r, name in enumerate(out.names)}
    metrics["reward/total"] = _nanmean(out.total)
    if judge is not None:
        metrics.update({f"judge/{k}": float(v) for k, v in judge(videos, list(prompts)).items()})
    return EvalResult(videos=videos, metrics=metrics)


def _nanmean(x: torch.Tensor) -> float:
    x = x.float()
    ok = x[~torch.isnan(x)]
    return ok.mean().item() if ok.numel() else float("nan")


def eval_series(history: Mapping[str, Sequence[float]], before: Optional[Mapping[str, float]],
                after: Optional[Mapping[str, float]], final_iteration: int) -> dict[str, list[float]]:
    """The held-out evaluation points of a run, as parallel lists.

    ``{"iteration": [0, i_1, ..., T], "<metric>": [...]}``: the base model (``before``) at iteration 0, the
    evaluations during training recorded in ``history`` under ``eval/iteration`` and ``eval/<metric>``
    (``logging.eval_every``), and the trained LoRA (``after``) at ``final_iteration``. A metric missing at
    a point is NaN.
    """
    points: list[tuple[float, Mapping[str, float]]] = []
    if before is not None:
        points.append((0.0, before))
    iterations = list(history.get("eval/iteration", []))
    for i, it in enumerate(iterations):
        points.append((float(it), {k[len("eval/"):]: v[i] for k, v in history.items()
                                   if k.startswith("eval/") and k != "eval/iteration" and i < len(v)}))
    if after is not None:
        points.append((float(final_iteration), after))
    keys: list[str] = []
    for _, metrics in points:
        keys += [k for k in metrics if k not in keys]
    out: dict[str, list[float]] = {"iteration": [it for it, _ in points]}
    for key in keys:
        out[key] = [float(m.get(key, float("nan"))) for _, m in points]
    return out
