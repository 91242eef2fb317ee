"""How far can post-training take the base model? The judge on real clips, their VAE round trip and samples.

    python benchmarks/shapes_vae_ceiling.py [--clips 64] [--output FILE.json]

Every video the policy makes is decoded by the base model's VAE, so no policy can score better than the VAE's own
reconstruction of a real clip. For ``--clips`` held-out real clips this script reports ShapesBench (Total,
Quality, Semantic and every dimension) and both PISCES rewards on three sets with the same captions:

* ``real``     the procedural clips themselves;
* ``vae``      their round trip through the world VAE (posterior mean, then decode): the ceiling of any policy;
* ``samples``  the base model's own sample for each caption (``pipe(...)``, recommended sampling, seed 0).

The gap ``vae - samples`` is the room post-training has; a dimension where samples already reach the ``vae`` row
cannot improve. The judge only measures here. Needs the ShapesWorld cache (``make world``); about 1 min.
``shapes_base_model.py`` prints the judge's ``corpus`` and ``recon`` columns too, for a base model it trains (or
reuses) in its own output directory and samples on other prompts; this script reads the built world, pairs the
samples with the real clips' captions and adds the rewards.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pisces_rl.rewards import build_reward_server
from pisces_rl.worlds.shapes import ShapesBench, shapes_corpus, videos_to_tensor
from pisces_rl.worlds.shapes.base_model import generate_videos, load_shapes_pipeline
from pisces_rl.worlds.shapes.build import resolve_world_name
from pisces_rl.worlds.shapes.vae import reconstruct_videos


def score(videos: torch.Tensor, captions: list[str], server) -> dict:
    """ShapesBench and the rewards' means for ``videos[B, F, C, H, W]`` in [0, 1]."""
    judged = ShapesBench().evaluate(videos, captions)
    rewards = server(videos, captions)
    out = {"total": judged.total, "quality": judged.quality, "semantic": judged.semantic, **judged.dimensions}
    out.update({f"reward/{name}": float(rewards.scores[:, i].mean()) for i, name in enumerate(rewards.names)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64, help="held-out real clips (default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    args = p.parse_args()
    ds = shapes_corpus(args.clips, seed=1, split="heldout")
    real = videos_to_tensor(ds.with_format("numpy", dtype="uint8")[:]["video"])             # [N, 9, 3, 32, 32]
    captions = list(ds["caption"])
    pipe = load_shapes_pipeline(resolve_world_name("shapes", "model"))
    with torch.no_grad():
        sets = {"real": real, "vae": reconstruct_videos(pipe.vae, real).clamp(0, 1),
                "samples": generate_videos(pipe, captions, seed=0)}
    server = build_reward_server({"weights": {"ot_quality": 1.0, "ot_semantic": 1.0}, "encoder": "shapes",
                                  "ot_map": "shapes"})
    result = {name: score(videos, captions, server) for name, videos in sets.items()}
    keys = list(result["real"])
    print(f"{'':28}" + "".join(f"{name:>10}" for name in result))
    for key in keys:
        scale = 1.0 if key.startswith("reward/") else 100.0
        print(f"{key:<28}" + "".join(f"{scale * result[name][key]:>10.2f}" for name in result))
    if args.output:
        Path(args.output).write_text(json.dumps({"clips": args.clips, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
