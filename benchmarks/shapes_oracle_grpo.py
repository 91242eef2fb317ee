"""What could any reward buy an online RL trainer at a given budget? The judge itself as the reward.

    python benchmarks/shapes_oracle_grpo.py [--config recipes/configs/grpo_shapes_cpu.yaml] [--seeds 42 ...]
                                           [--null] [--eval-prompts 64] [--eval-draws 2]
                                           [--output FILE.json] [key=value ...]
    python benchmarks/shapes_oracle_grpo.py --config recipes/configs/nft_shapes_cpu.yaml      # DiffusionNFT

Runs the config's training (GRPO or DiffusionNFT, by ``train.algorithm``; plus dotted overrides) with a single
reward in place of the config's: the per-video ShapesBench Total, i.e. the judge that scores the run. No reward can
agree with the judge better than the judge itself, so if this run does not raise ShapesBench Total on held-out
prompts, no reward can at that budget and sampler setting: the limit is the optimiser's, not the reward's. It
separates the two blockers that a falling default run mixes up -- "the reward does not see what the judge scores"
(measured by ``shapes_reward_alignment.py``) and "the trainer cannot follow even a perfect reward this far".

``--null`` is the control: the training reward is Gaussian noise (seeded), the judge is still computed on every
training batch but with weight 0 (logged only). Whatever the oracle run gains beyond the null run is the reward's
doing; what the null run gains (or loses) is the trainer's drift at that budget.

Each run logs the training reward per iteration (``train_reward``: the weighted total the trainer optimised;
``train_judge``: the judge's mean on the training videos) and judges ``--eval-prompts`` held-out prompts
(``shapes:heldout:N``) x ``--eval-draws`` initial-noise draws, deterministic (eta = 0) sampling, before (LoRA
disabled) and after, on the same noise: the paired difference. This is a diagnostic: with the judge as the reward
its numbers are a ceiling, never a result of the PISCES rewards. Needs the ShapesWorld cache for the default
configs (``make world``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from pisces_rl.config import GRPOConfig, load_config
from pisces_rl.data import load_prompts
from pisces_rl.trainer import online_trainer
from pisces_rl.trainer.evaluation import evaluate_policy, shapesbench_judge
from pisces_rl.worlds.shapes import ShapesBench

KEYS = ("total", "quality", "semantic")


def judge_total(videos: torch.Tensor, prompts: list[str], **kwargs) -> torch.Tensor:
    """ShapesBench per-video Total as a reward: ``videos[B, F, C, H, W]`` in [0, 1] -> ``[B]``."""
    result = ShapesBench().evaluate(videos.detach().float().cpu().clamp(0, 1), list(prompts))
    return torch.as_tensor(result.sample_total, dtype=torch.float32)


class NoiseReward:
    """The null control's reward: i.i.d. N(0, 1) per video, from a generator seeded once per run."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, videos: torch.Tensor, prompts: list[str], **kwargs) -> torch.Tensor:
        return torch.randn(len(videos), generator=self.generator)


def oracle_rewards(seed: int, null: bool = False) -> dict:
    """``{"judge_total": (judge, 1)}``; with ``null`` the judge is logged only (weight 0) and noise is trained on."""
    if not null:
        return {"judge_total": (judge_total, 1.0)}
    return {"judge_total": (judge_total, 0.0), "noise": (NoiseReward(seed), 1.0)}


def held_out_judge(trainer, num_prompts: int, draws: int) -> dict:
    """``{key: {before, after, delta}}``: ShapesBench on ``num_prompts`` held-out prompts x ``draws`` noise draws
    (seeds ``train.seed + d``), base model (LoRA disabled) vs trained policy on the same noise."""
    cfg = trainer.config
    prompts = load_prompts(f"shapes:heldout:{num_prompts}")
    scores = {"before": [], "after": []}
    for d in range(draws):
        for part in ("before", "after"):
            run = lambda: evaluate_policy(trainer.policy, trainer.rewards, prompts, cfg.sampling,  # noqa: E731
                                          seed=cfg.train.seed + d, judge=shapesbench_judge,
                                          batch_size=cfg.train.sample_batch_size)
            if part == "before":
                with trainer.policy.lora_disabled():
                    scores[part].append(run().metrics)
            else:
                scores[part].append(run().metrics)
    out = {}
    for name in scores["after"][0]:
        if name.startswith("judge/"):
            before = float(np.mean([m[name] for m in scores["before"]]))
            after = float(np.mean([m[name] for m in scores["after"]]))
            out[name[len("judge/"):]] = {"before": before, "after": after, "delta": after - before}
    return out


def run(config_path: str, overrides: list[str], seed: int, null: bool = False, eval_prompts: int = 64,
        eval_draws: int = 2) -> dict:
    """One run with the judge (or, ``null``, noise) as its reward; returns ``{"eval": {judge key: {before, after,
    delta}}, "train_reward": [per iteration], "train_judge": [per iteration]}``."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(GRPOConfig, config_path,
                             [*overrides, f"train.seed={seed}", f"output_dir={tmp}", "logging.report_to=none",
                              "logging.judge=none", "logging.sample_every=0", "checkpoint.save_every=0",
                              "data.eval_prompts=[]", "data.eval_source=shapes:heldout:1", "data.num_eval_prompts=1"])
        trainer = online_trainer(config, rewards=oracle_rewards(seed, null))
        trainer.train()
        evaluation = held_out_judge(trainer, eval_prompts, eval_draws)
        history = trainer.history
    return {"eval": evaluation, "train_reward": history["reward/total/mean"],
            "train_judge": history["reward/judge_total/mean"]}


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for one seed) over seeds of each judge key's before, after and delta."""
    def stats(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

    return {k: {part: stats([r[k][part] for r in runs]) for part in ("before", "after", "delta")} for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/configs/grpo_shapes_cpu.yaml", help="run config (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="train.seed of each run")
    p.add_argument("--null", action="store_true", help="null control: train on noise, log the judge")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts judged (default: %(default)s)")
    p.add_argument("--eval-draws", type=int, default=2, help="noise draws per prompt (default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args()
    runs = [run(args.config, args.overrides, seed, args.null, args.eval_prompts, args.eval_draws) for seed in args.seeds]
    result = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "null": args.null,
              "eval_prompts": args.eval_prompts, "eval_draws": args.eval_draws, "runs": runs,
              "summary": summarise([r["eval"] for r in runs])}
    for seed, r in zip(args.seeds, runs):
        curve = " ".join(f"{100 * v:.1f}" for v in r["train_judge"])
        print(f"seed {seed}: judge on the training videos per iteration: {curve}")
    for k in KEYS:
        s = result["summary"][k]
        print(f"judge {k:<9} before {100 * s['before']['mean']:.1f}  after {100 * s['after']['mean']:.1f}  "
              f"delta {100 * s['delta']['mean']:+.1f} +- {100 * s['delta']['std']:.1f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
