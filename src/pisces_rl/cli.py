"""``pisces-rl`` command line.

Subcommands::

    pisces-rl fit-ot-map --dataset DATA --output DIR [--encoder tiny|PATH] [--map neural|l2] [--steps N] ...
    pisces-rl world build [--profile full|quick] [--cache DIR] [--force] [--threads N]
    pisces-rl world info [--cache DIR]

Run ``pisces-rl SUBCOMMAND --help`` for the options. ``main(argv)`` returns the exit status (0 = success,
1 = a problem with the inputs, reported on stderr as one line; 2 = bad command-line usage).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_fit_ot_map(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-ot-map", help="fit the text->video OT map of the quality reward on a captioned video corpus",
        description="Encode every (caption, video) pair of a corpus of real videos with the frozen reward encoder and "
                    "fit a Neural OT map (PISCES) -- or the L2 regression baseline -- from the encoder's text [CLS] "
                    "embeddings to its video embeddings. The map is selected on held-out pairs (mutual-kNN, "
                    "distance Spearman) and saved for rewards.ot_map.",
        epilog="example: pisces-rl fit-ot-map --dataset path/to/captioned_videos --encoder path/to/blip-itm "
               "--output runs/ot_map_blip")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", required=True, metavar="PATH",
                      help="the captioned real videos: a Dataset.save_to_disk directory or a .parquet/.json/.jsonl/"
                           ".arrow file (required)")
    data.add_argument("--split", default="train", metavar="NAME",
                      help="split to use when --dataset holds several (default: %(default)s)")
    data.add_argument("--video-column", default="video", metavar="NAME",
                      help="column holding each video as a nested array [F,C,H,W] or [F,H,W,C], uint8 in [0,255] or "
                           "float in [0,1] (default: %(default)s)")
    data.add_argument("--caption-column", default="caption", metavar="NAME",
                      help="column holding each video's caption (default: %(default)s)")
    data.add_argument("--video-layout", default="auto", choices=["auto", "fchw", "fhwc"],
                      help="axis order of the stored videos; auto = told by where the size-1 or size-3 channel axis is "
                           "(an error when both orders fit)")
    data.add_argument("--max-samples", type=_positive_int, default=None, metavar="N",
                      help="use only the first N pairs (default: all)")
    enc = p.add_argument_group("encoder")
    enc.add_argument("--encoder", default="tiny", metavar="SPEC",
                     help="the reward encoder the map is for (use the one of rewards.encoder): a BLIP-ITM checkpoint "
                          "directory, 'tiny' (random in-code BLIP, 'tiny:SEED' for another seed) or 'shapes' "
                          "(default: %(default)s)")
    enc.add_argument("--num-frames", type=_positive_int, default=None, metavar="N",
                     help="frames per clip given to the encoder, uniformly subsampled (default: the encoder's own)")
    enc.add_argument("--encode-batch-size", type=_positive_int, default=16, metavar="N",
                     help="clips per encoder forward while embedding the corpus; lower it if memory runs out "
                          "(default: %(default)s)")
    fit = p.add_argument_group("map")
    fit.add_argument("--map", dest="map_type", default="neural", choices=["neural", "l2"],
                     help="neural = Neural OT map (PISCES, the default); l2 = L2 regression baseline (the ablation)")
    fit.add_argument("--hidden", type=_positive_int, default=1024, metavar="N",
                     help="hidden width of the map's and the critic's MLPs (default: %(default)s, PISCES)")
    fit.add_argument("--steps", type=_positive_int, default=1000, metavar="N",
                     help="training steps; a neural-map step is --k-t map updates and one critic update "
                          "(default: %(default)s)")
    fit.add_argument("--batch-size", type=_positive_int, default=128, metavar="N",
                     help="pairs per update (default: %(default)s, PISCES)")
    fit.add_argument("--lr", type=float, default=1e-4, metavar="LR",
                     help="Adam learning rate, cosine-decayed to 0 (default: %(default)s, PISCES)")
    fit.add_argument("--k-t", type=_positive_int, default=10, metavar="N",
                     help="map updates per critic update, neural map only (default: %(default)s, PISCES)")
    fit.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                     help="fraction of the pairs held out to select the best checkpoint (default: %(default)s)")
    fit.add_argument("--eval-every", type=_positive_int, default=None, metavar="N",
                     help="steps between held-out evaluations (default: steps / 10; always at the end)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the batch sampling "
                                                         "(default: %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR",
                     help="directory the map is saved to, with fit_ot_map.json (corpus size, options, held-out "
                          "metrics); give it to rewards.ot_map (required)")
    out.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_fit_ot_map)


def _run_fit_ot_map(args) -> int:
    import torch

    from pisces_rl.encoders import load_encoder
    from pisces_rl.ot.fit import fit_ot_map, load_video_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = load_video_dataset(args.dataset, split=args.split)
    encoder = load_encoder(args.encoder, num_frames=args.num_frames, device=device)
    _, history = fit_ot_map(
        dataset, encoder, output=args.output, map_type=args.map_type, video_column=args.video_column,
        caption_column=args.caption_column, layout=args.video_layout, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, k_t=args.k_t, hidden=args.hidden, val_fraction=args.val_fraction,
        eval_every=args.eval_every, seed=args.seed, device=device, encode_batch_size=args.encode_batch_size,
        max_samples=args.max_samples, progress=not args.quiet, source=str(args.dataset))
    print(f"saved {args.map_type} OT map ({min(len(dataset), args.max_samples or len(dataset))} pairs, "
          f"{args.steps} steps) to {args.output}")
    best, identity = history.get("best"), history.get("identity")
    if isinstance(best, dict) and isinstance(identity, dict):
        print(f"held-out mutual-kNN {best['mknn']:.4f} (unmapped text: {identity['mknn']:.4f}), "
              f"distance Spearman {best['spearman']:.4f} (unmapped: {identity['spearman']:.4f}), "
              f"best step {best['step']}")
    return 0


def _add_world(subparsers) -> None:
    p = subparsers.add_parser(
        "world", help="build or inspect ShapesWorld (encoder, OT maps, base model)",
        description="ShapesWorld: the offline world of the embedded default. `build` trains its video-text encoder, "
                    "fits the text->video OT map (and the L2 baseline) and pretrains its text-to-video base model, "
                    "caching them; configs then say model.pretrained: shapes, rewards.encoder: shapes, "
                    "rewards.ot_map: shapes.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    build = actions.add_parser("build", help="build the world (skipped when the cache matches)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--profile", default="full", choices=["full", "quick"],
                       help="full = the default world (~18 min on 2 CPU cores); quick = small, for tests")
    build.add_argument("--cache", default=None, help="cache directory (default: $PISCES_RL_CACHE/shapes_world or "
                                                     "<repo>/.cache/shapes_world)")
    build.add_argument("--force", action="store_true", help="rebuild every artifact even if the cache matches")
    build.add_argument("--threads", type=_positive_int, default=1,
                       help="torch CPU threads during the build (the models are small; more threads rarely help "
                            "and slow down a lot on a busy machine)")
    build.add_argument("--sequential", action="store_true",
                       help="train the base model after the encoder, in this process (default: at the same time, "
                            "in a second process; the artifacts are the same)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(run=_run_world_build)
    info = actions.add_parser("info", help="print where the world is and what it holds")
    info.add_argument("--cache", default=None, help="cache directory (default as for build)")
    info.set_defaults(run=_run_world_info)


def _run_world_build(args) -> int:
    from pisces_rl.worlds.shapes.build import build_world, default_cache_dir

    cache = args.cache or default_cache_dir()
    manifest = build_world(args.profile, cache_dir=cache, force=args.force, progress=not args.quiet,
                           num_threads=args.threads, parallel=not args.sequential)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in manifest.get("timings", {}).items() if v)
    print(f"ShapesWorld ({manifest['profile']}) ready in {cache}" + (f" ({timings})" if timings else " (cached)"))
    return 0


def _run_world_info(args) -> int:
    from pisces_rl.worlds.shapes.build import ARTIFACTS, default_cache_dir, read_manifest

    cache = args.cache or default_cache_dir()
    manifest = read_manifest(cache)
    if manifest is None:
        raise FileNotFoundError(f"no ShapesWorld in {str(cache)!r}; build it with `make world` "
                                "(or `pisces-rl world build`)")
    print(f"ShapesWorld in {cache}: profile {manifest['profile']}, config hash {manifest['config_hash']}")
    for name in ARTIFACTS:
        entry = manifest["artifacts"].get(name)
        if entry is None:
            print(f"  {name:<11} not built")
            continue
        metrics = entry.get("metrics") or {}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k)
        print(f"  {name:<11} {cache}/{name}  ({entry['seconds']:.0f} s{'; ' + shown if shown else ''})")
    versions = manifest.get("versions", {})
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``pisces-rl`` argument parser (one sub-parser per subcommand)."""
    parser = argparse.ArgumentParser(prog="pisces-rl", description="PISCES reward post-training tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_fit_ot_map(subparsers)
    _add_world(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pisces-rl`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"pisces-rl {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
