"""Pre-flight input checks (pisces_rl.config.inputs): every input path a run reads is checked before anything is
built, and the error names the config key and the fix (issue 17: prompt-file errors used to arrive after the
model, a missing OT map passed because it looked like a hub id)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pisces_rl.config import BackpropConfig, ConfigError, GRPOConfig, load_config
from pisces_rl.config.inputs import check_inputs, looks_like_hub_id

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(  # absolute, so that subprocesses may run in another folder
    str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)}


def grpo(*overrides):
    return load_config(GRPOConfig, None, ["logging.report_to=none", *overrides])


def problem(cfg, **parts) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_inputs(cfg, **parts)
    return info.value


def test_prompt_file_problems_name_the_key_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    (tmp_path / "table.csv").write_text("caption,id\na red circle moving left,1\n")
    err = problem(grpo("data.prompts=missing.txt"))
    assert err.key == "data.prompts" and "not found" in err.message and "builtin:tiny" in err.message
    err = problem(grpo("data.prompts=empty.txt"))
    assert err.key == "data.prompts" and "holds no prompts" in err.message
    err = problem(grpo("data.prompts=table.csv"))
    assert err.key == "data.prompt_column" and "Columns: caption, id" in err.message
    check_inputs(grpo("data.prompts=table.csv", "data.prompt_column=caption"))     # the fix works
    err = problem(grpo("data.eval_source=nowhere.jsonl"))
    assert err.key == "data.eval_source"
    check_inputs(grpo("data.eval_source=nowhere.jsonl", "data.eval_prompts=[a red circle]"))  # unused: fine
    check_inputs(grpo("data.prompts=missing.txt"), data=False)                     # a prompt list replaces it
    backprop = load_config(BackpropConfig, None, ["data.prompts=missing.txt", "train.latent_source=dataset"])
    check_inputs(backprop)                         # dataset latents: captions come from the videos, not the file


def test_ot_map_must_be_a_local_map_directory_even_when_it_looks_like_a_hub_id(tmp_path, monkeypatch):
    from pisces_rl.ot import NeuralOTMap

    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("runs/ot_map_blip")               # the shipped Wan configs' default path
    err = problem(grpo("rewards.ot_map=runs/ot_map_blip"))
    assert err.key == "rewards.ot_map" and "fit-ot-map --output runs/ot_map_blip" in err.message
    check_inputs(grpo("rewards.ot_map=runs/ot_map_blip", "rewards.weights={ot_semantic: 1.0}"))  # map unused
    check_inputs(grpo("rewards.ot_map=runs/ot_map_blip", "rewards.use_ot=false"))
    NeuralOTMap(dim=8, hidden=16).save_pretrained(tmp_path / "runs" / "ot_map_blip")
    check_inputs(grpo("rewards.ot_map=runs/ot_map_blip"))
    (tmp_path / "runs" / "ot_map_blip" / "model.safetensors").unlink()
    assert "has no model.safetensors" in problem(grpo("rewards.ot_map=runs/ot_map_blip")).message
    (tmp_path / "notamap").mkdir()
    (tmp_path / "notamap" / "config.json").write_text('{"hidden": 3}')
    (tmp_path / "notamap" / "model.safetensors").write_bytes(b"")
    assert "names no map_type" in problem(grpo("rewards.ot_map=notamap")).message


def test_encoder_pipeline_and_lora_directories_need_their_files(tmp_path, monkeypatch):
    from pisces_rl.encoders import BlipVideoTextEncoder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    err = problem(grpo("rewards.encoder=empty"))
    assert err.key == "rewards.encoder" and "has no config.json" in err.message
    BlipVideoTextEncoder.tiny(seed=0).save_pretrained(tmp_path / "enc")
    check_inputs(grpo("rewards.encoder=enc"))
    (tmp_path / "enc" / "model.safetensors").unlink()
    assert "model.safetensors, pytorch_model.bin" in problem(grpo("rewards.encoder=enc")).message
    check_inputs(grpo("rewards.encoder=enc", "rewards.weights={tests_missing_mod:fn: 1.0}"), rewards=False)

    err = problem(grpo("model.pretrained=empty"))
    assert err.key == "model.pretrained" and "model_index.json" in err.message

    err = problem(grpo("model.lora_path=someone/lora"))       # a LoRA is never downloaded
    assert err.key == "model.lora_path" and "read from disk" in err.message
    assert "holds no LoRA weights" in problem(grpo("model.lora_path=empty")).message
    (tmp_path / "empty" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    check_inputs(grpo("model.lora_path=empty"))


def _fake_hub_cache(cache: Path, repo_id: str) -> Path:
    """The Hugging Face cache layout of one snapshot: models--org--name/{refs/main, snapshots/<commit>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_hub_ids_are_checked_against_the_cache_when_offline(tmp_path, monkeypatch):
    """model.pretrained and rewards.encoder may be hub ids: accepted when cached, a clear error when offline and
    not cached; an encoder hub id then loads from the cache (load_encoder resolves it)."""
    from huggingface_hub import constants

    from pisces_rl.encoders import BlipVideoTextEncoder, load_encoder

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    err = problem(grpo("model.pretrained=org-x/not-cached"))
    assert err.key == "model.pretrained" and "HF_HUB_OFFLINE" in err.message
    assert "hf download org-x/not-cached --local-dir DIR" in err.message
    (_fake_hub_cache(cache, "org-x/pipe") / "model_index.json").write_text("{}")
    check_inputs(grpo("model.pretrained=org-x/pipe"))

    assert problem(grpo("rewards.encoder=org-x/blip")).key == "rewards.encoder"
    BlipVideoTextEncoder.tiny(seed=3).save_pretrained(_fake_hub_cache(cache, "org-x/blip"))
    check_inputs(grpo("rewards.encoder=org-x/blip"))
    loaded, direct = load_encoder("org-x/blip"), BlipVideoTextEncoder.tiny(seed=3)
    assert loaded.embed_dim == direct.embed_dim
    sd, ref = loaded.model.state_dict(), direct.model.state_dict()
    assert all(sd[k].equal(ref[k]) for k in ref)


def test_shapes_names_say_to_build_the_world(tmp_path, monkeypatch):
    monkeypatch.setenv("PISCES_RL_CACHE", str(tmp_path))
    for key, value in (("model.pretrained", "shapes"), ("rewards.encoder", "shapes"), ("rewards.ot_map", "shapes:l2")):
        err = problem(grpo(f"{key}={value}"))
        assert err.key == key and "make world" in err.message, err


def test_reward_import_paths_judge_and_video_dataset(tmp_path, monkeypatch):
    import datasets
    import numpy as np

    monkeypatch.chdir(tmp_path)
    err = problem(grpo("rewards.weights={tests_missing_mod:fn: 1.0}"))
    assert err.key == "rewards.weights.tests_missing_mod:fn" and "cannot import module" in err.message
    err = problem(grpo("logging.judge=tests_missing_mod:judge"))
    assert err.key == "logging.judge"
    check_inputs(grpo("logging.judge=pisces_rl.trainer.evaluation:shapesbench_judge"))

    base = ["train.latent_source=dataset", "sampling.num_frames=5"]
    (tmp_path / "folder").mkdir()
    err = problem(load_config(BackpropConfig, None, [*base, "train.video_dataset=folder"]))
    assert err.key == "train.video_dataset" and "save_to_disk" in err.message
    video = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    datasets.Dataset.from_dict({"video": [video], "text": ["a red circle"]}).save_to_disk(str(tmp_path / "clips"))
    err = problem(load_config(BackpropConfig, None, [*base, "train.video_dataset=clips"]))
    assert err.key == "train.caption_column" and "columns: video, text" in err.message
    check_inputs(load_config(BackpropConfig, None, [*base, "train.video_dataset=clips", "train.caption_column=text"]))


def test_trainer_checks_before_building_anything(tmp_path, monkeypatch):
    """GRPOTrainer(config) with a missing OT map stops before the policy is built."""
    import pisces_rl.trainer.base as base
    from pisces_rl.trainer import GRPOTrainer

    def no_build(*args, **kwargs):
        raise AssertionError("the policy was built before the inputs were checked")

    monkeypatch.setattr(base, "build_policy", no_build)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="rewards.ot_map: 'runs/missing_map'"):
        GRPOTrainer(grpo(f"output_dir={tmp_path / 'run'}", "rewards.ot_map=runs/missing_map"))


def test_recipe_prints_one_line_and_exits_2_with_traceback_only_under_debug(tmp_path):
    script = str(ROOT / "recipes" / "grpo_short_video.py")
    args = [sys.executable, script, "--config", str(ROOT / "recipes/configs/grpo_tiny_cpu.yaml"),
            "data.prompts=missing.txt", f"output_dir={tmp_path / 'run'}"]
    plain = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]             # exactly one line
    assert plain.stderr.startswith("error: data.prompts: prompt file 'missing.txt' not found")
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "error: data.prompts:" in debug.stderr
    assert not (tmp_path / "run").exists()                                          # nothing was written
