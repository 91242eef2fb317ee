"""Time the phases of one GRPO step on the tiny in-code Wan model.

    python benchmarks/bench_grpo_step.py [--batch 4] [--steps 6] [--frames 5] [--size 32] [--repeats 5]

Phases (median seconds over ``--repeats``, same process, measured interleaved so drift hits all alike):

* ``sample``      -- ``sample_rollout``: SDE denoising with latents + log-probs recorded, then VAE decode;
* ``plain_pipe``  -- ``pipe(prompts, ...)`` on a plain (no LoRA) tiny pipeline with the same base weights,
                     prompts, frames, size, steps and CFG: the diffusers sampler, the baseline;
* ``denoise`` / ``plain_denoise`` -- the same two without the VAE decode (``output_type="latent"``);
* ``decode``      -- ``policy.decode`` of the final latents alone;
* ``reward``      -- both PISCES rewards (quality + token-level semantic OT) on the tiny encoder;
* ``update``      -- one inner epoch of clipped-surrogate updates (every trained timestep, optimizer steps).

Targets: ``sample / plain_pipe <= 1.15`` (recording the trajectory is nearly free) and
``reward / (sample + reward + update) < 15 %``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from pisces_rl.models import build_tiny_wan_pipeline
from pisces_rl.rollout import Rollout, sample_rollout

PROMPTS = ["two red squares moving left", "a blue circle moving up", "three green triangles", "a yellow star"]


def make_setup(args: argparse.Namespace):
    """A GRPOTrainer on the tiny model (policy + both OT rewards on the tiny encoder), a plain pipeline with the
    same base weights, the sampling config and the prompts."""
    import tempfile

    from pisces_rl.config import GRPOConfig, load_config
    from pisces_rl.trainer import GRPOTrainer

    cfg = load_config(GRPOConfig, overrides={
        "output_dir": tempfile.mkdtemp(prefix="bench_grpo_"), "logging.report_to": "none",
        "sampling.num_frames": args.frames, "sampling.height": args.size, "sampling.width": args.size,
        "sampling.num_inference_steps": args.steps, "sampling.guidance_scale": args.guidance,
        "train.prompts_per_step": 1, "train.num_generations": args.batch, "train.sample_batch_size": args.batch,
        "train.train_batch_size": args.batch, "rewards.weights": {"ot_quality": 1.0, "ot_semantic": 1.0}})
    trainer = GRPOTrainer(cfg, prompts=PROMPTS)
    plain = build_tiny_wan_pipeline(seed=0).to(args.device)  # no LoRA: the untouched diffusers pipeline
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    return trainer, plain, cfg.sampling, prompts


def time_sample(policy, sampling, prompts, decode: bool = True) -> float:
    start = time.perf_counter()
    sample_rollout(policy, prompts, sampling, generator=torch.Generator().manual_seed(0), decode=decode)
    return _sync(start, policy)


def time_plain_pipe(pipe, sampling, prompts, decode: bool = True) -> float:
    start = time.perf_counter()
    pipe(prompts, num_frames=sampling.num_frames, height=sampling.height, width=sampling.width,
         num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
         max_sequence_length=sampling.max_sequence_length, output_type="pt" if decode else "latent",
         generator=torch.Generator().manual_seed(0))
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - start


def time_decode(policy, latents: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        policy.decode(latents)
    return _sync(start, policy)


def time_reward(trainer, videos: torch.Tensor, prompts: List[str]) -> float:
    """Seconds to score ``videos [B, F, C, H, W]`` with the trainer's RewardServer (both OT rewards)."""
    start = time.perf_counter()
    trainer.rewards(videos, prompts)
    return time.perf_counter() - start


def time_update(trainer, rollout: Rollout, advantages: torch.Tensor) -> float:
    """Seconds of one inner epoch of clipped updates over ``rollout`` (every trained timestep, optimizer steps)."""
    start = time.perf_counter()
    trainer.update(rollout, advantages)
    return _sync(start, trainer.policy)


def _sync(start: float, policy) -> float:
    if policy.device.type == "cuda":
        torch.cuda.synchronize(policy.device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> Dict[str, Optional[float]]:
    trainer, plain, sampling, prompts = make_setup(args)
    policy = trainer.policy
    rollout = sample_rollout(policy, prompts, sampling, generator=torch.Generator().manual_seed(0))
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(1)).clamp(-5, 5)
    final = rollout.latents[:, -1]
    phases: Dict[str, Callable[[], Optional[float]]] = {
        "sample": lambda: time_sample(policy, sampling, prompts),
        "plain_pipe": lambda: time_plain_pipe(plain, sampling, prompts),
        "denoise": lambda: time_sample(policy, sampling, prompts, decode=False),
        "plain_denoise": lambda: time_plain_pipe(plain, sampling, prompts, decode=False),
        "decode": lambda: time_decode(policy, final),
        "reward": lambda: time_reward(trainer, rollout.videos, rollout.prompts),
        "update": lambda: time_update(trainer, rollout, advantages),
    }
    for fn in phases.values():  # warm-up
        fn()
    samples: Dict[str, List[float]] = {name: [] for name in phases}
    for _ in range(args.repeats):
        for name, fn in phases.items():
            value = fn()
            if value is not None:
                samples[name].append(value)
    return {name: (statistics.median(v) if v else None) for name, v in samples.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="videos per sampling call")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps")
    parser.add_argument("--frames", type=int, default=5, help="frames per video (4k+1)")
    parser.add_argument("--size", type=int, default=32, help="height = width in pixels (multiple of 16)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale (> 1 runs CFG)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    print(f"tiny Wan, {args.batch} videos x {args.frames} frames x {args.size}px, {args.steps} steps, "
          f"CFG {args.guidance}, device={args.device}, torch threads={torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    result = run(args)
    for name, seconds in result.items():
        shown = f"{seconds * 1e3:9.1f} ms"
        print(f"  {name:<14} {shown}")
    ratio = result["sample"] / result["plain_pipe"]
    print(f"  sample / plain_pipe        = {ratio:.3f}x  (goal <= 1.15x)")
    print(f"  denoise / plain_denoise    = {result['denoise'] / result['plain_denoise']:.3f}x")
    step = result["sample"] + result["reward"] + result["update"]
    print(f"  GRPO step = sample + reward + update = {step * 1e3:.1f} ms: sample {result['sample'] / step:.1%}, "
          f"reward {result['reward'] / step:.1%} (goal < 15%), update {result['update'] / step:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
