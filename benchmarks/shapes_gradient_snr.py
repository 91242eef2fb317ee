"""How much of a GRPO gradient is signal? Policy-gradient agreement between independent iterations.

    python benchmarks/shapes_gradient_snr.py [--config recipes/configs/grpo_shapes_cpu.yaml] [--iterations 8]
                                            [--same-prompts] [--output FILE.json] [key=value ...]

Builds the trainer of ``--config`` (plus dotted overrides), then for ``--iterations`` iterations samples, scores
and back-propagates the clipped surrogate exactly as :meth:`GRPOTrainer.update` does, but records the LoRA
gradient of each optimizer window instead of stepping, so every gradient is taken at the same (base) weights.
With per-iteration gradients ``g_i = mu + n_i`` (``mu`` the expected gradient, ``n_i`` independent noise):

* ``mean_cos`` -- mean pairwise cosine ``cos(g_i, g_j)``, about ``|mu|^2 / (|mu|^2 + E|n|^2)``: the share of a
  single iteration's gradient that is signal. 0 means the iterations agree on nothing.
* ``mean_norm_ratio`` -- ``|mean_i g_i| / mean_i |g_i|``; pure noise gives ``1 / sqrt(n)``, a clean signal 1.
* ``iterations_for_snr_1`` -- ``1 / mean_cos``: roughly how many iterations must be summed before the signal
  equals the noise (when ``mean_cos > 0``).
* ``within_group_reward_std`` -- the total reward's spread inside a group, averaged over groups.

``--same-prompts`` reuses the first iteration's prompts every time (noise only differs), separating the noise of
the sampler from the disagreement between prompts. Needs the ShapesWorld cache for the default config
(``make world``). Reward-only: no judge is run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile

import torch

from pisces_rl.config import GRPOConfig, load_config
from pisces_rl.trainer import GRPOTrainer


class _GradientRecorder(GRPOTrainer):
    """A GRPOTrainer whose optimizer windows record the LoRA gradient and leave the weights unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: list[torch.Tensor] = []

    def _optimizer_step(self) -> float:
        grads = [p.grad.flatten() for p in self.policy.trainable_parameters() if p.grad is not None]
        self.recorded.append(torch.cat(grads).detach().float().cpu().clone())
        self.optimizer.zero_grad(set_to_none=True)
        return float("nan")


def measure(config: GRPOConfig, iterations: int, same_prompts: bool = False) -> dict:
    """Run ``iterations`` sample-score-backward passes at fixed weights; return the statistics above."""
    trainer = _GradientRecorder(config)
    if same_prompts:
        first = trainer.sampler.prompts_for_iteration(0)
        trainer.sampler.prompts_for_iteration = lambda iteration: first
    spreads, per_iteration = [], []
    for it in range(iterations):
        rollout, group_ids = trainer.sample(it)
        scores = trainer.rewards(rollout.videos, rollout.prompts)
        total = scores.total.float().cpu()
        spreads.append(torch.stack([total[group_ids == g].std() for g in group_ids.unique()]).mean().item())
        start = len(trainer.recorded)
        trainer.update(rollout, trainer.advantages(scores, group_ids))
        per_iteration.append(torch.stack(trainer.recorded[start:]).sum(0))   # one gradient per iteration
    g = torch.stack(per_iteration)
    cos = [torch.nn.functional.cosine_similarity(g[i], g[j], dim=0).item()
           for i, j in itertools.combinations(range(len(g)), 2)]
    mean_cos = sum(cos) / len(cos)
    return {"iterations": iterations, "same_prompts": same_prompts,
            "videos_per_iteration": len(rollout), "mean_cos": mean_cos,
            "mean_norm_ratio": (g.mean(0).norm() / g.norm(dim=1).mean()).item(),
            "pure_noise_norm_ratio": iterations ** -0.5,
            "iterations_for_snr_1": (1.0 / mean_cos) if mean_cos > 0 else float("inf"),
            "within_group_reward_std": sum(spreads) / len(spreads)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/configs/grpo_shapes_cpu.yaml",
                   help="run config (default: %(default)s; 'none' = the built-in tiny defaults)")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--same-prompts", action="store_true")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args()
    if args.iterations < 2:
        p.error("--iterations must be >= 2 (cosines need pairs)")
    config = load_config(GRPOConfig, None if args.config == "none" else args.config, ["logging.judge=none", "logging.report_to=none",
                                                   f"output_dir={tempfile.mkdtemp(prefix='grad_snr_')}",
                                                   *args.overrides])
    result = {"config": args.config, "overrides": args.overrides, **measure(config, args.iterations,
                                                                            args.same_prompts)}
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
