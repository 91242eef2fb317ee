"""Time the phases of one GRPO step on the tiny in-code Wan model.

    python benchmarks/bench_grpo_step.py [--batch 4] [--steps 6] [--frames 5] [--size 32] [--repeats 5]

Phases (median seconds over ``--repeats``, same process, measured interleaved so drift hits all alike):

* ``sample``      -- ``sample_rollout``: SDE denoising with latents + log-probs recorded, then VAE decode;
* ``plain_pipe``  -- ``pipe(prompts, ...)`` on a plain (no LoRA) tiny pipeline with the same base weights,
                     prompts, frames, size, steps and CFG: the diffusers sampler, the baseline;
* ``denoise`` / ``plain_denoise`` -- the same two without the VAE decode (``output_type="latent"``);
* ``decode``      -- ``policy.decode`` of the final latents alone;
* ``reward`` / ``update`` -- hooks (:func:`time_reward`, :func:`time_update`) that return None until filled in.

The target is ``sample / plain_pipe <= 1.15``: recording the trajectory must be nearly free.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

from pisces_rl.models import build_policy, build_tiny_wan_pipeline
from pisces_rl.rollout import Rollout, sample_rollout

PROMPTS = ["two red squares moving left", "a blue circle moving up", "three green triangles", "a yellow star"]


def make_setup(args: argparse.Namespace):
    """The policy, a plain pipeline with the same base weights, a SamplingConfig-like object, the prompts."""
    model_cfg = SimpleNamespace(pretrained="tiny", family="wan", dtype="fp32", lora_rank=8, lora_alpha=8,
                                lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_path=None,
                                gradient_checkpointing=False, seed=0)
    sampling = SimpleNamespace(num_frames=args.frames, height=args.size, width=args.size,
                               num_inference_steps=args.steps, guidance_scale=args.guidance, eta=0.25,
                               train_timestep_fraction=1.0, decode_chunk_size=0, negative_prompt="",
                               max_sequence_length=32)
    policy = build_policy(model_cfg, device=args.device)
    plain = build_tiny_wan_pipeline(seed=0).to(args.device)  # no LoRA: the untouched diffusers pipeline
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    return policy, plain, sampling, prompts


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


def time_reward(videos: torch.Tensor, prompts: List[str]) -> Optional[float]:
    """Hook: seconds to score ``videos [B, F, C, H, W]`` with the configured RewardServer (None = not timed)."""
    return None


def time_update(policy, rollout: Rollout) -> Optional[float]:
    """Hook: seconds of one inner epoch of clipped updates over ``rollout`` (None = not timed)."""
    return None


def _sync(start: float, policy) -> float:
    if policy.device.type == "cuda":
        torch.cuda.synchronize(policy.device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> Dict[str, Optional[float]]:
    policy, plain, sampling, prompts = make_setup(args)
    rollout = sample_rollout(policy, prompts, sampling, generator=torch.Generator().manual_seed(0))
    final = rollout.latents[:, -1]
    phases: Dict[str, Callable[[], Optional[float]]] = {
        "sample": lambda: time_sample(policy, sampling, prompts),
        "plain_pipe": lambda: time_plain_pipe(plain, sampling, prompts),
        "denoise": lambda: time_sample(policy, sampling, prompts, decode=False),
        "plain_denoise": lambda: time_plain_pipe(plain, sampling, prompts, decode=False),
        "decode": lambda: time_decode(policy, final),
        "reward": lambda: time_reward(rollout.videos, rollout.prompts),
        "update": lambda: time_update(policy, rollout),
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
        shown = "n/a (hook not filled in)" if seconds is None else f"{seconds * 1e3:9.1f} ms"
        print(f"  {name:<14} {shown}")
    ratio = result["sample"] / result["plain_pipe"]
    print(f"  sample / plain_pipe        = {ratio:.3f}x  (goal <= 1.15x)")
    print(f"  denoise / plain_denoise    = {result['denoise'] / result['plain_denoise']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
