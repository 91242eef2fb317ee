"""``pisces-rl`` command line.

Subcommands::

    pisces-rl fit-ot-map --dataset DATA --output DIR [--encoder tiny|PATH] [--map neural|l2] [--steps N] ...
    pisces-rl world build [--profile full|quick] [--cache DIR] [--force] [--threads N]
    pisces-rl world info|verify [--cache DIR]
    pisces-rl world export --to DIR [--cache DIR]
    pisces-rl generate --lora DIR --prompt TEXT [--prompt TEXT ...] [--config YAML] [--pretrained P] [--out FILE]

Run ``pisces-rl SUBCOMMAND --help`` for the options. ``main(argv)`` returns the exit status (0 = success,
1 = a problem with the inputs, reported on stderr as one line; 2 = bad command-line usage).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from pisces_rl.worlds.shapes.store import WorldIntegrityError

__all__ = ["main", "build_parser", "generate_videos"]


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
                     help="Adam learning rate, cosine-decayed to 0.05 x lr (default: %(default)s, PISCES)")
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
    info = actions.add_parser("info", help="print which world runs use, where it is and what it holds")
    info.add_argument("--cache", default=None, help="world directory (default: the one runs use: "
                                                    "$PISCES_RL_CACHE/shapes_world, else a local build in "
                                                    "<repo>/.cache/shapes_world, else the prebuilt world)")
    info.set_defaults(run=_run_world_info)
    verify = actions.add_parser("verify", help="check every world file against its manifest sha256")
    verify.add_argument("--cache", default=None, help="world directory (default as for info)")
    verify.set_defaults(run=_run_world_verify)
    export = actions.add_parser(
        "export", help="copy a built world, with file checksums and its measured quality, to a directory "
                       "(how the prebuilt world shipped with pisces_rl is made)")
    export.add_argument("--cache", default=None, help="the built world (default: where `build` builds)")
    export.add_argument("--to", required=True, help="destination directory (replaced)")
    export.add_argument("--force", action="store_true", help="export even if the world misses a quality bar")
    export.set_defaults(run=_run_world_export)


def _run_world_build(args) -> int:
    from pisces_rl.worlds.shapes.build import build_world, default_cache_dir

    cache = args.cache or default_cache_dir()
    manifest = build_world(args.profile, cache_dir=cache, force=args.force, progress=not args.quiet,
                           num_threads=args.threads, parallel=not args.sequential)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in manifest.get("timings", {}).items() if v)
    print(f"ShapesWorld ({manifest['profile']}) ready in {cache}" + (f" ({timings})" if timings else " (cached)"))
    return 0


def _run_world_info(args) -> int:
    from pisces_rl.worlds.shapes.store import ARTIFACTS, PREBUILT_DIR, active_world_dir, read_manifest

    cache = args.cache or active_world_dir()
    manifest = read_manifest(cache)
    if manifest is None:
        raise FileNotFoundError(f"no ShapesWorld in {str(cache)!r}; build it with `make world` "
                                "(or `pisces-rl world build`)")
    kind = "prebuilt (shipped with pisces_rl)" if Path(cache).resolve() == PREBUILT_DIR else "built locally"
    print(f"ShapesWorld in {cache}, {kind}: profile {manifest['profile']}, config hash {manifest['config_hash']}"
          + (f", built on {manifest['built_on']}" if manifest.get("built_on") else ""))
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


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="sample videos from the base model with a trained LoRA",
        description="Load the base pipeline ('tiny', 'shapes', a diffusers directory or a hub id), apply the LoRA "
                    "with diffusers' pipe.load_lora_weights (fused at --lora-scale) and sample deterministically "
                    "(eta = 0) from seeded noise: the sampler of a training run's evaluation, so a run's seed, "
                    "batch size and evaluation prompts reproduce its 'trained' videos. Settings come from --config "
                    "(default: the config.yaml of the run whose lora/ folder --lora names), then from the flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several videos")
    p.add_argument("--lora", default=None, help="LoRA folder (a run's lora/) or hub id; omit for the base model")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA update")
    p.add_argument("--config", default=None, help="run or recipe YAML whose model and sampling sections are used")
    p.add_argument("--pretrained", default=None, help="overrides model.pretrained: tiny, shapes, a directory or hub id")
    p.add_argument("--num-frames", type=_positive_int, default=None, help="overrides sampling.num_frames")
    p.add_argument("--height", type=_positive_int, default=None, help="overrides sampling.height")
    p.add_argument("--width", type=_positive_int, default=None, help="overrides sampling.width")
    p.add_argument("--steps", type=_positive_int, default=None, help="overrides sampling.num_inference_steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="overrides sampling.guidance_scale")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the config's train.seed, else 0)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="videos per sampling call (default: the config's train.sample_batch_size, else all)")
    p.add_argument("--out", default="video.gif", help=".gif or .mp4; several prompts without --captioned give "
                                                      "one file each (video_0.gif, video_1.gif, ...)")
    p.add_argument("--captioned", action="store_true",
                   help="one grid with each prompt written above its video, upscaled to --cell-size pixels")
    p.add_argument("--cell-size", type=_positive_int, default=256, help="pixels per video side with --captioned")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.set_defaults(run=_run_generate)


def _generation_settings(args):
    """(ModelConfig, SamplingConfig, train section dict, config path) from --config / the run dir, then flags."""
    from pisces_rl.config import ConfigError, ModelConfig, SamplingConfig, load_yaml
    from pisces_rl.config.base import from_dict

    path = args.config
    if path is None and args.lora and os.path.isdir(args.lora):
        candidate = os.path.join(os.path.dirname(os.path.abspath(args.lora)), "config.yaml")
        path = candidate if os.path.isfile(candidate) else None
    data = load_yaml(path) if path else {}
    model = from_dict(ModelConfig, data.get("model") or {}, "model")
    sampling = from_dict(SamplingConfig, data.get("sampling") or {}, "sampling")
    if args.pretrained is not None:
        model.pretrained = args.pretrained
    model.lora_path = None  # the LoRA comes from --lora
    for flag, name in (("num_frames", "num_frames"), ("height", "height"), ("width", "width"),
                       ("steps", "num_inference_steps"), ("guidance_scale", "guidance_scale")):
        if getattr(args, flag) is not None:
            setattr(sampling, name, getattr(args, flag))
    for prefix, section in (("model", model), ("sampling", sampling)):
        try:
            section.validate()
        except ConfigError as err:
            raise err.under(prefix) from None
    return model, sampling, dict(data.get("train") or {}), path


def generate_videos(prompts: Sequence[str], model, sampling, lora: Optional[str] = None, lora_scale: float = 1.0,
                    seed: int = 0, batch_size: Optional[int] = None, device=None):
    """Videos ``[B, F, C, H, W]`` in [0, 1] (CPU) for ``prompts``, sampled with η = 0 from ``seed``.

    The base pipeline is built as ``build_policy`` does (``model``: a ``ModelConfig``); the LoRA folder or
    hub id ``lora`` is applied with ``pipe.load_lora_weights`` and fused at ``lora_scale``. Noise is drawn
    batch by batch (``batch_size`` prompts per call) from one generator, as
    :func:`pisces_rl.trainer.evaluation.evaluate_policy` does, so the same seed, batches and prompts give
    the same videos as a run's evaluation.
    """
    import dataclasses

    import torch

    from pisces_rl.models import VideoPolicy, get_family, resolve_dtype
    from pisces_rl.models.base import with_shift
    from pisces_rl.rollout import sample_rollout
    from pisces_rl.trainer.model_card import is_hub_id

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(model.dtype) if dev.type != "cpu" else torch.float32
    family = get_family(model.family, getattr(model, "family_options", None))
    if model.pretrained == "tiny":
        pipe = family.build_tiny_pipeline(seed=model.seed)
    else:
        pretrained = model.pretrained
        if pretrained == "shapes":
            from pisces_rl.worlds.shapes.build import resolve_world_name
            pretrained = resolve_world_name(pretrained, "model")
        pipe = family.load_pipeline(pretrained, torch_dtype=dtype)
    if getattr(model, "scheduler_shift", None) is not None:  # as build_policy
        pipe.scheduler = with_shift(pipe.scheduler, model.scheduler_shift)
    if lora:
        if not os.path.exists(lora) and not is_hub_id(lora):
            raise FileNotFoundError(f"--lora {lora!r} is neither an existing folder nor a hub id 'org/name'; "
                                    "pass the lora/ folder of a run (it holds pytorch_lora_weights.safetensors)")
        fuse = getattr(family, "fuse_lora", None)  # a family whose LoRA is not one file (Wan 2.2 A14B)
        if fuse is not None:
            fuse(pipe, lora, lora_scale)
        else:
            pipe.load_lora_weights(lora)
            pipe.fuse_lora(lora_scale=lora_scale)
            pipe.unload_lora_weights()
    # sampling goes through the training code path; its fresh adapter starts at zero (B = 0), a no-op
    policy = VideoPolicy(pipe, family, lora_rank=model.lora_rank, lora_alpha=model.lora_alpha,
                         lora_target_modules=model.lora_target_modules, dtype=dtype, device=dev, seed=model.seed)
    policy.transformer.eval()
    det = dataclasses.replace(sampling, eta=0.0)
    prompts = list(prompts)
    step = batch_size or len(prompts)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        return torch.cat([sample_rollout(policy, prompts[i:i + step], det, generator=gen).videos.float().cpu()
                          for i in range(0, len(prompts), step)])


def _run_generate(args) -> int:
    from pisces_rl.trainer.figures import save_captioned_grid
    from pisces_rl.trainer.tracking import save_video

    model, sampling, train, path = _generation_settings(args)
    seed = args.seed if args.seed is not None else int(train.get("seed", 0))
    batch = args.batch_size or train.get("sample_batch_size")
    if path:
        print(f"settings from {path}")
    videos = generate_videos(args.prompt, model, sampling, lora=args.lora, lora_scale=args.lora_scale, seed=seed,
                             batch_size=batch, device=args.device)
    if args.captioned:
        written = [save_captioned_grid([videos], args.out, column_labels=args.prompt, cell_size=args.cell_size,
                                       fps=args.fps)]
    elif len(videos) == 1:
        written = [save_video(videos[0], args.out, fps=args.fps)]
    else:
        stem, ext = os.path.splitext(args.out)
        written = [save_video(v, f"{stem}_{i}{ext}", fps=args.fps) for i, v in enumerate(videos)]
    _, f, _, h, w = videos.shape
    print(f"wrote {', '.join(written)} ({len(videos)} video{'s' if len(videos) > 1 else ''}, {f} frames "
          f"{h}x{w}, seed {seed}; base {model.pretrained}, LoRA {args.lora or 'none'})")
    return 0


def _run_world_verify(args) -> int:
    from pisces_rl.worlds.shapes.store import active_world_dir, read_manifest, verify_world

    cache = Path(args.cache or active_world_dir())
    manifest = read_manifest(cache)
    if manifest is None:
        raise FileNotFoundError(f"no ShapesWorld in {str(cache)!r}; build it with `make world`")
    verify_world(cache)
    files = sum(len(a.get("files") or {}) for a in manifest["artifacts"].values())
    print(f"ShapesWorld in {cache}: {files} files match the manifest")
    return 0


def _run_world_export(args) -> int:
    from pisces_rl.worlds.shapes.quality import export_with_quality
    from pisces_rl.worlds.shapes.store import default_cache_dir

    manifest = export_with_quality(args.cache or default_cache_dir(), args.to, force=args.force)
    failed = manifest.get("quality", {}).get("failed") or []
    print(f"exported to {args.to}" + (f" (misses its bars: {', '.join(failed)})" if failed else
                                      " (every quality bar met)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``pisces-rl`` argument parser (one sub-parser per subcommand)."""
    parser = argparse.ArgumentParser(prog="pisces-rl", description="PISCES reward post-training tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_fit_ot_map(subparsers)
    _add_world(subparsers)
    _add_generate(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pisces-rl`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError, ImportError, WorldIntegrityError) as exc:
        print(f"pisces-rl {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
