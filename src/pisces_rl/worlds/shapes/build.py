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
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .encoder_training import ShapesEncoderConfig

__all__ = ["WorldConfig", "PROFILES", "world_config", "default_cache_dir", "build_world", "read_manifest",
           "world_artifact", "resolve_world_name", "WORLD_NAMES", "ARTIFACTS", "BUILD_VERSION"]

BUILD_VERSION = 1
"""Bump when a phase changes in a way that makes old artifacts stale."""
MANIFEST = "manifest.json"
ARTIFACTS = ("encoder", "ot_map", "l2_map", "base_model")
WORLD_NAMES = {"model": {"shapes": "base_model"}, "encoder": {"shapes": "encoder"},
               "ot_map": {"shapes": "ot_map", "shapes:l2": "l2_map"}}
"""World artifact names configs may use, per role (``model.pretrained``, ``rewards.encoder``, ``rewards.ot_map``)."""


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


def default_cache_dir() -> Path:
    """``$PISCES_RL_CACHE/shapes_world``, else ``<repo>/.cache/shapes_world`` (``~/.cache/pisces_rl/...``)."""
    if os.environ.get("PISCES_RL_CACHE"):
        return Path(os.environ["PISCES_RL_CACHE"]).expanduser() / "shapes_world"
    repo = Path(__file__).resolve().parents[4]
    if (repo / "setup.cfg").is_file() or (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "shapes_world"
    return Path.home() / ".cache" / "pisces_rl" / "shapes_world"


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
            "base_model": _key("base_model", versions, _base_model_config(cfg).config_hash())}


def read_manifest(cache_dir: Union[str, Path, None] = None) -> Optional[dict]:
    """The manifest of the world in ``cache_dir`` (default :func:`default_cache_dir`), or None if not built."""
    path = Path(cache_dir or default_cache_dir()) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    tmp = cache_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, cache_dir / MANIFEST)


def world_artifact(name: str, cache_dir: Union[str, Path, None] = None) -> Path:
    """Directory of a built artifact (``encoder``, ``ot_map``, ``l2_map``, ``base_model``).

    Raises ``FileNotFoundError`` telling to run ``make world`` if the world (or that artifact) is not built.
    """
    if name not in ARTIFACTS:
        raise ValueError(f"unknown world artifact {name!r}; use one of {ARTIFACTS}")
    cache = Path(cache_dir or default_cache_dir())
    manifest = read_manifest(cache)
    path = cache / name
    if manifest is None or name not in manifest.get("artifacts", {}) or not path.is_dir():
        raise FileNotFoundError(
            f"the ShapesWorld {name.replace('_', ' ')} is not built in {str(cache)!r}; build the world first with "
            "`make world` (or `pisces-rl world build`; `--profile quick` takes a few minutes), or point "
            "PISCES_RL_CACHE at the folder that holds shapes_world/")
    return path


def resolve_world_name(spec, role: str) -> Optional[str]:
    """``spec`` as a directory if it names a world artifact for ``role`` (``model``, ``encoder``, ``ot_map``),
    else None (then ``spec`` is a path / hub id / built-in name for the caller to handle)."""
    if role not in WORLD_NAMES:
        raise ValueError(f"unknown role {role!r}; use one of {sorted(WORLD_NAMES)}")
    if not isinstance(spec, str) or spec not in WORLD_NAMES[role]:
        return None
    return str(world_artifact(WORLD_NAMES[role][spec]))



# ----------------------------------------------------------------------------------------------- phases
def _make_corpora(cfg: WorldConfig):
    """``(train, heldout)`` corpora; held-out captions never occur in the training corpus."""
    from .corpus import shapes_corpus

    common = dict(num_frames=cfg.num_frames, size=cfg.size)
    return (shapes_corpus(cfg.corpus_videos, seed=cfg.seed, split="train", **common),
            shapes_corpus(cfg.eval_videos, seed=cfg.seed + 1, split="heldout", **common))


def _train_encoder(cfg: WorldConfig, corpora, out: Path, progress: bool) -> dict:
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


def _encode_corpora(corpora, encoder_dir: Path, progress: bool):
    """``(text[N, D], video[N, D], held_text[M, D], held_video[M, D])``: text [CLS] and pooled real-video
    embeddings of both corpora by the encoder as saved on disk (the way the rewards load it)."""
    from pisces_rl.encoders import BlipVideoTextEncoder
    from pisces_rl.ot.fit import encode_corpus

    encoder = BlipVideoTextEncoder.from_pretrained(encoder_dir)
    return (*encode_corpus(encoder, corpora[0], batch_size=128, progress=progress),
            *encode_corpus(encoder, corpora[1], batch_size=128))


def _fit_map(cfg: WorldConfig, name: str, embeddings, out: Path, encoder_dir: Path, progress: bool) -> dict:
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


def _base_model_config(cfg: WorldConfig):
    """The base model's ``ShapesBaseModelConfig``: the world's seed, clip format and profile, then overrides."""
    from .base_model import PROFILES as BASE_PROFILES, ShapesBaseModelConfig

    profile = cfg.profile if cfg.profile in BASE_PROFILES else "full"
    return ShapesBaseModelConfig(**{"profile": profile, "seed": cfg.seed, "num_frames": cfg.num_frames,
                                    "size": cfg.size, **cfg.base_model})


def _train_base_model(cfg: WorldConfig, out: Path, progress: bool) -> dict:
    """Pretrain the world's text-to-video model by flow matching (``base_model.train_shapes_base_model``)."""
    from .base_model import METADATA_FILE, train_shapes_base_model

    train_shapes_base_model(_base_model_config(cfg), str(out), progress=progress)
    info = json.loads((out / METADATA_FILE).read_text())
    curves = {k: info.get(f"{k}_loss_curve") or [float("nan")] for k in ("vae", "transformer")}
    return {"final_vae_loss": curves["vae"][-1], "final_transformer_loss": curves["transformer"][-1],
            "parameters": info.get("parameters"), "phase_seconds": info.get("seconds")}


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
                force: bool = False, progress: bool = True, num_threads: Optional[int] = 1) -> dict:
    """Build (or reuse) the world's artifacts in ``cache_dir``; returns the manifest.

    Args:
        profile: ``"full"`` (the default world, about 25 minutes on 2 shared CPU cores), ``"quick"`` (tests: small
            corpus and models, a couple of minutes) or a :class:`WorldConfig`.
        cache_dir: output directory (default :func:`default_cache_dir`).
        force: rebuild every artifact even if its key matches the manifest.
        progress: tqdm bars and one line per phase.
        num_threads: torch threads during the build (restored afterwards); None keeps the current setting. The
            models are small, so extra threads gain little, while on a busy machine several threads that wait
            for each other made a training step up to 25x slower (measured on 2 shared cores): default 1.

    The manifest holds ``profile``, ``config`` (the :class:`WorldConfig`), ``config_hash``, ``versions`` and, per
    artifact, ``{"key", "seconds", "metrics"}``; ``timings`` gives the seconds of every phase of this call
    (0 for a reused artifact).
    """
    cfg = world_config(profile)
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):        # a second process waits, then finds the artifacts built
        return _build(cfg, cache, force, progress, num_threads)


def _build(cfg: WorldConfig, cache: Path, force: bool, progress: bool, num_threads: Optional[int]) -> dict:
    versions = _versions()
    keys = _artifact_keys(cfg, versions)
    old = (read_manifest(cache) or {}) if not force else {}
    manifest = {"build_version": BUILD_VERSION, "profile": cfg.profile, "config": cfg.to_dict(),
                "config_hash": _key(cfg.to_dict(), versions), "versions": versions, "artifacts": {}, "timings": {}}
    done = {name: entry for name, entry in old.get("artifacts", {}).items()
            if entry.get("key") == keys.get(name) and (cache / name).is_dir()}
    todo = [name for name in ARTIFACTS if name not in done]
    manifest["artifacts"] = dict(done)
    if not todo:
        _log(progress, f"up to date in {cache} (profile {cfg.profile}); nothing to build")
        return {**old, "timings": {name: 0.0 for name in ARTIFACTS}}
    _log(progress, f"building {', '.join(todo)} into {cache} (profile {cfg.profile})")

    def phase(name: str, train) -> None:         # train(tmp_dir) -> metrics; timed, committed, recorded
        start, tmp = time.perf_counter(), _fresh(cache / name)
        metrics = train(tmp)
        _commit(tmp, cache / name)
        timings[name] = time.perf_counter() - start
        manifest["artifacts"][name] = {"key": keys[name], "seconds": round(timings[name], 2), "metrics": metrics}
        _write_manifest(cache, manifest)
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("t2v_r1", "itm_pair_acc", "mknn", "spearman",
                                                              "final_transformer_loss") if k in metrics)
        _log(progress, f"{name}: {timings[name]:.0f} s" + (f"; held-out {shown}" if shown else ""))

    timings = manifest["timings"]
    from .base_model import torch_threads

    with torch_threads(num_threads):
        corpus = None
        if any(name in todo for name in ("encoder", "ot_map", "l2_map")):
            start = time.perf_counter()
            corpus = _make_corpora(cfg)
            timings["corpus"] = time.perf_counter() - start
            _log(progress, f"corpus: {len(corpus[0])} training + {len(corpus[1])} held-out clips "
                           f"in {timings['corpus']:.0f} s")
        if "encoder" in todo:
            phase("encoder", lambda out: _train_encoder(cfg, corpus, out, progress))
        maps = [name for name in ("ot_map", "l2_map") if name in todo]
        if maps:
            start = time.perf_counter()
            embeddings = _encode_corpora(corpus, cache / "encoder", progress)
            timings["encode_corpus"] = time.perf_counter() - start
            for name in maps:
                phase(name, lambda out, name=name: _fit_map(cfg, name, embeddings, out, cache / "encoder", progress))
        if "base_model" in todo:
            phase("base_model", lambda out: _train_base_model(cfg, out, progress))
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        timings.update({name: 0.0 for name in done})
    manifest["timings"] = {k: round(v, 2) for k, v in timings.items()}
    _write_manifest(cache, manifest)
    _log(progress, f"done in {timings['total']:.0f} s; manifest {cache / MANIFEST}")
    return manifest
