"""Build ShapesWorld's models, deterministically and cached: ``pisces-rl world build`` / ``make world``.

Phases (each artifact is written with ``save_pretrained`` into ``<cache>/<name>/``):

1. **corpus** — ``shapes_corpus(corpus_videos, split="train")`` (the "real videos" of the world) and a held-out
   corpus (``split="heldout"``, captions the training corpus never shows) for the metrics;
2. **encoder** — the tiny BLIP video–text encoder trained with ITC + ITM on hard negatives
   (:mod:`.encoder_training`), saved with ``BlipVideoTextEncoder.save_pretrained``;
3. **ot_map** / **l2_map** — the encoder (re-loaded from disk, as the rewards will load it) embeds the corpus:
   text [CLS] ``Y[N, D]`` and pooled real-video ``X[N, D]``; a :class:`~pisces_rl.ot.NeuralOTMap` is fitted from
   ``Y`` to ``X`` and an :class:`~pisces_rl.ot.L2RegressionMap` on the same pairs for the ablation;
4. **base_model** — the tiny Wan text-to-video model pretrained by flow matching
   (:func:`pisces_rl.worlds.shapes.base_model.train_shapes_base_model`), a diffusers ``WanPipeline`` directory.

The base model shares nothing with phases 2–3, so by default it trains in a second process while this one trains
the encoder and fits the maps (``parallel=True``; the phase functions are in :mod:`.phases`). Each process uses
``num_threads`` torch threads and its own seeded generators, so the artifacts equal a sequential build's and the
wall time on 2 cores is the longer of the two branches.

``<cache>/manifest.json`` records, per artifact, a key (sha256 of its configuration, of the keys of what it was
built from and of the library versions), its build time and its metrics. An artifact whose key matches and whose
directory exists is not rebuilt, so a second ``build_world`` is a no-op and changing e.g. the OT steps refits only
the maps. The cache directory is ``$PISCES_RL_CACHE/shapes_world`` if that variable is set, else
``<repo>/.cache/shapes_world`` (``~/.cache/pisces_rl/shapes_world`` outside a source checkout).

Configs name the artifacts with ``shapes``: ``model.pretrained: shapes``, ``rewards.encoder: shapes``,
``rewards.ot_map: shapes`` (``shapes:l2`` = the L2 map); :func:`resolve_world_name` turns those into directories
and raises a ``FileNotFoundError`` saying to run ``make world`` when the world is not built (a training launch,
possibly on several processes at once, never starts an 18-minute build by itself).

Example: ``build_world("quick", cache_dir="/tmp/world")``, then
``BlipVideoTextEncoder.from_pretrained("/tmp/world/encoder")``; a second ``build_world`` call returns at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import phases
from .encoder_training import ShapesEncoderConfig
from .phases import encoder_warning
from .store import (ARTIFACTS, MANIFEST, WORLD_NAMES, default_cache_dir, file_hashes, read_manifest,
                    resolve_world_name, world_artifact, write_manifest as _write_manifest)

__all__ = ["WorldConfig", "PROFILES", "world_config", "default_cache_dir", "build_world", "read_manifest",
           "encoder_warning", "world_artifact", "resolve_world_name", "WORLD_NAMES", "ARTIFACTS", "BUILD_VERSION"]

BUILD_VERSION = 1
"""Bump when a phase changes in a way that makes old artifacts stale."""
ENCODER_BRANCH = ("encoder", "ot_map", "l2_map")
"""The artifacts that need the corpora and train in this process; the base model can train beside them."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the world's artifacts (hashed into the manifest keys)."""

    profile: str = "full"
    seed: int = 0
    num_frames: int = 9                 # corpus clips: frames (the encoder subsamples encoder.num_frames)
    size: int = 32                      # corpus clips: frame side in pixels
    corpus_videos: int = 4000           # training corpus of the encoder and the OT maps (split="train")
    eval_videos: int = 400              # held-out corpus for the metrics (split="heldout")
    encoder: ShapesEncoderConfig = field(default_factory=ShapesEncoderConfig)
    ot_steps: int = 2500                # NeuralOTMap outer steps (k_t map steps + 1 critic step each)
    ot_hidden: int = 256                # width of the map's and the critic's MLPs
    ot_batch_size: int = 128
    ot_lr: float = 1e-3                 # (PISCES: 1e-4 for 512-d; at 64-d 1e-4 stays below the unmapped text)
    ot_k_t: int = 10
    l2_steps: int = 3000                # L2RegressionMap steps (same width, batch and lr)
    base_model: dict = field(default_factory=dict)   # ShapesBaseModelConfig overrides (profile, seed and clip
                                                     # format come from this config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _profiles() -> dict:
    full = WorldConfig()
    quick = WorldConfig(profile="quick", corpus_videos=600, eval_videos=120,
                        encoder=ShapesEncoderConfig(hidden_size=32, embed_dim=32, num_frames=3, init_range=0.2,
                                                    steps=200, batch_size=32, lr=2e-3, warmup_steps=20,
                                                    hard_negatives=1),
                        ot_steps=60, ot_hidden=64, ot_batch_size=64, l2_steps=150)
    return {"full": full, "quick": quick}


PROFILES = _profiles()


def world_config(profile: Union[str, WorldConfig] = "full", **overrides) -> WorldConfig:
    """The :class:`WorldConfig` of ``profile`` (``"full"`` or ``"quick"``), with fields replaced by ``overrides``."""
    if isinstance(profile, WorldConfig):
        cfg = profile
    elif profile in PROFILES:
        cfg = PROFILES[profile]
    else:
        raise ValueError(f"unknown world profile {profile!r}; use one of {sorted(PROFILES)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ----------------------------------------------------------------------------------------------- manifest / keys
def _versions() -> dict:
    import datasets
    import diffusers
    import torch
    import transformers

    import pisces_rl
    from .corpus import CORPUS_VERSION

    return {"build": BUILD_VERSION, "corpus": CORPUS_VERSION, "pisces_rl": getattr(pisces_rl, "__version__", "0"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__, "datasets": datasets.__version__}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _artifact_keys(cfg: WorldConfig, versions: dict) -> dict:
    corpus = {k: getattr(cfg, k) for k in ("seed", "num_frames", "size", "corpus_videos")}
    encoder = _key("encoder", versions, corpus, cfg.encoder.to_dict())
    ot = {k: getattr(cfg, k) for k in ("ot_steps", "ot_hidden", "ot_batch_size", "ot_lr", "ot_k_t")}
    return {"encoder": encoder,
            "ot_map": _key("ot_map", encoder, ot),
            "l2_map": _key("l2_map", encoder, {**ot, "l2_steps": cfg.l2_steps}),
            "base_model": _key("base_model", versions, phases.base_model_config(cfg).config_hash())}


# ----------------------------------------------------------------------------------------------- build
@contextmanager
def _locked(cache: Path):
    """Hold an exclusive lock on ``<cache>/.lock`` (POSIX), so concurrent builds of one cache run one at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fresh(target: Path) -> Path:
    """An empty temporary sibling of ``target`` (artifacts are written there, then renamed by :func:`_commit`)."""
    shutil.rmtree(target.with_name(target.name + ".tmp"), ignore_errors=True)
    return target.with_name(target.name + ".tmp")


def _commit(tmp: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _log(progress: bool, message: str) -> None:
    if progress:
        from tqdm.auto import tqdm
        tqdm.write(f"[shapes world] {message}")


def build_world(profile: Union[str, WorldConfig] = "full", cache_dir: Union[str, Path, None] = None,
                force: bool = False, progress: bool = True, num_threads: Optional[int] = 1,
                parallel: bool = True) -> dict:
    """Build (or reuse) the world's artifacts in ``cache_dir``; returns the manifest.

    Args:
        profile: ``"full"`` (the default world, about 18 minutes on 2 CPU cores), ``"quick"`` (tests: small
            corpus and models, a couple of minutes) or a :class:`WorldConfig`.
        cache_dir: output directory (default :func:`default_cache_dir`).
        force: rebuild every artifact even if its key matches the manifest.
        progress: tqdm bars and one line per phase.
        num_threads: torch threads during the build (restored afterwards); None keeps the current setting. The
            models are small, so extra threads gain little, while on a busy machine several threads that wait
            for each other made a training step up to 25x slower (measured on 2 shared cores): default 1.
        parallel: train the base model in a second process (``spawn``, ``num_threads`` threads) while this one
            trains the encoder and fits the maps. The two share no data, so the artifacts are the same as a
            sequential build's, and on 2 cores the wall time is about the longer branch instead of the sum.

    The manifest holds ``profile``, ``config`` (the :class:`WorldConfig`), ``config_hash``, ``versions`` and, per
    artifact, ``{"key", "seconds", "metrics"}``; ``timings`` gives the seconds of every phase of this call
    (0 for a reused artifact).
    """
    cfg = world_config(profile)
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):        # a second process waits, then finds the artifacts built
        return _build(cfg, cache, force, progress, num_threads, parallel)


def _build(cfg: WorldConfig, cache: Path, force: bool, progress: bool, num_threads: Optional[int],
           parallel: bool = True) -> dict:
    versions = _versions()
    keys = _artifact_keys(cfg, versions)
    old = (read_manifest(cache) or {}) if not force else {}
    manifest = {"build_version": BUILD_VERSION, "profile": cfg.profile, "config": cfg.to_dict(),
                "config_hash": _key(cfg.to_dict(), versions), "versions": versions, "artifacts": {}, "timings": {}}
    done = {name: entry for name, entry in old.get("artifacts", {}).items()
            if entry.get("key") == keys.get(name) and (cache / name).is_dir()}
    todo = [name for name in ARTIFACTS if name not in done]
    manifest["artifacts"] = dict(done)
    for name in done:
        _log(progress, f"{name}: cached in {cache / name} (same configuration and versions), skipped; "
                       "--force rebuilds it")
    if not todo:
        _log(progress, f"up to date in {cache} (profile {cfg.profile}); nothing to build")
        return {**old, "timings": {name: 0.0 for name in ARTIFACTS}}
    _log(progress, f"building {', '.join(todo)} into {cache} (profile {cfg.profile})")

    def phase(name: str, train, tmp: Optional[Path] = None, seconds: Optional[float] = None) -> None:
        """``train(tmp_dir) -> metrics``, timed (or ``seconds``), committed and recorded in the manifest."""
        start, tmp = time.perf_counter(), tmp or _fresh(cache / name)
        metrics = train(tmp)
        _commit(tmp, cache / name)
        timings[name] = seconds if seconds is not None else time.perf_counter() - start
        manifest["artifacts"][name] = {"key": keys[name], "seconds": round(timings[name], 2), "metrics": metrics,
                                       "files": file_hashes(cache / name)}
        _write_manifest(cache, manifest)
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("t2v_r1", "itm_pair_acc", "mknn", "spearman",
                                                              "final_transformer_loss") if k in metrics)
        _log(progress, f"{name}: {timings[name]:.0f} s" + (f"; held-out {shown}" if shown else ""))

    timings = manifest["timings"]
    wall = time.perf_counter()
    side = None                                  # (async result, tmp dir) of the base model's process
    if parallel and "base_model" in todo and any(name in todo for name in ENCODER_BRANCH):
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(1)
        tmp = _fresh(cache / "base_model")
        progress_file = str(cache / ".base_model.progress") if progress else None
        side = pool.apply_async(phases.base_model_job, (cfg, str(tmp), num_threads, progress_file)), tmp
        pool.close()
        watcher = ProgressWatcher(progress_file) if progress_file else None
        _log(progress, "base_model: training in a second process while the encoder trains (bar 'base model')")
    try:
        _run_phases(cfg, cache, manifest, todo, phase, side, progress, num_threads)
    except BaseException:
        if side is not None:                     # do not leave a 12-minute training running behind an error
            pool.terminate()
        raise
    finally:
        if side is not None:
            pool.join()
            if watcher is not None:
                watcher.stop()
    timings["total"] = sum(v for k, v in timings.items() if k != "total")
    timings["wall"] = time.perf_counter() - wall
    timings.update({name: 0.0 for name in done})
    manifest["timings"] = {k: round(v, 2) for k, v in timings.items()}
    _write_manifest(cache, manifest)
    _log(progress, f"done in {timings['wall']:.0f} s wall ({timings['total']:.0f} s of phases); manifest "
                   f"{cache / MANIFEST}")
    return manifest


class ProgressWatcher:
    """Shows the progress of the base model's second process as a bar of this process.

    The second process's tqdm bars write to ``path`` (:func:`.phases.base_model_job`); a daemon thread reads the
    file's last line every second and moves a bar ``base model: <phase>`` with the same counts and ETA.
    """

    _LINE = re.compile(r"(shapes VAE|shapes T2V):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")

    def __init__(self, path: str, interval: float = 1.0):
        import threading

        self.path, self.interval, self.bar, self.phase = path, interval, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Read the newest bar state from the file and show it."""
        from tqdm.auto import tqdm

        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.path) - 400))
                tail = f.read().decode(errors="ignore")
        except OSError:
            return
        found = self._LINE.findall(tail)
        if not found:
            return
        phase, n, total = found[-1][0], int(found[-1][1]), int(found[-1][2])
        if phase != self.phase:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, desc=f"base model: {phase.split()[-1]}", unit="step", position=1,
                            leave=False)
            self.phase = phase
        self.bar.update(n - self.bar.n)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.bar is not None:
            self.bar.close()
        try:
            os.remove(self.path)
        except OSError:
            pass


def _run_phases(cfg: WorldConfig, cache: Path, manifest: dict, todo: list, phase, side, progress: bool,
                num_threads: Optional[int]) -> None:
    """The phases of :func:`_build` in this process; the base model comes from ``side`` when it runs aside."""
    from .base_model import torch_threads

    timings = manifest["timings"]
    with torch_threads(num_threads):
        corpus = None
        if any(name in todo for name in ENCODER_BRANCH):
            start = time.perf_counter()
            corpus = phases.make_corpora(cfg)
            timings["corpus"] = time.perf_counter() - start
            _log(progress, f"corpus: {len(corpus[0])} training + {len(corpus[1])} held-out clips "
                           f"in {timings['corpus']:.0f} s")
        if "encoder" in todo:
            phase("encoder", lambda out: phases.train_encoder(cfg, corpus, out, progress))
            warning = encoder_warning(manifest["artifacts"]["encoder"]["metrics"], cfg)
            if warning:
                manifest["warnings"] = [warning]
                _write_manifest(cache, manifest)
                _log(progress, f"WARNING: {warning}")
        maps = [name for name in ("ot_map", "l2_map") if name in todo]
        if maps:
            start = time.perf_counter()
            embeddings = phases.encode_corpora(corpus, cache / "encoder", progress)
            timings["encode_corpus"] = time.perf_counter() - start
            for name in maps:
                phase(name, lambda out, name=name: phases.fit_map(cfg, name, embeddings, out, cache / "encoder",
                                                                  progress))
        if side is not None:
            metrics, seconds = side[0].get()
            phase("base_model", lambda out: metrics, tmp=side[1], seconds=seconds)
        elif "base_model" in todo:
            phase("base_model", lambda out: phases.train_base_model(cfg, out, progress))
