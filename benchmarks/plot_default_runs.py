"""Figure and table of the default runs (`shapes_default_runs.py` JSONs): held-out reward curves, run vs null.

    python benchmarks/plot_default_runs.py DIR [--out FIGURE.png]

``DIR`` holds ``<row>-seed<N>.json`` and ``<row>-null-seed<N>.json`` (one seed each, as the runner writes them with
``--output``). One panel per row (e.g. ``grpo``, ``nft``; four to a line): the held-out PISCES reward R
(``ot_quality`` + ``ot_semantic``) minus its value at iteration 0, per seed, solid for the runs and dashed for their
null controls.
Prints a markdown table per row: Δ R per seed, the mean, the null's, each component's mean Δ, ShapesBench Total.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(directory: str) -> dict:
    """``{row: {"run": [run dicts], "null": [run dicts]}}``, sorted by seed."""
    rows: dict = defaultdict(lambda: {"run": [], "null": []})
    for path in sorted(Path(directory).glob("*.json")):
        m = re.fullmatch(r"(.+?)(-null)?-seed(\d+)\.json", path.name)
        if not m:
            continue
        data = json.loads(path.read_text())
        rows[m.group(1)]["null" if m.group(2) else "run"].extend(data["runs"])
    for kind in rows.values():
        for runs in kind.values():
            runs.sort(key=lambda r: r["seed"])
    return dict(rows)


def delta(run: dict, key: str = "reward/pisces") -> float:
    """Last minus first held-out value of ``key``."""
    return run["curve"][key][-1] - run["curve"][key][0]


def table(row: str, runs: dict) -> str:
    """A markdown table of one row's runs and nulls."""
    lines = [f"**{row}**", "", "| | seeds | Δ R per seed | mean Δ R | Δ ot_quality | Δ ot_semantic | ShapesBench Total "
             "before → after (mean) | Δ Total per seed |", "|---|---|---|---|---|---|---|---|"]
    for kind in ("run", "null"):
        rs = runs[kind]
        if not rs:
            continue
        d = [delta(r) for r in rs]
        dt = [100 * r["judge"]["total"]["delta"] for r in rs]
        before = np.mean([100 * r["judge"]["total"]["before"] for r in rs])
        after = np.mean([100 * r["judge"]["total"]["after"] for r in rs])
        lines.append(f"| {kind} | {', '.join(str(r['seed']) for r in rs)} | {' / '.join(f'{x:+.4f}' for x in d)} | "
                     f"{np.mean(d):+.4f} | {np.mean([delta(r, 'reward/ot_quality') for r in rs]):+.4f} | "
                     f"{np.mean([delta(r, 'reward/ot_semantic') for r in rs]):+.4f} | {before:.1f} → {after:.1f} | "
                     f"{' / '.join(f'{x:+.2f}' for x in dt)} |")
    return "\n".join(lines)


def verdict(runs: dict) -> str:
    """The pre-registered criterion: Δ R > 0 on every seed and mean Δ R above the null's mean."""
    d = [delta(r) for r in runs["run"]]
    n = [delta(r) for r in runs["null"]]
    if any(x <= 0 for x in d):                     # decided whatever the missing seeds would give
        return f"fails: Δ R ≤ 0 on seed(s) {[r['seed'] for r, x in zip(runs['run'], d) if x <= 0]} " \
            f"({len(d)} runs, {len(n)} nulls ran)"
    if len(d) < 3 or len(n) < 3:
        return f"incomplete ({len(d)} runs, {len(n)} nulls)"
    outcome = "passes" if np.mean(d) > np.mean(n) else "fails"     # every Δ R > 0 here
    return f"{outcome}: Δ R > 0 on {len(d)}/{len(d)} seeds, mean {np.mean(d):+.4f} vs null {np.mean(n):+.4f}"


def plot(rows: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax, (row, runs) in zip(axes.flat, sorted(rows.items())):
        for kind, style in (("run", "-"), ("null", "--")):
            for r in runs[kind]:
                c = r["curve"]
                y = np.asarray(c["reward/pisces"]) - c["reward/pisces"][0]
                ax.plot(c["iteration"], y, style, marker="o", color=f"C{r['seed'] % 10}",
                        label=f"{'null ' if kind == 'null' else ''}seed {r['seed']}")
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_title(f"{row}: held-out PISCES reward − base")
        ax.set_xlabel("iteration")
        ax.set_ylabel("Δ (ot_quality + ot_semantic)")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    p.add_argument("--out", default=None, help="write the figure here (PNG)")
    a = p.parse_args()
    rows = load(a.directory)
    for row, runs in sorted(rows.items()):
        print(table(row, runs))
        print(f"\n{row}: {verdict(runs)}\n")
    if a.out:
        plot(rows, a.out)


if __name__ == "__main__":
    main()
