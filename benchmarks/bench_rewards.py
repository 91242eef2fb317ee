"""Time per video of the PISCES OT rewards on the tiny in-code BLIP encoder, with and without OT.

    python benchmarks/bench_rewards.py [--batch 8] [--frames 8] [--size 32] [--repeats 5] [--threads 1]

Prints one row per reward variant: milliseconds per video for scoring (no autograd, what GRPO does) and for
forward + backward to the videos (direct reward backprop). The quality reward's map is a ``NeuralOTMap`` when that
class is available, else an MLP of the same shape (the cost is the same).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pisces_rl.encoders import BlipVideoTextEncoder
from pisces_rl.rewards.ot_quality import OTQualityReward
from pisces_rl.rewards.ot_semantic import OTSemanticReward


def text_map(dim: int, hidden: int):
    try:
        from pisces_rl.ot.neural_map import NeuralOTMap
        return NeuralOTMap(dim=dim, hidden=hidden), "NeuralOTMap"
    except ImportError:
        layers = [torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.LayerNorm(hidden),
                  torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.LayerNorm(hidden),
                  torch.nn.Linear(hidden, dim)]
        return torch.nn.Sequential(*layers), "MLP stand-in"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    encoder = BlipVideoTextEncoder.tiny(seed=0)
    ot_map, map_name = text_map(encoder.embed_dim, 1024)
    videos = torch.rand(args.batch, args.frames, 3, args.size, args.size)
    prompts = [f"a red circle moving left number {i % 4}" for i in range(args.batch)]
    variants = [
        ("ot_quality", f"with OT ({map_name})", OTQualityReward(encoder, ot_map=ot_map)),
        ("ot_quality", "w/o OT (raw [CLS])", OTQualityReward(encoder, use_ot=False)),
        ("ot_semantic", "with OT (m=0.9)", OTSemanticReward(encoder)),
        ("ot_semantic", "balanced OT (m=1)", OTSemanticReward(encoder, mass=1.0)),
        ("ot_semantic", "w/o OT (vanilla)", OTSemanticReward(encoder, use_ot=False)),
    ]
    h, w = encoder.grid
    print(f"tiny BLIP encoder ({sum(p.numel() for p in encoder.parameters()) / 1e3:.0f}k params), "
          f"B={args.batch}, F={args.frames}, {args.size}x{args.size} -> {1 + args.frames * h * w} visual tokens, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'reward':<12} {'variant':<26} {'score ms/video':>15} {'fwd+bwd ms/video':>17}")
    for name, variant, reward in variants:
        def score():
            with torch.no_grad():
                reward(videos, prompts)

        def backprop():
            v = videos.clone().requires_grad_()
            with torch.enable_grad():
                reward(v, prompts).sum().backward()

        t_score = median_seconds(score, args.repeats) / args.batch * 1e3
        t_grad = median_seconds(backprop, args.repeats) / args.batch * 1e3
        print(f"{name:<12} {variant:<26} {t_score:>15.2f} {t_grad:>17.2f}")


if __name__ == "__main__":
    main()
