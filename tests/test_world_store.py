"""The world a run uses, its checksums, and the prebuilt world shipped with the package."""
import json

import pytest

from pisces_rl.worlds.shapes import store
from pisces_rl.worlds.shapes.quality import QUALITY_BARS, TOTAL_CEILING, missed_bars
from pisces_rl.worlds.shapes.store import (ARTIFACTS, PREBUILT_DIR, WorldIntegrityError, active_world_dir,
                                           file_hashes, verify_world, world_artifact, write_manifest)


def _fake_world(root):
    """A world directory whose artifacts are small files, with a manifest that records their sha256."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"profile": "full", "config_hash": "x", "artifacts": {}}
    for name in ARTIFACTS:
        (root / name / "sub").mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({"name": name}))
        (root / name / "sub" / "weights.bin").write_bytes(bytes(range(64)) * 4)
        manifest["artifacts"][name] = {"key": name, "seconds": 1.0, "metrics": {}, "files": file_hashes(root / name)}
    write_manifest(root, manifest)
    return root


def test_a_world_whose_files_match_its_manifest_loads(tmp_path):
    world = _fake_world(tmp_path / "w")
    verify_world(world)
    assert world_artifact("encoder", world) == world / "encoder"
    assert set(json.loads((world / "manifest.json").read_text())["artifacts"]["encoder"]["files"]) == {
        "config.json", "sub/weights.bin"}


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_world_whose_files_do_not_match_fails_with_one_clear_error(tmp_path, monkeypatch, damage, capsys):
    """Loading through the library (a config's ``shapes`` name) and the CLI both stop with the file and the fix."""
    from pisces_rl.cli import main
    from pisces_rl.worlds.shapes.store import resolve_world_name

    world = _fake_world(tmp_path / "shapes_world")
    weights = world / "ot_map" / "sub" / "weights.bin"
    if damage == "changed":
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    else:
        weights.unlink()
    monkeypatch.setenv("PISCES_RL_CACHE", str(tmp_path))
    with pytest.raises(WorldIntegrityError, match=r"ot_map/sub/weights\.bin.*(does not match|missing).*rebuild"):
        resolve_world_name("shapes", "ot_map")
    assert resolve_world_name("shapes", "encoder") == str(world / "encoder")      # other artifacts are fine
    assert main(["world", "verify"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights.bin" in err[0] and "Traceback" not in err[0]


def test_runs_use_the_env_world_then_a_local_build_then_the_prebuilt_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PISCES_RL_CACHE", raising=False)
    local = tmp_path / "repo" / ".cache" / "shapes_world"
    monkeypatch.setattr(store, "default_cache_dir", lambda: local)
    if (PREBUILT_DIR / "manifest.json").is_file():
        assert active_world_dir() == PREBUILT_DIR
    _fake_world(local)
    assert active_world_dir() == local
    monkeypatch.setenv("PISCES_RL_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(store, "default_cache_dir", lambda: tmp_path / "elsewhere" / "shapes_world")
    assert active_world_dir() == tmp_path / "elsewhere" / "shapes_world"       # set but not built: an error later
    with pytest.raises(FileNotFoundError, match="make world"):
        world_artifact("encoder")


def test_missed_bars_names_each_metric_below_its_bar():
    good = dict(QUALITY_BARS)
    assert missed_bars(good) == []
    assert missed_bars({**good, "encoder/itm_pair_acc/direction": 0.56}) == ["encoder/itm_pair_acc/direction"]
    assert missed_bars({**good, "base_model/shapesbench_total": TOTAL_CEILING}) == [
        "base_model/shapesbench_total (ceiling)"]
    assert "ot_map/mknn_gain" in missed_bars({k: v for k, v in good.items() if k != "ot_map/mknn_gain"})


prebuilt = pytest.mark.skipif(not (PREBUILT_DIR / "manifest.json").is_file(), reason="no prebuilt world")


@prebuilt
def test_the_prebuilt_world_matches_its_checksums_and_meets_its_bars():
    manifest = json.loads((PREBUILT_DIR / "manifest.json").read_text())
    verify_world(PREBUILT_DIR)
    assert all(manifest["artifacts"][name]["files"] for name in ARTIFACTS)
    quality = manifest["quality"]
    assert quality["failed"] == [] and missed_bars(quality["metrics"], quality["bars"]) == []
    size = sum(p.stat().st_size for p in PREBUILT_DIR.rglob("*") if p.is_file())
    assert size < 40 * 2**20, f"the prebuilt world grew to {size / 2**20:.1f} MiB"


@prebuilt
def test_the_prebuilt_world_loads_through_the_library(tmp_path, monkeypatch):
    """With no env var and no local build, ``shapes`` names resolve into the prebuilt world and load."""
    from diffusers import WanPipeline

    from pisces_rl.encoders import load_encoder
    from pisces_rl.ot import NeuralOTMap

    monkeypatch.delenv("PISCES_RL_CACHE", raising=False)
    monkeypatch.setattr(store, "default_cache_dir", lambda: tmp_path / "none")
    assert active_world_dir() == PREBUILT_DIR
    encoder = load_encoder("shapes")
    ot_map = NeuralOTMap.from_pretrained(world_artifact("ot_map"))
    assert ot_map.dim == encoder.embed_dim
    assert isinstance(WanPipeline.from_pretrained(world_artifact("base_model")), WanPipeline)


def test_sharding_keeps_the_tensors_and_loads_with_from_pretrained(tmp_path):
    """export_world splits large weight files; diffusers reads the shards through their index as the single file."""
    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    from pisces_rl.worlds.shapes.store import shard_safetensors

    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False])
    vae.save_pretrained(tmp_path / "vae")
    single = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    before = load_file(str(single))
    shards = shard_safetensors(single, max_bytes=20_000)
    assert len(shards) > 1 and not single.exists()
    index = json.loads((tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    after = {}
    for shard in shards:
        assert (tmp_path / "vae" / shard).stat().st_size < 20_000 + 2 * max(t.numel() * 4 for t in before.values())
        after.update(load_file(str(tmp_path / "vae" / shard)))
    assert set(index["weight_map"]) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    loaded = AutoencoderKLWan.from_pretrained(tmp_path / "vae")
    assert all(torch.equal(p, before[k]) for k, p in loaded.state_dict().items())


def test_the_second_process_progress_becomes_a_bar_of_this_process(tmp_path):
    """The base model trains in a second process whose tqdm bars go to a file; the watcher shows them as one bar."""
    from tqdm import tqdm

    from pisces_rl.worlds.shapes.build import ProgressWatcher

    path = tmp_path / "progress"
    with open(path, "w") as f:
        for desc, total, upto in (("shapes VAE", 40, 40), ("shapes T2V", 300, 120)):
            bar = tqdm(total=total, desc=desc, file=f, mininterval=0, miniters=1)
            for _ in range(upto):
                bar.update(1)
            bar.close()
    watcher = ProgressWatcher(str(path), interval=3600)        # polled by hand below
    try:
        watcher.poll()
        assert watcher.bar is not None and watcher.bar.desc == "base model: T2V"
        assert (watcher.bar.n, watcher.bar.total) == (120, 300)
    finally:
        watcher.stop()
    assert not path.exists()
