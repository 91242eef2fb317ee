"""The quality bars a ShapesWorld must meet, and how they are measured.

A world is only useful as the embedded default if its encoder sees what the rewards are meant to see and its base
model leaves room to improve. :data:`QUALITY_BARS` states that in numbers, all measured on held-out data:

* the encoder's held-out metrics from the build (``manifest.json``): caption retrieval, and the matching head's pair
  accuracy on captions that differ in colour, count, motion direction, and a clip against its own time reversal;
* the OT map's held-out mutual-kNN above the unmapped text's (the map must help);
* the base model's ShapesBench Total on :data:`EVAL_PROMPTS` held-out prompts x :data:`EVAL_DRAWS` noise draws,
  sampled with the base model's recommended sampling (16 steps, CFG 3, η = 0; the default runs now train and
  evaluate CFG-free, but the bars stay where the shipped world's manifest measured them).

``pisces-rl world export`` measures them, writes them into the exported manifest (``quality``) and refuses to
export a world that misses a bar (``--force`` overrides); ``tests/test_shapes_world_build.py`` has the slow test
that a rebuild from nothing meets the bars of the shipped world's manifest.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional, Union

import torch

from .store import export_world, read_manifest

__all__ = ["QUALITY_BARS", "EVAL_PROMPTS", "EVAL_DRAWS", "measure_quality", "missed_bars", "export_with_quality",
           "cpu_name"]

QUALITY_BARS = {
    "encoder/t2v_r1": 0.30,                       # held-out caption -> clip retrieval, R@1 (chance 1/400)
    "encoder/itm_pair_acc/colour": 0.90,          # matching head prefers the true caption (chance 0.5)
    "encoder/itm_pair_acc/count": 0.85,
    "encoder/itm_pair_acc/direction": 0.85,       # ... over the caption with the motion reversed
    "encoder/itm_pair_acc/reversed": 0.85,         # ... a clip over its own time reversal, for its caption
    "ot_map/mknn_gain": 0.0,                      # held-out mutual-kNN of T(text) minus that of the raw text
    "base_model/shapesbench_total": 0.50,         # room to improve, but a model that draws the scenes
}
"""Minimum of each quality metric (``min`` bars; the base model also has :data:`TOTAL_CEILING`)."""
TOTAL_CEILING = 0.80
"""The base model's ShapesBench Total must stay below this: post-training needs room (the VAE caps it near 0.82)."""
EVAL_PROMPTS = 64
EVAL_DRAWS = 2


def cpu_name() -> str:
    """The CPU model, e.g. 'Intel(R) Xeon(R) Processor' (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.no_grad()
def base_model_total(base_model_dir: Union[str, Path], prompts: int = EVAL_PROMPTS, draws: int = EVAL_DRAWS) -> float:
    """ShapesBench Total of the base model on ``prompts`` held-out prompts x ``draws`` noise draws (seeds 0..)."""
    from pisces_rl.config import ModelConfig, SamplingConfig
    from pisces_rl.models import build_policy
    from pisces_rl.rollout import sample_rollout

    from .bench import ShapesBench
    from .corpus import shapes_prompts

    policy = build_policy(ModelConfig(pretrained=str(base_model_dir), lora_rank=1, lora_alpha=1), device="cpu")
    sampling = SamplingConfig(num_frames=9, height=32, width=32, num_inference_steps=16, guidance_scale=3.0,
                              eta=0.0)
    texts = shapes_prompts(prompts, seed=0, split="heldout")
    policy.transformer.eval()
    videos, captions = [], []
    for draw in range(draws):
        gen = torch.Generator().manual_seed(draw)
        for i in range(0, len(texts), 16):
            videos.append(sample_rollout(policy, texts[i:i + 16], sampling, generator=gen).videos.float().cpu())
            captions += texts[i:i + 16]
    return float(ShapesBench().evaluate(torch.cat(videos), captions).total)


def measure_quality(cache_dir: Union[str, Path]) -> dict:
    """Every metric of :data:`QUALITY_BARS` for the world in ``cache_dir`` (the base model is sampled here)."""
    cache = Path(cache_dir)
    manifest = read_manifest(cache)
    if manifest is None:
        raise FileNotFoundError(f"no ShapesWorld in {str(cache)!r}")
    enc = manifest["artifacts"]["encoder"]["metrics"]
    ot = manifest["artifacts"]["ot_map"]["metrics"]
    return {
        "encoder/t2v_r1": enc.get("t2v_r1"),
        "encoder/itm_pair_acc/colour": enc.get("itm_pair_acc/colour"),
        "encoder/itm_pair_acc/count": enc.get("itm_pair_acc/count"),
        "encoder/itm_pair_acc/direction": enc.get("itm_pair_acc/direction"),
        "encoder/itm_pair_acc/reversed": enc.get("itm_pair_acc/reversed"),
        "ot_map/mknn_gain": ot["mknn"] - ot["identity"]["mknn"],
        "base_model/shapesbench_total": base_model_total(cache / "base_model"),
    }


def missed_bars(metrics: dict, bars: Optional[dict] = None) -> list:
    """Names of the metrics below their bar (a missing metric misses), plus the Total ceiling if exceeded."""
    bars = QUALITY_BARS if bars is None else bars
    missed = [k for k, bar in bars.items() if metrics.get(k) is None or not metrics[k] >= bar]
    total = metrics.get("base_model/shapesbench_total")
    if total is not None and total >= TOTAL_CEILING:
        missed.append("base_model/shapesbench_total (ceiling)")
    return missed


def export_with_quality(cache_dir: Union[str, Path], dest: Union[str, Path], force: bool = False) -> dict:
    """Measure the world's quality, refuse (``ValueError``) if it misses a bar unless ``force``, then export it
    with checksums, the metrics, the bars and the CPU it was built on (:func:`.store.export_world`)."""
    metrics = measure_quality(cache_dir)
    failed = missed_bars(metrics)
    if failed and not force:
        shown = ", ".join(f"{k} = {metrics.get(k.split(' ')[0])}" for k in failed)
        raise ValueError(f"the world in {cache_dir} misses its quality bars ({shown}); rebuild it (e.g. another "
                         "seed) or pass --force to export it anyway")
    quality = {"metrics": metrics, "bars": QUALITY_BARS, "total_ceiling": TOTAL_CEILING, "failed": failed,
               "eval": {"prompts": EVAL_PROMPTS, "draws": EVAL_DRAWS, "split": "heldout"}}
    return export_world(cache_dir, dest, extra={"quality": quality, "built_on": cpu_name()})
