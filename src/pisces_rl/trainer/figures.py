"""What a run shows a person: the reward curves (``reward_curve.png``) and captioned video grids
(``before_after.gif``).

* :func:`plot_reward_curves` -- one panel per reward component and the total: the per-iteration mean
  (faint), its exponential moving average (TensorBoard's debiased EMA) with a ±1 std band (the spread of
  the reward over the iteration's videos, smoothed the same way), and the held-out evaluation points
  (iteration 0 = base model, then every ``logging.eval_every`` iterations, then the trained LoRA);
  a judge panel and the KL / consistency-distillation terms when they exist.
* :func:`captioned_grid_frames` / :func:`save_captioned_grid` -- rows of videos (e.g. base / trained),
  one column per prompt, upscaled by nearest neighbour to a viewable size, with the prompt written above
  each column and a label left of each row (Pillow's built-in font, no download).

Videos are ``[B, F, C, H, W]`` float tensors in ``[0, 1]``.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .tracking import _to_uint8_frames, _write_frames

__all__ = ["smooth_ema", "reward_components", "plot_reward_curves", "reward_curve_figure", "captioned_grid_frames",
           "save_captioned_grid", "wrap_text"]

ITERATION_NOTE = ("iteration = one round of sampling the prompts' groups, scoring them and updating the LoRA; "
                  "band = ±1 std over that iteration's videos")


# ----------------------------------------------------------------------------- curves
def smooth_ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (tensorboard ``vz_line_chart2/line-chart.ts``)::

        last_t = w * last_{t-1} + (1 - w) * x_t,   last_0 = 0,   smoothed_t = last_t / (1 - w ** n_t)

    ``n_t`` counts the finite values so far; a non-finite value gives NaN and leaves the state unchanged.
    ``weight`` ``w`` in ``[0, 1)``: 0 returns the values, values near 1 smooth strongly.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    last, count, out = 0.0, 0, []
    for value in values:
        value = float(value)
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        last = last * weight + (1.0 - weight) * value
        count += 1
        out.append(last / (1.0 - weight ** count))
    return out


def reward_components(keys) -> list[str]:
    """Reward names of ``reward/<name>/mean`` keys, in order, ``total`` last."""
    names = [k[len("reward/"):-len("/mean")] for k in keys if k.startswith("reward/") and k.endswith("/mean")]
    return [n for n in names if n != "total"] + (["total"] if "total" in names else [])


def _finite(values) -> bool:
    return any(math.isfinite(float(v)) for v in values)


def plot_reward_curves(history: Mapping[str, Sequence[float]], path: Union[str, os.PathLike],
                       evals: Optional[Mapping[str, Sequence[float]]] = None, smoothing: float = 0.6,
                       title: Optional[str] = None, note: str = ITERATION_NOTE) -> str:
    """Save :func:`reward_curve_figure` as a PNG; returns the path."""
    fig = reward_curve_figure(history, evals, smoothing, title, note)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)


def reward_curve_figure(history: Mapping[str, Sequence[float]], evals: Optional[Mapping[str, Sequence[float]]] = None,
                        smoothing: float = 0.6, title: Optional[str] = None, note: str = ITERATION_NOTE):
    """The reward curves of a run as a Matplotlib ``Figure`` (Agg canvas, no pyplot state).

    Args:
        history: per-iteration series (value ``i`` belongs to iteration ``i + 1``): ``reward/<name>/mean``
            and ``reward/<name>/std`` for each reward and ``total``; ``train/kl`` and ``train/cd_loss`` get
            their own panels when present.
        evals: held-out evaluation points, ``{"iteration": [0, ..., T], "reward/<name>": [...],
            "judge/<dimension>": [...]}`` (lists of one length; the first is the base model, the last the
            trained LoRA).
        smoothing: EMA weight of :func:`smooth_ema` for the training series.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evals = dict(evals or {})
    names = reward_components(history)
    for key in evals:  # rewards only evaluated (e.g. a resumed run with no history) still get a panel
        name = key[len("reward/"):] if key.startswith("reward/") else None
        if name and name not in names:
            names.insert(len(names) - (names[-1:] == ["total"]), name)
    panels: list[tuple[str, str]] = [("reward", n) for n in names]
    judge = [k for k in ("judge/total", "judge/quality", "judge/semantic") if k in evals and _finite(evals[k])]
    if not judge:
        judge = [k for k in evals if k.startswith("judge/") and _finite(evals[k])][:3]
    if judge:
        panels.append(("judge", ""))
    for key in ("train/kl", "train/cd_loss"):
        if history.get(key) and _finite(history[key]):
            panels.append(("train", key))
    if not panels:
        raise ValueError("plot_reward_curves needs reward/<name>/mean series or evaluation points")

    from matplotlib.ticker import MaxNLocator

    ncols = {1: 1, 2: 2, 4: 2}.get(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.3 * nrows + 1.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    eval_x = [float(x) for x in evals.get("iteration", [])]
    for ax, (kind, name) in zip(axes, panels):
        if kind == "reward":
            _reward_panel(ax, name, history, evals, eval_x, smoothing)
        elif kind == "judge":
            for key, marker in zip(judge, "sDo"):
                ax.plot(eval_x, evals[key], marker=marker, linestyle="--", label=f"judge: {key.split('/', 1)[1]}")
            _mark_before_after(ax, eval_x, evals[judge[0]])
            ax.set_title("judge (no reward sees it), held-out prompts", fontsize=10)
            ax.set_ylabel("score")
        else:
            ys = [float(v) for v in history[name]]
            xs = range(1, len(ys) + 1)
            ax.plot(xs, ys, color="tab:gray", alpha=0.35, linewidth=0.8)
            ax.plot(xs, smooth_ema(ys, smoothing), color="tab:purple", linewidth=2)
            ax.set_title({"train/kl": "KL to the base model (train/kl)",
                          "train/cd_loss": "consistency-distillation loss (train/cd_loss)"}[name], fontsize=10)
            ax.set_ylabel(name.split("/", 1)[1])
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}
    for ax in axes[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if title:
        fig.suptitle(title, fontsize=12)
    note_lines = textwrap.wrap(note, 40 * ncols + 40) if note else []
    note_h = 0.15 * len(note_lines) + 0.05                                      # inches
    legend_h = 0.22 * math.ceil(len(handles) / 4) + 0.1
    height = fig.get_figheight()
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)),
                   fontsize=8, frameon=False, bbox_to_anchor=(0.5, note_h / height))
    if note_lines:
        fig.text(0.5, 0.05 / height, "\n".join(note_lines), ha="center", va="bottom", fontsize=8, color="dimgray")
    bottom = (note_h + legend_h + 0.1) / height
    fig.tight_layout(rect=(0, bottom, 1, 0.97 if title else 1))
    return fig


def _reward_panel(ax, name: str, history, evals, eval_x, smoothing: float) -> None:
    mean = [float(v) for v in history.get(f"reward/{name}/mean", [])]
    color = "tab:red" if name == "total" else "tab:blue"
    if mean:
        xs = np.arange(1, len(mean) + 1)
        std = [float(v) for v in history.get(f"reward/{name}/std", [math.nan] * len(mean))]
        smooth = np.array(smooth_ema(mean, smoothing))
        ax.plot(xs, mean, color=color, alpha=0.3, linewidth=0.8, marker="." if len(mean) <= 30 else None,
                label="training prompts, per iteration")
        ax.plot(xs, smooth, color=color, linewidth=2, label=f"EMA (smoothing {smoothing:g})")
        if len(std) == len(mean) and _finite(std):
            spread = np.nan_to_num(np.array(smooth_ema(std, smoothing)), nan=0.0)
            ax.fill_between(xs, smooth - spread, smooth + spread, color=color, alpha=0.15, linewidth=0,
                            label="±1 std over the videos (EMA)")
    key = f"reward/{name}"
    if key in evals and _finite(evals[key]):
        ax.plot(eval_x, evals[key], color="black", marker="s", linestyle="--", linewidth=1, markersize=5,
                label="held-out prompts (η = 0)")
        _mark_before_after(ax, eval_x, evals[key])
    ax.set_title("total reward (weighted sum)" if name == "total" else f"reward: {name}", fontsize=10)
    ax.set_ylabel("reward")


def _mark_before_after(ax, xs, ys) -> None:
    """Write 'base' at the first evaluation point and 'trained' at the last one."""
    if not xs:
        return
    points = [(0, "base", 4, "left")] + ([(len(xs) - 1, "trained", -4, "right")] if len(xs) > 1 else [])
    for i, label, dx, align in points:
        y = float(ys[i])
        if math.isfinite(y):
            ax.annotate(f"{label} {y:.3g}", (xs[i], y), textcoords="offset points", xytext=(dx, 6), ha=align,
                        fontsize=7)


# ----------------------------------------------------------------------------- captioned video grids
def _font(size: int):
    """Pillow's built-in font at ``size`` px (FreeType build), else its fixed bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the 11 px bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` px; past ``max_lines`` the last
    line ends with ``...``. Words longer than a line are cut."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength

    def fits(s: str) -> bool:
        return measure(s, font=font) <= width

    pieces: list[str] = []
    for word in text.split():
        while len(word) > 1 and not fits(word):  # a word wider than a line is cut
            cut = max([i for i in range(1, len(word)) if fits(word[:i])] or [1])
            pieces.append(word[:cut])
            word = word[cut:]
        pieces.append(word)
    lines: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current} {piece}" if current else piece
        if current and not fits(candidate):
            lines.append(current)
            candidate = piece
        current = candidate
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def captioned_grid_frames(rows: Sequence[torch.Tensor], column_labels: Sequence[str],
                          row_labels: Optional[Sequence[str]] = None, cell_size: int = 256, max_columns: int = 4,
                          title: Optional[str] = None, max_caption_lines: int = 3) -> np.ndarray:
    """Frames ``[F, H_out, W_out, 3]`` uint8 of a captioned grid.

    ``rows`` are ``R`` batches ``[B, F, C, H, W]`` of one shape (e.g. ``[base, trained]``); video ``b`` of
    every row goes in column ``b`` under the caption ``column_labels[b]``, with ``row_labels[r]`` at the left.
    Each video is upscaled by the integer factor ``k = ceil(cell_size / min(H, W))`` (nearest neighbour).
    More than ``max_columns`` prompts wrap into further blocks of ``R`` rows.
    """
    from PIL import Image, ImageDraw

    rows = [torch.as_tensor(r) for r in rows]
    shapes = {tuple(r.shape) for r in rows}
    if not rows or len(shapes) != 1 or rows[0].dim() != 5:
        raise ValueError(f"rows must be batches [B, F, C, H, W] of one shape, got {sorted(shapes)}")
    b, f, _, h, w = rows[0].shape
    if len(column_labels) != b:
        raise ValueError(f"{len(column_labels)} column labels for {b} videos per row; give one per video")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    k = max(1, math.ceil(cell_size / min(h, w)))
    ch, cw = h * k, w * k
    pad = max(4, cw // 40)
    font = _font(max(11, min(22, cw // 14)))
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + 2
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if not row_labels else int(max(draw0.textlength(s, font=font) for s in row_labels)) + 2 * pad
    captions = [wrap_text(str(c), font, cw - 2, max_caption_lines) for c in column_labels]
    cap_h = max(len(c) for c in captions) * line_h + pad
    title_h = line_h + pad if title else 0
    ncol = min(b, max(1, int(max_columns)))
    blocks = math.ceil(b / ncol)
    block_h = cap_h + len(rows) * (ch + pad) + (2 * pad if b > ncol else 0)  # blocks set apart
    width = label_w + ncol * cw + (ncol + 1) * pad
    height = title_h + blocks * block_h + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad // 2), title, fill=(0, 0, 0), font=font)
    cells = []  # (row, video, y, x)
    for i in range(b):
        block, col = divmod(i, ncol)
        x = label_w + pad + col * (cw + pad)
        y0 = title_h + block * block_h
        for j, line in enumerate(captions[i]):
            draw.text((x + 1, y0 + pad // 2 + j * line_h), line, fill=(0, 0, 0), font=font)
        for r in range(len(rows)):
            y = y0 + cap_h + r * (ch + pad)
            cells.append((r, i, y, x))
            if row_labels and col == 0:
                draw.text((pad, y + ch // 2 - line_h // 2), row_labels[r], fill=(0, 0, 0), font=font)
    base = np.asarray(canvas)
    frames = np.repeat(base[None], f, axis=0)
    for r, i, y, x in cells:
        video = _to_uint8_frames(rows[r][i])                                   # [F, H, W, 3]
        frames[:, y:y + ch, x:x + cw] = video.repeat(k, axis=1).repeat(k, axis=2)
    return frames


def save_captioned_grid(rows: Sequence[torch.Tensor], path: Union[str, os.PathLike], column_labels: Sequence[str],
                        row_labels: Optional[Sequence[str]] = None, fps: float = 8.0, cell_size: int = 256,
                        max_columns: int = 4, title: Optional[str] = None) -> str:
    """Write :func:`captioned_grid_frames` as ``.gif`` or ``.mp4``; returns the path."""
    frames = captioned_grid_frames(rows, column_labels, row_labels, cell_size=cell_size, max_columns=max_columns,
                                   title=title)
    if Path(path).suffix.lower() == ".mp4" and frames.shape[1] % 2 + frames.shape[2] % 2:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)),
                        constant_values=255)
    return _write_frames(frames, path, fps)
