"""Do the default runs raise their own reward? `make train-grpo` / `make train-nft` with both PISCES rewards, held out.

    python benchmarks/shapes_default_runs.py --config recipes/configs/grpo_shapes_cpu.yaml --seeds 0 1 2
    python benchmarks/shapes_default_runs.py --config recipes/configs/nft_shapes_cpu.yaml --null --seeds 0 1 2
                                             [--eval-every 10] [--curve-prompts 32] [--judge-prompts 64]
                                             [--judge-draws 2] [--run-dir DIR] [--output FILE.json] [key=value ...]

Runs the config as shipped (its rewards: ``ot_quality`` + ``ot_semantic`` on the ShapesWorld encoder and OT map;
plus dotted overrides) and records the **held-out reward curve**: every ``--eval-every`` iterations the trainer's
own evaluation (``logging.eval_every``) samples ``--curve-prompts`` held-out prompts (``shapes:heldout:N``, captions
never in the training corpus) deterministically on the same noise (seed ``train.seed``) and scores them with the
run's rewards; iteration 0 is the base model (LoRA disabled). The per-iteration training reward cannot show
learning on its own (which prompts come up dominates it); this curve can.

``--null`` is the control: every reward of the config is still computed and logged (weight 0) and the trainer
optimises seeded Gaussian noise instead. What the real run gains beyond the null run is the reward's doing.

After training, ShapesBench (the judge no reward sees) scores ``--judge-prompts`` held-out prompts x
``--judge-draws`` noise draws before (LoRA disabled) and after, as the oracle gate does
(``shapes_oracle_grpo.held_out_judge``). Needs the ShapesWorld (the prebuilt one is shipped).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_oracle_grpo import NoiseReward, held_out_judge  # noqa: E402

from pisces_rl.config import GRPOConfig, load_config  # noqa: E402
from pisces_rl.rewards import RewardServer, build_reward_server  # noqa: E402
from pisces_rl.trainer import online_trainer  # noqa: E402
from pisces_rl.trainer.evaluation import eval_series  # noqa: E402


def null_rewards(config, seed: int) -> RewardServer:
    """The config's rewards at weight 0 (logged) plus seeded N(0, 1) noise at weight 1 (trained on)."""
    server = build_reward_server(config.rewards)
    rc = config.rewards
    spec = {name: (fn, 0.0) for name, (fn, _) in server.rewards.items()}
    spec["noise"] = (NoiseReward(seed), 1.0)
    return RewardServer(spec, max_batch_size=rc.max_batch_size, on_error=rc.on_error, num_frames=rc.num_frames,
                        temporal_windows=rc.temporal_windows, max_frames_per_call=rc.max_frames_per_call)


def run(config_path: str, overrides: list[str], seed: int, null: bool, eval_every: int, curve_prompts: int,
        judge_prompts: int, judge_draws: int, run_dir: str | None) -> dict:
    """One run; returns the held-out curve (``curve``: iteration, reward/<name>, reward/pisces), the training
    reward per iteration (``train``: reward/<name>/mean), and ShapesBench before/after (``judge``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(run_dir, f"{'null' if null else 'run'}-seed{seed}") if run_dir else tmp
        config = load_config(GRPOConfig, config_path,
                             [*overrides, f"train.seed={seed}", f"output_dir={out}", "overwrite_output_dir=true",
                              "logging.report_to=none", "logging.judge=none", "logging.sample_every=0",
                              "checkpoint.save_every=0", f"logging.eval_every={eval_every}", "data.eval_prompts=[]",
                              f"data.eval_source=shapes:heldout:{curve_prompts}",
                              f"data.num_eval_prompts={curve_prompts}"])
        weights = dict(config.rewards.weights)
        trainer = online_trainer(config, rewards=null_rewards(config, seed) if null else None)
        trainer.train()
        summary = json.loads(Path(out, "summary.json").read_text())
        judge = held_out_judge(trainer, judge_prompts, judge_draws)
    curve = summary["eval_points"]
    curve["reward/pisces"] = [sum(w * curve[f"reward/{name}"][i] for name, w in weights.items())
                              for i in range(len(curve["iteration"]))]
    train = {k: v for k, v in trainer.history.items() if k.startswith("reward/") and k.endswith("/mean")}
    return {"seed": seed, "curve": curve, "train": train, "judge": judge}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/configs/grpo_shapes_cpu.yaml", help="run config (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each run")
    p.add_argument("--null", action="store_true", help="null control: train on noise, log the config's rewards")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between held-out evaluations")
    p.add_argument("--curve-prompts", type=int, default=32, help="held-out prompts of the reward curve")
    p.add_argument("--judge-prompts", type=int, default=64, help="held-out prompts judged by ShapesBench")
    p.add_argument("--judge-draws", type=int, default=2, help="noise draws per judged prompt")
    p.add_argument("--run-dir", default=None, help="keep each run's directory (curves, videos) under this folder")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides (before --seeds)")
    a = p.parse_args()
    runs = [run(a.config, a.overrides, s, a.null, a.eval_every, a.curve_prompts, a.judge_prompts, a.judge_draws,
                a.run_dir) for s in a.seeds]
    result = {"config": a.config, "overrides": a.overrides, "seeds": a.seeds, "null": a.null,
              "eval_every": a.eval_every, "curve_prompts": a.curve_prompts, "judge_prompts": a.judge_prompts,
              "judge_draws": a.judge_draws, "runs": runs}
    for r in runs:
        c = r["curve"]
        print(f"seed {r['seed']}: held-out PISCES reward at iterations {[int(i) for i in c['iteration']]}: "
              + " ".join(f"{v:.4f}" for v in c["reward/pisces"])
              + f"  (delta {c['reward/pisces'][-1] - c['reward/pisces'][0]:+.4f});  ShapesBench Total "
              f"{100 * r['judge']['total']['before']:.1f} -> {100 * r['judge']['total']['after']:.1f}")
    deltas = [r["curve"]["reward/pisces"][-1] - r["curve"]["reward/pisces"][0] for r in runs]
    print(f"mean delta held-out PISCES reward {np.mean(deltas):+.4f}")
    if a.output:
        Path(a.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
