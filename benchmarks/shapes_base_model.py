"""Train the ShapesWorld base model (full size) and score it with ShapesBench.

    python benchmarks/shapes_base_model.py [--output DIR] [--profile full] [--threads 1] [--reuse]
                                           [--num-prompts 64] [--num-inference-steps 16] [--guidance 1 3 5]

Prints the seconds of every training phase, then a ShapesBench table (scores in %) with one column per video set:

* ``corpus``: held-out corpus clips (``split="heldout"``, captions the training corpus never shows);
* ``recon``: the same clips encoded (posterior mean) and decoded by the trained VAE;
* ``base g=G``: the base model's samples for held-out prompts (``shapes_prompts(split="heldout")``), one column
  per guidance scale;
* ``tiny``: the random in-code tiny Wan pipeline (``build_tiny_wan_pipeline``) on the same prompts.

``--reuse`` skips training when ``--output`` already holds a model trained with the same config hash.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from pisces_rl.models import build_tiny_wan_pipeline
from pisces_rl.worlds.shapes import ShapesBench, shapes_corpus, shapes_prompts
from pisces_rl.worlds.shapes import vae as vae_lib
from pisces_rl.worlds.shapes.base_model import (METADATA_FILE, RECOMMENDED_SAMPLING, ShapesBaseModelConfig,
                                                generate_videos, load_shapes_pipeline, train_shapes_base_model)

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / ".cache" / "shapes_world" / "base_model"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help="pipeline directory (default: %(default)s)")
    p.add_argument("--profile", default="full", choices=("full", "quick"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s; 2 are faster on idle cores but many times slower "
                        "while another process holds a core)")
    p.add_argument("--steps", type=int, default=None, help="override the transformer steps")
    p.add_argument("--vae-steps", type=int, default=None, help="override the VAE steps")
    p.add_argument("--reuse", action="store_true", help="skip training if --output has the same config hash")
    p.add_argument("--num-prompts", type=int, default=64, help="held-out prompts / corpus clips scored")
    p.add_argument("--num-inference-steps", type=int, default=RECOMMENDED_SAMPLING["num_inference_steps"])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, RECOMMENDED_SAMPLING["guidance_scale"], 5.0])
    p.add_argument("--no-tiny", action="store_true", help="skip the random tiny model column")
    return p.parse_args()


def train(args) -> tuple[str, dict]:
    overrides = {k: v for k, v in (("steps", args.steps), ("vae_steps", args.vae_steps)) if v is not None}
    cfg = ShapesBaseModelConfig(profile=args.profile, seed=args.seed, num_threads=args.threads, **overrides)
    meta_path = os.path.join(args.output, METADATA_FILE)
    if args.reuse and os.path.isfile(meta_path):
        meta = json.load(open(meta_path))
        if meta.get("config_hash") == cfg.config_hash():
            print(f"reusing {args.output} (config hash {cfg.config_hash()})")
            return args.output, meta
    start = time.perf_counter()
    train_shapes_base_model(cfg, args.output, progress=True)
    wall = time.perf_counter() - start
    meta = json.load(open(meta_path))
    print(f"trained in {wall:.0f} s wall ({args.threads} threads) -> {args.output}")
    return args.output, meta


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    path, meta = train(args)
    sec = meta["seconds"]
    print("seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items())
          + f" | VAE + transformer {sec['vae'] + sec['encode'] + sec['transformer']:.1f}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in meta["parameters"].items()))

    cfg = meta["config"]
    frames, size, n = cfg["num_frames"], cfg["size"], args.num_prompts
    bench, columns = ShapesBench(), {}
    held = shapes_corpus(n, seed=args.seed + 1000, num_frames=frames, size=size, split="heldout")
    originals = torch.from_numpy(held.with_format("numpy", dtype="uint8")[:]["video"]).permute(0, 1, 4, 2, 3)
    originals = originals.float() / 255.0
    pipe = load_shapes_pipeline(path)
    columns["corpus"] = bench.evaluate(originals, list(held["caption"]))
    columns["recon"] = bench.evaluate(vae_lib.reconstruct_videos(pipe.vae, originals), list(held["caption"]))

    prompts = shapes_prompts(n, seed=args.seed, split="heldout")
    sampling = dict(num_frames=frames, size=size, num_inference_steps=args.num_inference_steps,
                    max_sequence_length=cfg["max_sequence_length"], seed=args.seed)
    for g in args.guidance:
        start = time.perf_counter()
        videos = generate_videos(pipe, prompts, guidance_scale=g, **sampling)
        print(f"sampled {n} videos at guidance {g} in {time.perf_counter() - start:.1f} s")
        columns[f"base g={g:g}"] = bench.evaluate(videos, prompts)
    if not args.no_tiny:
        tiny = build_tiny_wan_pipeline(seed=args.seed)
        columns["tiny"] = bench.evaluate(generate_videos(tiny, prompts, guidance_scale=RECOMMENDED_SAMPLING[
            "guidance_scale"], **sampling), prompts)

    names = list(columns)
    rows = list(next(iter(columns.values())).dimensions) + ["quality", "semantic", "total"]
    print(f"\nShapesBench (%), {n} videos, {args.num_inference_steps} sampling steps")
    print(f"{'dimension':<24}" + "".join(f"{c:>12}" for c in names))
    for row in rows:
        values = [getattr(columns[c], row) if row in ("quality", "semantic", "total") else columns[c].dimensions[row]
                  for c in names]
        print(f"{row:<24}" + "".join(f"{'n/a' if math.isnan(v) else f'{100 * v:.1f}':>12}" for v in values))


if __name__ == "__main__":
    main()
