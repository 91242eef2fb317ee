"""A run's output directory (pisces_rl.trainer.run_dir): a second run into a run directory is refused unless it
resumes or overwrites, and a resume refuses a config that changes what the checkpoint means (issue 17)."""
from __future__ import annotations

import json

import pytest

from pisces_rl.config import ConfigError, GRPOConfig, load_config, save_yaml
from pisces_rl.trainer.run_dir import (RUN_FILES, check_output_dir, clear_previous_run, previous_run_files,
                                       resume_mismatches)


def grpo(out, *overrides):
    return load_config(GRPOConfig, None, [f"output_dir={out}", "logging.report_to=none", *overrides])


def fake_checkpoint(run_dir, step, config=None):
    """A checkpoint folder as save_checkpoint leaves it (only what the checks read: trainer_state.json)."""
    path = run_dir / "checkpoints" / f"checkpoint-{step:06d}"
    path.mkdir(parents=True)
    state = {"step": step, **({"config": config.to_dict()} if config is not None else {})}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def test_a_second_run_into_a_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    assert check_output_dir(grpo(out)) is False                          # does not exist yet
    out.mkdir()
    (out / "run.log").write_text("launcher output")                       # not a run's file: still free
    assert check_output_dir(grpo(out)) is False
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        check_output_dir(grpo(out))
    err = info.value
    assert err.key == "output_dir" and "summary.json" in err.message
    assert "checkpoint.resume_from=latest" in err.message and "overwrite_output_dir=true" in err.message
    assert check_output_dir(grpo(out, "checkpoint.resume_from=latest")) is False   # nothing to resume: fine
    assert check_output_dir(grpo(out, "overwrite_output_dir=true")) is True


def test_overwrite_removes_exactly_the_previous_runs_files(tmp_path):
    for name in RUN_FILES[:4]:
        (tmp_path / name).mkdir() if name in ("checkpoints", "lora") else (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints" / "checkpoint-000002").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert previous_run_files(tmp_path) == list(RUN_FILES[:4])
    assert clear_previous_run(tmp_path) == list(RUN_FILES[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_refuses_a_config_that_changes_what_the_checkpoint_means(tmp_path):
    saved = grpo(tmp_path)
    ckpt = fake_checkpoint(tmp_path, 2, saved)
    resume = ["checkpoint.resume_from=latest"]
    assert check_output_dir(grpo(tmp_path, *resume, "train.max_steps=9", "train.learning_rate=1e-3")) is False
    with pytest.raises(ConfigError) as info:
        check_output_dir(grpo(tmp_path, *resume, "model.lora_rank=16", "train.group_size=2",
                              "train.sample_batch_size=2"))
    err = info.value
    assert err.key == "checkpoint.resume_from" and str(ckpt) in err.message
    assert "model.lora_rank: 8 -> 16" in err.message and "train.group_size: 4 -> 2" in err.message
    with pytest.raises(ConfigError, match="model.seed: 0 -> 1"):       # the seed *is* the tiny base model
        check_output_dir(grpo(tmp_path, *resume, "model.seed=1"))
    with pytest.raises(ConfigError, match=r"model.lora_target_modules: \['to_q', 'to_k', 'to_v', 'to_out.0'\]"):
        check_output_dir(grpo(tmp_path, f"checkpoint.resume_from={ckpt}", "model.lora_target_modules=[to_q]"))
    assert check_output_dir(grpo(tmp_path, *resume, "model.lora_target_modules=[to_out.0,to_v,to_k,to_q]")) is False
    with pytest.raises(ConfigError, match="would delete"):
        check_output_dir(grpo(tmp_path, f"checkpoint.resume_from={ckpt}", "overwrite_output_dir=true"))


def test_renamed_group_size_and_configs_written_before_a_field_existed():
    """`train.num_generations` (a rename of group_size) compares as the same key; a key one side lacks is skipped."""
    old = {"model": {"pretrained": "tiny", "lora_rank": 8}, "train": {"num_generations": 4}}
    assert resume_mismatches(old, {"model": {"pretrained": "tiny", "lora_rank": 8, "finetune": "lora"},
                                   "train": {"group_size": 4}}) == []
    assert resume_mismatches(old, {"model": {"pretrained": "tiny", "lora_rank": 8},
                                   "train": {"group_size": 8}}) == [("train.group_size", 4, 8)]


def test_old_checkpoints_are_compared_with_the_run_config_yaml(tmp_path):
    save_yaml(grpo(tmp_path, "model.lora_alpha=16"), tmp_path / "config.yaml")
    fake_checkpoint(tmp_path, 4)                                        # no config in trainer_state.json
    with pytest.raises(ConfigError, match="model.lora_alpha: 16 -> 8"):
        check_output_dir(grpo(tmp_path, "checkpoint.resume_from=latest"))


def test_trainer_refuses_before_building_and_overwrite_starts_over(tmp_path, monkeypatch):
    """End to end on the tiny model: a finished run's checkpoint stores its config; the same output_dir is then
    refused before the policy is built, a resume with another LoRA rank is refused, overwrite starts over."""
    import pisces_rl.trainer.base as base
    from pisces_rl.trainer import GRPOTrainer

    tiny = ["train.max_steps=1", "train.prompts_per_step=1", "train.group_size=2", "train.sample_batch_size=2",
            "train.train_batch_size=2", "sampling.num_inference_steps=2", "sampling.height=16", "sampling.width=16",
            "data.num_eval_prompts=1", "rewards.weights={ot_quality: 1.0}"]
    GRPOTrainer(grpo(tmp_path, *tiny)).train()
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-000001" / "trainer_state.json").read_text())
    assert state["config"]["model"]["lora_rank"] == 8 and state["config"]["output_dir"] == str(tmp_path)

    build = base.build_policy
    monkeypatch.setattr(base, "build_policy", lambda *a, **k: pytest.fail("built before the output_dir check"))
    with pytest.raises(ConfigError, match="output_dir: .* already holds a run"):
        GRPOTrainer(grpo(tmp_path, *tiny))
    with pytest.raises(ConfigError, match="model.lora_rank: 8 -> 4"):
        GRPOTrainer(grpo(tmp_path, *tiny, "checkpoint.resume_from=latest", "model.lora_rank=4"))
    monkeypatch.setattr(base, "build_policy", build)
    (tmp_path / "checkpoints" / "checkpoint-000001" / "marker").write_text("old run")
    GRPOTrainer(grpo(tmp_path, *tiny, "overwrite_output_dir=true", "train.max_steps=1")).train()
    assert not (tmp_path / "checkpoints" / "checkpoint-000001" / "marker").exists()   # a fresh checkpoint
    assert (tmp_path / "summary.json").exists()
