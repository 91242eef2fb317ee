"""Atomic checkpoints: exact resume through accelerate, crash leftovers, keep-last pruning, errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from pisces_rl.trainer.accel import build_accelerator
from pisces_rl.trainer.checkpoint import (STATE_FILE, config_hash, find_checkpoint, list_checkpoints,
                                          load_checkpoint, save_checkpoint)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _restart():
    """Forget the accelerator, as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_run(tmp_path):
    torch.manual_seed(0)                                    # same "pretrained" frozen layer every run
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)                          # frozen base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    acc = build_accelerator(project_dir=str(tmp_path))
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    model.train()
    return acc, model, opt, sched


def train_step(acc, model, opt, sched):
    x = torch.randn(5, 4).to(acc.device)                    # global RNG: resuming must restore it
    acc.backward(model(x).pow(2).mean())                    # dropout draws from the RNG too
    opt.step()
    sched.step()
    opt.zero_grad()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    acc, model, opt, sched = make_run(tmp_path / "a")
    for _ in range(4):
        train_step(acc, model, opt, sched)
    uninterrupted = params(model)

    _restart()
    acc, model, opt, sched = make_run(tmp_path / "b")
    for _ in range(2):
        train_step(acc, model, opt, sched)
    path = save_checkpoint(acc, tmp_path / "b", 2, models=[model], extra_state={"sampler": {"epoch": 1, "index": 3}},
                           keep_last=2)
    train_step(acc, model, opt, sched)                      # work lost in a "crash"

    _restart()
    torch.manual_seed(12345)                                # the new process starts from other RNG states
    acc, model, opt, sched = make_run(tmp_path / "b")
    state = load_checkpoint(acc, find_checkpoint(tmp_path / "b", "latest"))
    assert state["step"] == 2 and state["sampler"] == {"epoch": 1, "index": 3}
    assert sched.last_epoch == 2
    for _ in range(2):
        train_step(acc, model, opt, sched)
    resumed = params(model)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k

    # frozen parameters were left out of the checkpoint; the trainable ones and trainer state are there
    assert sorted(load_file(os.path.join(path, "model.safetensors"))) == ["3.bias", "3.weight"]
    info = json.load(open(os.path.join(path, STATE_FILE)))["checkpoint_info"]
    assert info["frozen_weights_saved"] is False and info["num_processes"] == 1


def test_save_frozen_keeps_every_weight(tmp_path):
    acc, model, opt, sched = make_run(tmp_path)
    path = save_checkpoint(acc, tmp_path, 1, save_frozen=True)
    assert sorted(load_file(os.path.join(path, "model.safetensors"))) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    load_checkpoint(acc, path)                              # strict load works


def test_interrupted_write_is_ignored_then_cleaned(tmp_path):
    acc, model, opt, sched = make_run(tmp_path)
    first = save_checkpoint(acc, tmp_path, 1)
    root = tmp_path / "checkpoints"
    crashed = root / ".tmp-step-000002"                     # a save that died half-way
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    no_state = root / "checkpoint-000009"                   # copied by hand, no trainer_state.json
    no_state.mkdir()
    assert find_checkpoint(tmp_path, "latest") == first
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(crashed))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(acc, no_state)
    third = save_checkpoint(acc, tmp_path, 3)
    assert not crashed.exists()                             # stale .tmp removed by the next save
    assert find_checkpoint(tmp_path, "latest") == third
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


def test_keep_last_prunes_only_old_checkpoints(tmp_path):
    acc, model, opt, sched = make_run(tmp_path)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    (root / "best").mkdir()
    for step in (1, 2, 3, 4):
        save_checkpoint(acc, tmp_path, step, keep_last=2, lora_saver=lambda d: open(os.path.join(d, "w.bin"), "w").close())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert (root / "notes.txt").read_text() == "keep me" and (root / "best").is_dir()
    assert (root / "checkpoint-000004" / "lora" / "w.bin").is_file()
    # re-saving an older step after a resume: the one just written always survives
    save_checkpoint(acc, tmp_path, 2, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    # keep_last=0 keeps everything; re-saving an existing step replaces it
    save_checkpoint(acc, tmp_path, 4, keep_last=0, extra_state={"note": "again"})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert json.load(open(root / "checkpoint-000004" / STATE_FILE))["note"] == "again"


def test_find_checkpoint_resolution_and_errors(tmp_path):
    assert find_checkpoint(tmp_path, None) is None
    with pytest.warns(UserWarning, match="starting from scratch"):
        assert find_checkpoint(tmp_path, "latest") is None
    with pytest.raises(FileNotFoundError, match="'latest'"):
        find_checkpoint(tmp_path, str(tmp_path / "nope"))
    acc, model, opt, sched = make_run(tmp_path)
    path = save_checkpoint(acc, tmp_path, 5)
    assert find_checkpoint(tmp_path, "checkpoint-000005") == path   # a name inside output_dir/checkpoints
    assert find_checkpoint(tmp_path, path) == path


def test_bad_arguments_raise_before_writing(tmp_path):
    acc, model, opt, sched = make_run(tmp_path)
    with pytest.raises(TypeError, match=r"extra_state\['bad'\]"):
        save_checkpoint(acc, tmp_path, 1, extra_state={"bad": torch.ones(2)})
    with pytest.raises(ValueError, match="disagrees"):
        save_checkpoint(acc, tmp_path, 1, extra_state={"step": 2})
    with pytest.raises(ValueError, match="not prepared"):
        save_checkpoint(acc, tmp_path, 1, models=[torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(acc, tmp_path, 1, keep_last=-1)
    assert not (tmp_path / "checkpoints").exists()


def test_weights_dir_names_the_trained_weights_folder(tmp_path):
    acc, model, _, _ = make_run(tmp_path)
    seen = []
    path = save_checkpoint(acc, tmp_path, 1, models=[model], lora_saver=seen.append, weights_dir="transformer")
    assert len(seen) == 1 and os.path.basename(seen[0]) == "transformer"       # written inside the .tmp folder
    assert os.path.isdir(os.path.join(path, "transformer"))                     # ... that became the checkpoint
    assert not os.path.exists(os.path.join(path, "lora"))
    for bad in ("", "../x", ".hidden", os.path.join("a", "b")):
        with pytest.raises(ValueError, match="weights_dir"):
            save_checkpoint(acc, tmp_path, 2, models=[model], lora_saver=seen.append, weights_dir=bad)


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": {"c": [1, 2]}}) == config_hash({"b": {"c": [1, 2]}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
