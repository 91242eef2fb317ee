"""The phases of a ShapesWorld build (:mod:`.build`): corpora, encoder, OT maps and base model.

Each phase trains one artifact into a directory and returns its metrics for the manifest. They are plain functions
of the :class:`~.build.WorldConfig` so that :func:`~.build.build_world` can run the base model in a second process
(:func:`base_model_job`) while this one trains the encoder and fits the maps.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

__all__ = ["make_corpora", "train_encoder", "encoder_warning", "encode_corpora", "fit_map", "base_model_config",
           "train_base_model", "base_model_job"]


def make_corpora(cfg):
    """``(train, heldout)`` corpora; held-out captions never occur in the training corpus."""
    from .corpus import shapes_corpus

    common = dict(num_frames=cfg.num_frames, size=cfg.size)
    return (shapes_corpus(cfg.corpus_videos, seed=cfg.seed, split="train", **common),
            shapes_corpus(cfg.eval_videos, seed=cfg.seed + 1, split="heldout", **common))


def train_encoder(cfg, corpora, out: Path, progress: bool) -> dict:
    """Train, save, reload from disk and evaluate the encoder on the held-out corpus."""
    from pisces_rl.encoders import BlipVideoTextEncoder

    from .encoder_eval import evaluate_encoder
    from .encoder_training import train_shapes_encoder

    encoder, history = train_shapes_encoder(corpora[0], cfg.encoder, progress=progress)
    encoder.save_pretrained(out)
    metrics = evaluate_encoder(BlipVideoTextEncoder.from_pretrained(out), corpora[1])
    info = {"config": cfg.encoder.to_dict(), "corpus_videos": len(corpora[0]), "metrics": metrics,
            "history": history}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return metrics


def encoder_warning(metrics: dict, cfg) -> Optional[str]:
    """A warning when a temporal encoder left motion direction near chance on the held-out corpus, else None.

    Motion direction is learned late in training (module doc of :mod:`.encoder_training`), and where it is learned
    depends on the machine's floating-point arithmetic: the same build gave held-out direction pair accuracy 0.93
    on one x86-64 CPU and 0.56 on another. Below 0.7 (chance 0.5) the rewards barely see motion direction. Only
    the full profile is checked (the quick one is too short to learn motion anywhere).
    """
    value = metrics.get("itm_pair_acc/direction")
    if cfg.profile != "full" or not cfg.encoder.temporal or value is None or value != value or value >= 0.7:
        return None
    return (f"the encoder's held-out motion-direction pair accuracy is {value:.2f} (chance 0.50): on this machine it "
            "did not learn motion direction in its training budget, so the PISCES rewards barely see it "
            "(docs/shapesworld.md, 'Reproducibility')")


def encode_corpora(corpora, encoder_dir: Path, progress: bool):
    """``(text[N, D], video[N, D], held_text[M, D], held_video[M, D])``: text [CLS] and pooled real-video
    embeddings of both corpora by the encoder as saved on disk (the way the rewards load it)."""
    from pisces_rl.encoders import BlipVideoTextEncoder
    from pisces_rl.ot.fit import encode_corpus

    encoder = BlipVideoTextEncoder.from_pretrained(encoder_dir)
    return (*encode_corpus(encoder, corpora[0], batch_size=128, progress=progress),
            *encode_corpus(encoder, corpora[1], batch_size=128))


def fit_map(cfg, name: str, embeddings, out: Path, encoder_dir: Path, progress: bool) -> dict:
    """Fit the ``ot_map`` (NeuralOTMap) or ``l2_map`` (L2RegressionMap), save it, score it on held-out pairs."""
    import torch

    from pisces_rl.ot import L2RegressionMap, NeuralOTMap, distance_spearman, mutual_knn

    text, video, held_text, held_video = embeddings
    k = min(10, len(held_text) - 1)

    def score(fn) -> dict:
        """Held-out mKNN / Spearman (PISCES Table 4), mean paired cosine (= R_q of a real clip) and T(y)->x R@1."""
        with torch.no_grad():
            mapped = fn(held_text)                                                             # [M, D]
        sim = torch.nn.functional.normalize(mapped, dim=-1) @ held_video.T                     # [M, M] cosines
        return {"mknn": mutual_knn(mapped, held_video, k=k), "spearman": distance_spearman(mapped, held_video),
                "paired_cos": float(sim.diagonal().mean()),
                "t2v_r1": float((sim.argmax(dim=1) == torch.arange(len(sim))).float().mean())}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 3)
        ot_map = (NeuralOTMap if name == "ot_map" else L2RegressionMap)(dim=text.shape[1], hidden=cfg.ot_hidden)
    options = {"batch_size": cfg.ot_batch_size, "lr": cfg.ot_lr, "val_fraction": 0.1, "seed": cfg.seed}
    if name == "ot_map":
        options.update(steps=cfg.ot_steps, k_t=cfg.ot_k_t)
    else:
        options.update(steps=cfg.l2_steps)
    history = ot_map.fit(text, video, progress=progress, **options)
    ot_map.save_pretrained(out)
    metrics = {**score(ot_map), "identity": score(lambda y: y), "num_pairs": len(text),
               "num_heldout": len(held_text), "k": k, "val_best": history.get("best")}
    info = {"map": type(ot_map).__name__, "encoder": str(encoder_dir), "metrics": metrics, "options": options,
            "history": history}
    (out / "fit_ot_map.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return metrics


def base_model_config(cfg):
    """The base model's ``ShapesBaseModelConfig``: the world's seed, clip format and profile, then overrides."""
    from .base_model import PROFILES as BASE_PROFILES, ShapesBaseModelConfig

    profile = cfg.profile if cfg.profile in BASE_PROFILES else "full"
    return ShapesBaseModelConfig(**{"profile": profile, "seed": cfg.seed, "num_frames": cfg.num_frames,
                                    "size": cfg.size, **cfg.base_model})


def train_base_model(cfg, out: Path, progress: bool) -> dict:
    """Pretrain the world's text-to-video model by flow matching (``base_model.train_shapes_base_model``)."""
    from .base_model import METADATA_FILE, train_shapes_base_model

    train_shapes_base_model(base_model_config(cfg), str(out), progress=progress)
    info = json.loads((out / METADATA_FILE).read_text())
    curves = {k: info.get(f"{k}_loss_curve") or [float("nan")] for k in ("vae", "transformer")}
    return {"final_vae_loss": curves["vae"][-1], "final_transformer_loss": curves["transformer"][-1],
            "parameters": info.get("parameters"), "phase_seconds": info.get("seconds")}


def base_model_job(cfg, out: str, num_threads: Optional[int], progress_file: Optional[str] = None) -> tuple:
    """Body of the base-model process of a parallel build: ``(metrics, seconds)`` of training into ``out``.

    With ``progress_file`` the process's progress bars go to that file (the parent process reads it and shows one
    bar of its own, :class:`~.build.ProgressWatcher`) instead of to the terminal the parent draws on."""
    import sys

    from .base_model import torch_threads

    start = time.perf_counter()
    if progress_file:
        sys.stderr = open(progress_file, "w", buffering=1)
    with torch_threads(num_threads):
        metrics = train_base_model(cfg, Path(out), progress=bool(progress_file))
    return metrics, time.perf_counter() - start
