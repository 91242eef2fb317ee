"""Experiment tracking and artefacts: trackers, sample videos, curves, the final summary table.

Everything here writes files or logs and holds no training state. Videos are ``[F, C, H, W]`` float
tensors in ``[0, 1]`` (one video) or ``[B, F, C, H, W]`` (a batch), as produced by the rollout.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["init_trackers", "save_video", "save_video_grid", "plot_curve", "format_summary", "flatten_config",
           "progress_postfix"]

_TRACKERS = ("tensorboard", "wandb")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Union[int, float, str, bool]]:
    """``{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}``; lists/None/other values become strings.

    TensorBoard's hparams only accept scalars, so the run config is flattened before it is logged.
    """
    out: dict[str, Union[int, float, str, bool]] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _report_to_list(report_to) -> list[str]:
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [str(n).strip().lower() for n in names]
    if names in ([], ["none"], [""]):
        return []
    bad = [n for n in names if n not in _TRACKERS]
    if bad:
        raise ValueError(f"unknown tracker(s) {bad}; logging.report_to must be one of "
                         f"{list(_TRACKERS) + ['none']}")
    return names


def init_trackers(accelerator, project_name: str, config_dict: Optional[Mapping[str, Any]] = None,
                  report_to="tensorboard") -> list:
    """Start the experiment trackers and store the run config; call on every process.

    Args:
        accelerator: the run's accelerator. If it was built with ``log_with`` those trackers are used
            (they must match ``report_to``); otherwise they are added here. TensorBoard needs the
            accelerator's ``project_dir`` (event files go to ``<project_dir>/logs/<project_name>``).
        project_name: run/project name for the trackers.
        config_dict: nested run config; flattened (:func:`flatten_config`) and stored as hyper-parameters.
        report_to: ``"tensorboard"`` (default), ``"wandb"`` (must be installed), ``"none"``/``None``, or a list.

    Returns:
        ``accelerator.trackers`` (empty on non-main processes and for ``"none"``).
    """
    names = _report_to_list(report_to)
    if not names:
        return []
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ImportError("logging.report_to='wandb' but wandb is not installed; `pip install wandb` or set "
                          "logging.report_to=tensorboard")
    from accelerate.tracking import GeneralTracker

    existing = [(t.name if isinstance(t, GeneralTracker) else str(t)).lower() for t in (accelerator.log_with or [])]
    if existing and sorted(existing) != sorted(names):
        raise ValueError(f"the accelerator was built with log_with={existing} but report_to={names}; "
                         "pass the same trackers to build_accelerator(log_with=...)")
    if not existing:
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        trackers = []
        for name in names:
            if name == "tensorboard":
                if accelerator.logging_dir is None:
                    raise ValueError("TensorBoard needs a log directory: build the accelerator with "
                                     "build_accelerator(project_dir=output_dir)")
                if accelerator.is_main_process:
                    trackers.append(TensorBoardTracker(project_name, accelerator.logging_dir))
            elif accelerator.is_main_process:
                trackers.append(WandBTracker(project_name))
        accelerator.log_with = trackers
    accelerator.init_trackers(project_name, config=flatten_config(config_dict or {}))
    return list(accelerator.trackers)


# ----------------------------------------------------------------------------- videos
def _to_uint8_frames(frames) -> np.ndarray:
    """``[F, C, H, W]`` in [0, 1] (tensor or array) -> ``[F, H, W, 3]`` uint8."""
    x = frames.detach().float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames, np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"a video must be [F, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("video contains NaN/inf values")
    x = np.clip(x, 0.0, 1.0).transpose(0, 2, 3, 1)                      # [F, H, W, C]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return (x * 255.0 + 0.5).astype(np.uint8)


def _write_frames(frames: np.ndarray, path: Union[str, os.PathLike], fps: float) -> str:
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".gif", ".mp4"):
        raise ValueError(f"unsupported video format {ext or '(none)'!r} for {path}; use .gif or .mp4")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                       loop=0, optimize=False, disposal=1)
    else:
        if importlib.util.find_spec("imageio_ffmpeg") is None:
            raise ImportError("writing .mp4 needs imageio-ffmpeg (`pip install imageio-ffmpeg`); "
                              "or save as .gif (logging.video_format=gif)")
        import imageio.v2 as imageio

        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    return str(path)


def save_video(frames, path: Union[str, os.PathLike], fps: float = 8.0) -> str:
    """Write one video ``[F, C, H, W]`` in [0, 1] to ``path`` (``.gif`` via Pillow, ``.mp4`` via imageio-ffmpeg).

    Values are clipped to [0, 1]; single-channel videos are written as grey. Returns the path.
    (Pillow stores identical consecutive GIF frames once, with their durations added.)
    """
    return _write_frames(_to_uint8_frames(frames), path, fps)


def save_video_grid(videos, path: Union[str, os.PathLike], nrow: Optional[int] = None, padding: int = 2,
                    fps: float = 8.0, pad_value: float = 1.0) -> str:
    """Tile a batch of videos frame by frame into one video, ``nrow`` videos per row.

    Args:
        videos: ``[B, F, C, H, W]`` in [0, 1], or a list of ``[F, C, H, W]`` videos of one shape (e.g.
            ``torch.cat([before, after])`` with ``nrow=len(before)`` puts "after" under "before").
        path: ``.gif`` or ``.mp4``.
        nrow: videos per row (default: all in one row).
        padding: pixels between tiles, filled with ``pad_value``.

    Output frame size: ``rows * H + (rows + 1) * padding`` by ``nrow * W + (nrow + 1) * padding``.
    """
    if isinstance(videos, (list, tuple)):
        shapes = {tuple(v.shape) for v in videos}
        if len(shapes) != 1:
            raise ValueError(f"all videos of a grid must have one shape, got {sorted(shapes)}")
        videos = torch.stack([torch.as_tensor(v) for v in videos])
    videos = torch.as_tensor(videos)
    if videos.dim() != 5:
        raise ValueError(f"videos must be [B, F, C, H, W], got shape {tuple(videos.shape)}")
    b, f, c, h, w = videos.shape
    nrow = b if nrow is None else int(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(b / nrow)
    grid = torch.full((f, c, rows * h + (rows + 1) * padding, nrow * w + (nrow + 1) * padding),
                      float(pad_value), dtype=torch.float32)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, :, y:y + h, x:x + w] = videos[i].detach().float().cpu()
    return save_video(grid, path, fps=fps)


# ----------------------------------------------------------------------------- curves and tables
def plot_curve(values: Mapping[str, Sequence[float]], path: Union[str, os.PathLike], title: Optional[str] = None,
               xlabel: str = "step") -> str:
    """Plot each named series (one value per step) in its own panel and save a PNG. Returns the path.

    Uses Matplotlib's Agg canvas directly, so no display and no global pyplot state are involved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {k: [float(v) for v in vs] for k, vs in values.items()}
    if not series or not any(series.values()):
        raise ValueError("plot_curve needs at least one non-empty series, e.g. {'reward/total/mean': [...]}")
    series = {k: v for k, v in series.items() if v}
    fig = Figure(figsize=(6, 2.2 * len(series)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, squeeze=False)[:, 0]
    for ax, (name, ys) in zip(axes, series.items()):
        ax.plot(range(1, len(ys) + 1), ys, marker="o" if len(ys) < 30 else None, linewidth=1.5)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:.4g}" if (abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3)) else f"{v:.4f}"


def format_summary(metrics: Mapping[str, Any], title: str = "Summary") -> str:
    """Plain-text table of final metrics.

    ``metrics`` is either flat (``{"reward/total/mean": 0.61}`` -> two columns) or nested, one column per
    inner key (``{"Total": {"before": 80.4, "after": 82.8}}`` -> metric | before | after).
    """
    if not metrics:
        return f"{title}\n(no metrics)"
    nested = all(isinstance(v, Mapping) for v in metrics.values())
    if nested:
        cols: list[str] = []
        for v in metrics.values():
            cols += [k for k in v if k not in cols]
        header = ["metric", *map(str, cols)]
        rows = [[str(k), *(_fmt(v[c]) if c in v else "-" for c in cols)] for k, v in metrics.items()]
    else:
        header = ["metric", "value"]
        rows = [[str(k), _fmt(v)] for k, v in metrics.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *map(line, rows), rule])


def progress_postfix(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The progress bar's numbers for one iteration's ``metrics``, in this order: the total reward, each
    reward component (``reward/<name>/mean``; ``pkg.module:fn`` shows as ``fn``), the KL and
    consistency-distillation terms when they are on (``train/kl``, ``train/cd_loss``), the loss, videos
    per second, and the skipped / not-applicable reward counts when any."""
    out: dict[str, str] = {}
    names = [k[len("reward/"):-len("/mean")] for k in metrics if k.startswith("reward/") and k.endswith("/mean")]
    for name in ["total"] + [n for n in names if n != "total"]:
        value = metrics.get(f"reward/{name}/mean")
        if value is not None:
            out[name.rsplit(":", 1)[-1]] = f"{float(value):.4f}"
    for key, label in (("train/kl", "kl"), ("train/cd_loss", "cd"), ("train/loss", "loss")):
        if key in metrics:
            out[label] = f"{float(metrics[key]):.3g}"
    if "time/samples_per_s" in metrics:
        out["vid/s"] = f"{float(metrics['time/samples_per_s']):.3g}"
    for kind, label in (("skipped", "skipped"), ("not_applicable", "n/a")):
        count = sum(float(metrics.get(f"reward/{n}/{kind}", 0) or 0) for n in names if n != "total")
        if count > 0:
            out[label] = f"{count:g}"
    return out


def setup_logging(level: int = 20) -> None:
    """Recipe logging: pisces_rl's own messages at ``level`` (INFO), everything else at WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pisces_rl").setLevel(level)
