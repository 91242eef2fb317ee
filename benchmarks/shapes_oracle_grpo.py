"""What could any reward buy GRPO at a given budget? GRPO with the judge itself as the reward.

    python benchmarks/shapes_oracle_grpo.py [--config recipes/configs/grpo_shapes_cpu.yaml] [--seeds 42 ...]
                                           [--output FILE.json] [key=value ...]

Runs the config's GRPO training (plus dotted overrides) with a single reward in place of the config's: the
per-video ShapesBench Total, i.e. the judge that scores the run. No reward can agree with the judge better than
the judge itself, so if this run does not raise ShapesBench Total on the evaluation prompts, no reward can at
that budget and sampler setting: the limit is the optimiser's, not the reward's. It separates the two blockers
that a falling default run mixes up -- "the reward does not see what the judge scores" (measured by
``shapes_reward_alignment.py``) and "GRPO cannot follow even a perfect reward this far".

For each seed it reports the judge on the evaluation prompts before (LoRA disabled) and after, on the same
noise, and the paired difference. This is a diagnostic: the judge is the reward here, so its numbers are a
ceiling, never a result of the PISCES rewards. Needs the ShapesWorld cache for the default config
(``make world``); about 6 min per seed on one core.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from pisces_rl.config import GRPOConfig, load_config
from pisces_rl.trainer import GRPOTrainer
from pisces_rl.worlds.shapes import ShapesBench

KEYS = ("total", "quality", "semantic")


def judge_total(videos: torch.Tensor, prompts: list[str], **kwargs) -> torch.Tensor:
    """ShapesBench per-video Total as a reward: ``videos[B, F, C, H, W]`` in [0, 1] -> ``[B]``."""
    result = ShapesBench().evaluate(videos.detach().float().cpu().clamp(0, 1), list(prompts))
    return torch.as_tensor(result.sample_total, dtype=torch.float32)


def run(config_path: str, overrides: list[str], seed: int) -> dict:
    """One GRPO run with the judge as its only reward; returns ``{judge key: {before, after, delta}}``."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(GRPOConfig, config_path,
                             [*overrides, f"train.seed={seed}", f"output_dir={tmp}", "logging.report_to=none",
                              "logging.judge=shapesbench"])
        GRPOTrainer(config, rewards={"judge_total": (judge_total, 1.0)}).train()
        evaluation = json.loads((Path(tmp) / "summary.json").read_text())["eval"]
    out = {}
    for name, values in evaluation.items():
        if name.startswith("judge/"):
            before, after = values["before"], values["after"]
            out[name[len("judge/"):]] = {"before": before, "after": after, "delta": after - before}
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for one seed) over seeds of each judge key's before, after and delta."""
    def stats(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

    return {k: {part: stats([r[k][part] for r in runs]) for part in ("before", "after", "delta")} for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/configs/grpo_shapes_cpu.yaml", help="run config (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="train.seed of each run")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args()
    runs = [run(args.config, args.overrides, seed) for seed in args.seeds]
    result = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "runs": runs,
              "summary": summarise(runs)}
    for k in KEYS:
        s = result["summary"][k]
        print(f"judge {k:<9} before {100 * s['before']['mean']:.1f}  after {100 * s['after']['mean']:.1f}  "
              f"delta {100 * s['delta']['mean']:+.1f} +- {100 * s['delta']['std']:.1f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
