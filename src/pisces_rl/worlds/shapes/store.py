"""Where ShapesWorld lives, and the check that its files are the ones its manifest names.

A world is a directory holding one sub-directory per artifact (``encoder``, ``ot_map``, ``l2_map``,
``base_model``) and ``manifest.json``. The manifest records, per artifact, the sha256 of every file
(``"files": {relative path: sha256}``), so a world that was edited, truncated or half-copied fails to load with one
:class:`WorldIntegrityError` that names the file and the fix, instead of training on wrong weights.

Which world a run uses (:func:`active_world_dir`), first match wins:

1. ``$PISCES_RL_CACHE/shapes_world`` when that variable is set (built or not: an unbuilt one is an error that
   says to build it);
2. ``<repo>/.cache/shapes_world`` when it holds a manifest, i.e. after ``make world`` rebuilt the world on this
   machine;
3. the **prebuilt world** shipped inside the package (``pisces_rl/worlds/shapes/prebuilt/``): the same bytes on
   every machine, made by the project's own build (``pisces-rl world build`` then ``pisces-rl world export``), so
   ``make train-grpo`` starts training at once on a fresh clone.

Example::

    >>> from pisces_rl.worlds.shapes.store import active_world_dir, verify_world, world_artifact
    >>> verify_world(active_world_dir())          # raises WorldIntegrityError on a changed file
    >>> world_artifact("encoder")                  # Path to the verified encoder directory
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional, Union

__all__ = ["MANIFEST", "ARTIFACTS", "WORLD_NAMES", "PREBUILT_DIR", "WorldIntegrityError", "default_cache_dir",
           "active_world_dir", "read_manifest", "write_manifest", "file_hashes", "verify_world", "world_artifact",
           "resolve_world_name", "shard_safetensors", "export_world"]

MANIFEST = "manifest.json"
ARTIFACTS = ("encoder", "ot_map", "l2_map", "base_model")
WORLD_NAMES = {"model": {"shapes": "base_model"}, "encoder": {"shapes": "encoder"},
               "ot_map": {"shapes": "ot_map", "shapes:l2": "l2_map"}}
"""World artifact names configs may use, per role (``model.pretrained``, ``rewards.encoder``, ``rewards.ot_map``)."""
PREBUILT_DIR = Path(__file__).resolve().with_name("prebuilt")
"""The world shipped with the package (see the module docstring)."""

PathLike = Union[str, os.PathLike]
_verified: dict = {}          # (world dir, manifest mtime_ns, size) -> True: hash each world once per process


class WorldIntegrityError(RuntimeError):
    """A world file is missing or differs from the sha256 its manifest records."""


def default_cache_dir() -> Path:
    """Where ``make world`` builds: ``$PISCES_RL_CACHE/shapes_world``, else ``<repo>/.cache/shapes_world`` in a
    source checkout, else ``~/.cache/pisces_rl/shapes_world``."""
    if os.environ.get("PISCES_RL_CACHE"):
        return Path(os.environ["PISCES_RL_CACHE"]).expanduser() / "shapes_world"
    repo = Path(__file__).resolve().parents[4]
    if (repo / "setup.cfg").is_file() or (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "shapes_world"
    return Path.home() / ".cache" / "pisces_rl" / "shapes_world"


def active_world_dir() -> Path:
    """The world runs use when a config says ``shapes`` (module docstring: env var, local build, prebuilt)."""
    cache = default_cache_dir()
    if os.environ.get("PISCES_RL_CACHE") or (cache / MANIFEST).is_file():
        return cache
    if (PREBUILT_DIR / MANIFEST).is_file():
        return PREBUILT_DIR
    return cache


def read_manifest(cache_dir: Optional[PathLike] = None) -> Optional[dict]:
    """The manifest of the world in ``cache_dir`` (default :func:`active_world_dir`), or None if there is none."""
    path = Path(cache_dir or active_world_dir()) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (temporary file, then rename)."""
    tmp = Path(cache_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, Path(cache_dir) / MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(directory: PathLike) -> dict:
    """``{relative path: sha256}`` of every file under ``directory``, sorted by path."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def verify_world(cache_dir: PathLike, names: Optional[Iterable[str]] = None) -> None:
    """Check every file of the artifacts ``names`` (default all in the manifest) against its manifest sha256.

    Artifacts whose manifest entry has no ``files`` (worlds built before checksums existed) are not checked.
    Raises :class:`WorldIntegrityError` naming the first file that is missing or differs, and the fix.
    """
    cache = Path(cache_dir)
    manifest_path = cache / MANIFEST
    stat = manifest_path.stat() if manifest_path.is_file() else None
    key = (str(cache.resolve()), stat and stat.st_mtime_ns, stat and stat.st_size, tuple(names or ()))
    if stat is None or _verified.get(key):
        return
    manifest = read_manifest(cache)
    if manifest is None:
        raise WorldIntegrityError(f"{manifest_path} is not valid JSON; {_fix(cache)}")
    for name in (names or manifest.get("artifacts", {})):
        files = manifest.get("artifacts", {}).get(name, {}).get("files")
        for rel, expected in (files or {}).items():
            path = cache / name / rel
            if not path.is_file():
                raise WorldIntegrityError(f"ShapesWorld file {path} is missing (listed in {manifest_path}); "
                                          f"{_fix(cache)}")
            actual = _sha256(path)
            if actual != expected:
                raise WorldIntegrityError(f"ShapesWorld file {path} does not match its manifest (sha256 {actual[:12]}"
                                          f"…, expected {expected[:12]}…): the file was changed or damaged; "
                                          f"{_fix(cache)}")
    _verified[key] = True


def _fix(cache: Path) -> str:
    if cache.resolve() == PREBUILT_DIR:
        return (f"restore the shipped world with `git checkout -- {PREBUILT_DIR}` (or reinstall pisces_rl), or "
                "build your own with `make world`")
    return f"rebuild it with `pisces-rl world build --force --cache {cache}` (`make world WORLD_ARGS=--force`)"


def world_artifact(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Directory of a built and verified artifact (``encoder``, ``ot_map``, ``l2_map``, ``base_model``).

    ``cache_dir`` defaults to :func:`active_world_dir`. Raises ``FileNotFoundError`` telling to run ``make world``
    if the world (or that artifact) is not there, :class:`WorldIntegrityError` if its files do not match.
    """
    if name not in ARTIFACTS:
        raise ValueError(f"unknown world artifact {name!r}; use one of {ARTIFACTS}")
    cache = Path(cache_dir or active_world_dir())
    manifest = read_manifest(cache)
    path = cache / name
    if manifest is None or name not in manifest.get("artifacts", {}) or not path.is_dir():
        raise FileNotFoundError(
            f"the ShapesWorld {name.replace('_', ' ')} is not built in {str(cache)!r}; build the world first with "
            "`make world` (or `pisces-rl world build`; `--profile quick` takes a few minutes), or unset "
            "PISCES_RL_CACHE to use the world shipped with pisces_rl")
    verify_world(cache, [name])
    return path


def resolve_world_name(spec, role: str) -> Optional[str]:
    """``spec`` as a directory if it names a world artifact for ``role`` (``model``, ``encoder``, ``ot_map``),
    else None (then ``spec`` is a path / hub id / built-in name for the caller to handle)."""
    if role not in WORLD_NAMES:
        raise ValueError(f"unknown role {role!r}; use one of {sorted(WORLD_NAMES)}")
    if not isinstance(spec, str) or spec not in WORLD_NAMES[role]:
        return None
    return str(world_artifact(WORLD_NAMES[role][spec]))


def shard_safetensors(path: Path, max_bytes: int) -> list:
    """Split ``<name>.safetensors`` into shards of at most ``max_bytes`` (a tensor larger than that gets a shard of
    its own) plus ``<name>.safetensors.index.json`` -- the sharded layout that diffusers' and transformers'
    ``from_pretrained`` read -- and remove the single file. The tensors are the same bytes. Returns the shards."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    groups, size = [[]], 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    stem, names, weight_map = path.name[: -len(".safetensors")], [], {}
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(path.with_name(name)), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    path.with_name(path.name + ".index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    path.unlink()
    return names


def export_world(cache_dir: PathLike, dest: PathLike, extra: Optional[dict] = None,
                 max_file_bytes: int = 4 * 2**20) -> dict:
    """Copy a built world (every artifact and its manifest, with fresh file hashes) to ``dest``; returns the
    manifest written there. ``extra`` entries (e.g. ``quality``, ``built_on``) are added to the manifest. Weight
    files over ``max_file_bytes`` are split into shards (:func:`shard_safetensors`; same tensors, loaded the same
    way), so no file of a world kept in git is large. The world is verified before it is copied, and the copy
    after."""
    cache, dest = Path(cache_dir), Path(dest)
    manifest = read_manifest(cache)
    if manifest is None or set(manifest.get("artifacts", {})) != set(ARTIFACTS):
        raise FileNotFoundError(f"{cache} does not hold a complete world; build it with `pisces-rl world build`")
    verify_world(cache)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ARTIFACTS:
        shutil.copytree(cache / name, dest / name)
        for big in [p for p in (dest / name).rglob("*.safetensors") if p.stat().st_size > max_file_bytes]:
            shard_safetensors(big, max_file_bytes)
        manifest["artifacts"][name]["files"] = file_hashes(dest / name)
    manifest.update(extra or {})
    write_manifest(dest, manifest)
    verify_world(dest)
    return manifest
