"""ShapesWorld build benchmark: wall time per phase and the quality of the reward models it produces.

Builds the world (``full`` profile by default; ``--force`` rebuilds even if the cache matches) and reports

* seconds per phase (corpus, encoder, encoding the corpus, OT map, L2 map, base model) and in total;
* the encoder on a held-out corpus (captions the training corpus never shows): text→video / video→text R@1 by
  ITC cosine and after ITM re-ranking, and ITM / ITC pairwise accuracy of the true caption against hard negatives
  that change one attribute (chance 0.5), per kind;
* the OT maps on the held-out pairs, as in PISCES Table 4: mutual-kNN (k = 10) between mapped text and real-video
  embeddings and the Spearman ρ of their pairwise distances, plus the mean cosine of a mapped caption to its own
  clip (the quality reward of a real clip) and mapped-text → clip R@1, for the neural OT map, the L2 regression
  map and the unmapped text embeddings.

Usage::

    python benchmarks/shapes_world_build.py                       # full build into a fresh temporary directory
    python benchmarks/shapes_world_build.py --cache .cache/shapes_world      # reuse / fill the default cache
    python benchmarks/shapes_world_build.py --profile quick --threads 2 --output /tmp/world_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=["full", "quick"])
    parser.add_argument("--cache", default=None, help="cache directory (default: a fresh temporary directory)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads during the build")
    parser.add_argument("--output", default=None, help="write the manifest (timings + metrics) here as JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from pisces_rl.worlds.shapes.build import build_world

    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="shapes_world_bench_")
        args.cache = os.path.join(tmp.name, "shapes_world")
    start = time.perf_counter()
    manifest = build_world(args.profile, cache_dir=args.cache, force=args.force, progress=not args.quiet,
                           num_threads=args.threads)
    wall = time.perf_counter() - start

    print(f"\nShapesWorld build, profile {manifest['profile']}, torch threads {args.threads}, cache {args.cache}")
    timings, artifacts = manifest["timings"], manifest["artifacts"]
    rows = [[k, f"{v:.1f}", f"{artifacts[k]['seconds']:.1f}" if k in artifacts else "-"] for k, v in timings.items()]
    print(_table(rows + [["wall (this call)", f"{wall:.1f}", "-"]],
                 ["phase", "seconds (this call)", "seconds (when built)"]))

    enc = manifest["artifacts"]["encoder"]["metrics"]
    print(f"\nencoder on {enc['pool']} held-out captions (retrieval chance R@1 {enc['chance_r1']:.3f})")
    print(_table([["text->video R@1 (ITC)", enc["t2v_r1"]], ["text->video R@1 (ITC, direction-agnostic)",
                                                           enc["t2v_r1_axis"]],
                  ["text->video R@1 (ITC top-8, ITM re-rank)", enc["t2v_r1_itm_rerank"]],
                  ["video->text R@1 (ITC)", enc["v2t_r1"]],
                  ["ITM accuracy, threshold 0.5 (class-balanced)", enc["itm_acc"]],
                  ["ITM mean p(match): positives / hard negatives",
                   f"{enc['itm_pos_mean']:.3f} / {enc['itm_neg_mean']:.3f}"]], ["metric", "value"]))
    kinds = [k.split("/", 1)[1] for k in enc if k.startswith("itm_pair_acc/")]
    rows = [[kind, enc[f"count/{kind}"], enc[f"itm_pair_acc/{kind}"], enc[f"itc_pair_acc/{kind}"]] for kind in kinds]
    rows.append(["all but direction", sum(enc[f"count/{k}"] for k in kinds if k != "direction"),
                 enc["itm_pair_acc"], enc["itc_pair_acc"]])
    print("\ntrue caption vs. hard negative (chance 0.5)")
    print(_table(rows, ["negative kind", "pairs", "ITM acc", "ITC acc"]))

    ot, l2 = manifest["artifacts"]["ot_map"]["metrics"], manifest["artifacts"]["l2_map"]["metrics"]
    print(f"\ntext->video maps on {ot['num_heldout']} held-out pairs (fitted on {ot['num_pairs']}; k = {ot['k']}; "
          "PISCES Table 4: OT 0.2597 / 0.9018, L2 0.2318 / 0.4873)")
    keys = ("mknn", "spearman", "paired_cos", "t2v_r1")
    print(_table([["Neural OT map", *(ot[k] for k in keys)], ["L2 regression", *(l2[k] for k in keys)],
                  ["no map (text [CLS])", *(ot["identity"][k] for k in keys)]],
                 ["map", "mKNN", "Spearman", "mean cos(T(y), x)", "T(y)->x R@1"]))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"wall_seconds": wall, **manifest}, f, indent=2, default=str)
        print(f"\nwrote {args.output}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
