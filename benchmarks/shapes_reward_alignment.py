"""Does a GRPO setting's reward rank videos the way the judge does? Reward-judge agreement inside groups.

    python benchmarks/shapes_reward_alignment.py [--config recipes/configs/grpo_shapes_cpu.yaml] [--iterations 8]
                                                [--output FILE.json] [key=value ...]

GRPO only ever sees rewards *relative to the other videos of the same prompt* (group-normalised advantages).
So whether optimising a reward can raise a judge is decided inside groups: if the video GRPO would push up is
not, on average, the one the judge prefers, no optimiser and no amount of compute turns the reward into a judge
gain. This script samples ``--iterations`` batches of groups exactly as :meth:`GRPOTrainer.sample` does (the
training SDE sampler, at the config's weights), scores them with the config's rewards and advantages, scores
every video with ShapesBench, and reports, averaged over groups:

* ``spearman/<signal>/<judge>`` -- the rank correlation, inside a group, between a signal (each reward, the
  reward total, the GRPO advantage) and a judge score (``total``, ``quality``, ``semantic``). 0 = unrelated.
* ``spearman/advantage/dimension/<d>`` -- the same for the advantage against each ShapesBench dimension (groups
  where the dimension applies to at least 3 videos; a judge dimension that never varies in a group gives NaN).
* ``best_of_group/<signal>`` -- judge Total of the video the signal ranks first, minus the group's mean judge
  Total: the judge change a perfect optimiser of that signal could buy by picking among G samples (best-of-G,
  the usual proxy for the reward-maximising policy near the base model). ``oracle`` picks by the judge itself,
  the ceiling.

The judge here only measures; nothing is tuned on it. Needs the ShapesWorld cache for the default config
(``make world``).
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

from pisces_rl.config import GRPOConfig, load_config
from pisces_rl.trainer import GRPOTrainer
from pisces_rl.worlds.shapes import ShapesBench

JUDGE_KEYS = ("total", "quality", "semantic")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), ``[G] -> [G]``."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two ``[G]`` arrays; NaN when either is constant."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _mean_stderr(values) -> dict[str, float]:
    """``{"mean", "stderr"}`` of the finite values (NaN when there are none, stderr NaN for one)."""
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=float)
    if len(v) == 0:
        return {"mean": float("nan"), "stderr": float("nan")}
    return {"mean": float(v.mean()), "stderr": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")}


def collect(config: GRPOConfig, iterations: int) -> dict[str, np.ndarray]:
    """Per-video signals and judge scores over ``iterations`` sampled batches (all ``[N]``, plus ``group``)."""
    trainer = GRPOTrainer(config)
    bench = ShapesBench()
    cols: dict[str, list] = {}
    for it in range(iterations):
        rollout, group_ids = trainer.sample(it)
        scores = trainer.rewards(rollout.videos, rollout.prompts)
        signals = {f"reward/{n}": scores.scores[:, r].float().cpu() for r, n in enumerate(scores.names)}
        signals["reward/total"] = scores.total.float().cpu()
        adv = trainer.advantages(scores, group_ids).float().cpu()
        if adv.dim() == 2:   # per_reward mode: the loss weights and sums the per-reward advantages
            adv = (adv.nan_to_num(0.0) * torch.as_tensor(scores.weights, dtype=torch.float32).cpu()).sum(1)
        signals["advantage"] = adv
        judged = bench.evaluate(rollout.videos.float().cpu(), list(rollout.prompts))
        signals.update({"judge/total": torch.as_tensor(judged.sample_total),
                        "judge/quality": torch.as_tensor(judged.sample_quality),
                        "judge/semantic": torch.as_tensor(judged.sample_semantic),
                        "group": group_ids.cpu() + it * (int(group_ids.max()) + 1)})
        signals.update({f"dimension/{d}": torch.as_tensor(v) for d, v in judged.per_sample.items()})
        for k, v in signals.items():
            cols.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def summarise(cols: dict[str, np.ndarray]) -> dict:
    """Group-averaged Spearman correlations and best-of-group judge gains (see the module docstring)."""
    signals = [k for k in cols if k.startswith("reward/")] + ["advantage"]
    groups = [np.flatnonzero(cols["group"] == g) for g in np.unique(cols["group"])]
    out: dict = {"videos": int(len(cols["group"])), "groups": len(groups), "group_size": len(groups[0])}
    for s in signals:
        for j in JUDGE_KEYS:
            out[f"spearman/{s}/{j}"] = _mean_stderr(spearman(cols[s][idx], cols[f"judge/{j}"][idx]) for idx in groups)
    for d in sorted(k for k in cols if k.startswith("dimension/")):
        rho = []
        for idx in groups:
            ok = idx[~np.isnan(cols[d][idx])]
            if len(ok) >= 3:
                rho.append(spearman(cols["advantage"][ok], cols[d][ok]))
        out[f"spearman/advantage/{d}"] = _mean_stderr(rho)
    judge = cols["judge/total"]
    for s in signals + ["oracle", "worst"]:
        gains = []
        for idx in groups:
            if s == "oracle":
                pick = idx[np.argmax(judge[idx])]
            elif s == "worst":
                pick = idx[np.argmin(judge[idx])]
            else:
                pick = idx[np.argmax(cols[s][idx])]
            gains.append(judge[pick] - judge[idx].mean())
        out[f"best_of_group/{s}"] = _mean_stderr(gains)
    out["judge_total_mean"] = float(judge.mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/configs/grpo_shapes_cpu.yaml", help="run config (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=8, help="batches of prompts_per_step x num_generations videos")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args()
    config = load_config(GRPOConfig, args.config, ["logging.judge=none", "logging.report_to=none",
                                                   f"output_dir={tempfile.mkdtemp(prefix='alignment_')}",
                                                   *args.overrides])
    result = {"config": args.config, "overrides": args.overrides, **summarise(collect(config, args.iterations))}
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
