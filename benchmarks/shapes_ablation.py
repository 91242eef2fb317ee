"""The PISCES ablation (paper Table 3 in miniature) on ShapesWorld, judged by ShapesBench.

    python benchmarks/shapes_ablation.py [--trainers grpo backprop] [--seeds 0 1 2] [--jobs 2]
                                         [--grpo-steps 60] [--backprop-steps 60] [--output DIR]

Needs the built world (``make world``). For each trainer and each row below, one run per seed, every run with the
same steps, batch and sampling (the trainer's ShapesWorld config, ``recipes/configs/*_shapes_cpu.yaml``); only the
rewards differ:

* ``base model``      the "before" evaluation of the runs (LoRA disabled), so no extra compute;
* ``w/o OT``          both rewards with ``rewards.use_ot=false`` and no OT map: raw [CLS] cosine + vanilla-attention
                      VTM;
* ``quality only``    ``rewards.weights={ot_quality: 1}`` (OT map on);
* ``semantic only``   ``rewards.weights={ot_semantic: 1}`` (token-level partial OT on);
* ``full PISCES``     both rewards with OT (the configs as shipped).

Every run is a subprocess of the recipe (``recipes/grpo_short_video.py`` / ``backprop_short_video.py``) with one
torch thread; ``--jobs`` runs that many at once. The judge never enters training: it only scores the held-out
evaluation prompts before and after (``logging.judge=shapesbench``), and no hyper-parameter was chosen on it.

Writes ``<output>/shapes_ablation.md`` (table, command, machine, wall time), ``shapes_ablation.json`` (every run's
numbers), ``shapes_ablation.png`` (ShapesBench Total per row) and ``shapes_ablation_curves.png`` (training reward
per row). Run directories go to ``--runs`` (default ``runs/shapes_ablation``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAINERS = {
    "grpo": ("recipes/grpo_short_video.py", "recipes/configs/grpo_shapes_cpu.yaml"),
    "backprop": ("recipes/backprop_short_video.py", "recipes/configs/backprop_shapes_cpu.yaml"),
}
ROWS = {
    "w/o OT": ["rewards.use_ot=false", "rewards.ot_map=null"],
    "quality only": ["rewards.weights={ot_quality: 1.0}"],
    "semantic only": ["rewards.weights={ot_semantic: 1.0}"],
    "full PISCES": [],
}
COLUMNS = ("quality", "semantic", "total")
BASE = "base model"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each (default: %(default)s)")
    p.add_argument("--grpo-steps", type=int, default=None, help="train.max_steps of every GRPO run (default: config)")
    p.add_argument("--backprop-steps", type=int, default=None, help="train.max_steps of every backprop run")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--runs", default=str(ROOT / "runs" / "shapes_ablation"), help="run directories")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"), help="where the report goes")
    p.add_argument("--reuse", action="store_true", help="keep finished runs (summary.json present)")
    return p.parse_args(argv)


def slug(row: str) -> str:
    return row.replace("/", "").replace(" ", "_")


def run_one(trainer: str, row: str, seed: int, args) -> dict:
    """One recipe subprocess; returns its summary.json (raises with the log's tail if the run failed)."""
    recipe, config = TRAINERS[trainer]
    out = Path(args.runs) / trainer / slug(row) / f"seed{seed}"
    summary = out / "summary.json"
    steps = args.grpo_steps if trainer == "grpo" else args.backprop_steps
    if not (args.reuse and summary.exists()):
        cmd = [sys.executable, str(ROOT / recipe), "--config", str(ROOT / config), f"output_dir={out}",
               "overwrite_output_dir=true", f"train.seed={seed}", "logging.report_to=none", "checkpoint.save_every=0", "logging.sample_every=0",
               *([f"train.max_steps={steps}"] if steps else []), *ROWS[row], *args.set]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(out / "run.log", "w") as log:
            code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            tail = (out / "run.log").read_text()[-3000:]
            raise RuntimeError(f"{trainer} / {row} / seed {seed} failed (exit {code}):\n{tail}")
        print(f"  {trainer:8s} {row:14s} seed {seed}: {time.time() - start:6.0f} s", flush=True)
    data = json.loads(summary.read_text())
    data["_dir"] = str(out)
    return data


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def judge(summary: dict, when: str) -> dict[str, float]:
    """``{dimension: score in %}`` of the before/after evaluation."""
    return {k[len("judge/"):]: 100.0 * v[when] for k, v in summary["eval"].items() if k.startswith("judge/")}


def aggregate(results: dict) -> dict:
    """results[trainer][row][seed] = summary -> table[trainer][row][dimension] = (mean, std, values)."""
    table = {}
    for trainer, rows in results.items():
        table[trainer] = {}
        base_from = rows.get("full PISCES") or next(iter(rows.values()))
        for row, scores in [(BASE, [judge(s, "before") for s in base_from.values()])] + [
                (row, [judge(s, "after") for s in seeds.values()]) for row, seeds in rows.items()]:
            table[trainer][row] = {d: (*mean_std([s[d] for s in scores]), [s[d] for s in scores])
                                   for d in scores[0]}
    return table


def fmt(cell) -> str:
    return f"{cell[0]:.1f} ± {cell[1]:.1f}"


def markdown(table: dict, args, command: str, wall: float, runs_per: dict) -> str:
    lines = ["# ShapesWorld ablation (PISCES Table 3 in miniature)", "",
             f"Command: `{command}`", "",
             f"Machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, "
             f"{args.jobs} runs at once with one torch thread each; {_accelerator()}; Python {platform.python_version()}, "
             f"torch {_version('torch')}. Wall time: {wall / 60:.1f} min for {sum(runs_per.values())} runs.", "",
             "ShapesBench scores in % (mean ± std over seeds " + ", ".join(map(str, args.seeds)) + ") on the "
             "held-out evaluation prompts. The base-model row is the LoRA-disabled evaluation of the same runs.", ""]
    for trainer, rows in table.items():
        steps = args.grpo_steps if trainer == "grpo" else args.backprop_steps
        lines += [f"## {trainer}" + (f" ({steps} steps per run)" if steps else " (steps as in its config)"), "",
                  "| row | Quality | Semantic | Total | Δ Total vs base |", "|---|---|---|---|---|"]
        base_total = rows[BASE]["total"][0]
        for row, cells in rows.items():
            delta = "" if row == BASE else f"{cells['total'][0] - base_total:+.1f}"
            lines.append(f"| {row} | " + " | ".join(fmt(cells[c]) for c in COLUMNS) + f" | {delta} |")
        dims = [d for d in rows[BASE] if d not in COLUMNS]
        lines += ["", "Per dimension (mean over seeds):", "",
                  "| row | " + " | ".join(d.replace("_", " ") for d in dims) + " |",
                  "|---|" + "---|" * len(dims)]
        for row, cells in rows.items():
            lines.append(f"| {row} | " + " | ".join(f"{cells[d][0]:.1f}" for d in dims) + " |")
        lines.append("")
    lines += ["![ShapesBench Total per row](shapes_ablation.png)", "",
              "![Training reward per row](shapes_ablation_curves.png)", ""]
    return "\n".join(lines)


def _accelerator() -> str:
    """Where the runs trained: the recipes use CUDA when torch sees it, else the CPU."""
    import torch

    return f"GPU {torch.cuda.get_device_name(0)} shared by all runs" if torch.cuda.is_available() else "CPU only"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception:                                   # noqa: BLE001 - report only
        return "?"


def plot(table: dict, results: dict, output: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5.5 * len(table), 3.8), squeeze=False)
    for ax, (trainer, rows) in zip(axes[0], table.items()):
        names = list(rows)
        means = [rows[r]["total"][0] for r in names]
        stds = [rows[r]["total"][1] for r in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=["#999"] + ["#4c72b0"] * (len(names) - 1))
        for i, r in enumerate(names):
            ax.scatter([i] * len(rows[r]["total"][2]), rows[r]["total"][2], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_ylim(min(means) - 3 * max(stds + [1.0]), max(means) + 3 * max(stds + [1.0]))
        ax.set_title(f"{trainer}: ShapesBench Total (%)")
    fig.tight_layout()
    fig.savefig(output / "shapes_ablation.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (trainer, rows) in zip(axes[0], results.items()):
        for row, seeds in rows.items():
            curves = [s.get("history", {}).get("reward/total/mean", []) for s in seeds.values()]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(map(len, curves))
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=row)
        ax.set_xlabel("step")
        ax.set_title(f"{trainer}: training reward (weighted sum, mean over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "shapes_ablation_curves.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pisces_rl.worlds.shapes.build import read_manifest

    if read_manifest() is None:
        raise SystemExit("ShapesWorld is not built: run `make world` first (about 18 min on 2 CPU cores)")
    command = "python benchmarks/shapes_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    jobs = [(t, r, s) for t in args.trainers for r in args.rows for s in args.seeds]
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: (job, run_one(*job, args)), jobs))
    wall = time.time() - start
    results: dict = {}
    for (trainer, row, seed), summary in done:
        results.setdefault(trainer, {}).setdefault(row, {})[seed] = summary
    table = aggregate(results)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    runs_per = {t: sum(len(s) for s in rows.values()) for t, rows in results.items()}
    (output / "shapes_ablation.md").write_text(markdown(table, args, command, wall, runs_per))
    (output / "shapes_ablation.json").write_text(json.dumps(
        {"command": command, "wall_s": wall, "table": table,
         "runs": {t: {r: {s: {"dir": v["_dir"], "eval": v["eval"], "metrics": v["metrics"]} for s, v in seeds.items()}
                      for r, seeds in rows.items()} for t, rows in results.items()}}, indent=1, default=float))
    plot(table, results, output)
    print((output / "shapes_ablation.md").read_text())
    return table


if __name__ == "__main__":
    main()
