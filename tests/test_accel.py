"""Accelerate set-up, shipped launch configs, tracking artefacts, and 2-process CPU runs (DDP, ZeRO-2, ZeRO-3)."""
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from _launch import accelerate_launch
from pisces_rl.trainer.accel import (_fill_deepspeed_config, build_accelerator, gather_full_state_dict,
                                     gather_lora_state_dict, gradient_sync, is_deepspeed, zero_stage)
from pisces_rl.trainer.tracking import (flatten_config, format_summary, init_trackers, plot_curve, save_video,
                                        save_video_grid)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ----------------------------------------------------------------------------- launch configs
EXPECTED = {
    "single": ("NO", 1, None),
    "ddp": ("MULTI_GPU", 8, None),
    "zero2": ("DEEPSPEED", 8, 2),
    "zero3": ("DEEPSPEED", 8, 3),
    "multinode_example": ("DEEPSPEED", 16, 2),
}


def test_every_shipped_config_is_checked():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_loads_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and f"accelerate launch --config_file recipes/accelerate/{name}.yaml" in text
    assert "On CPU" in text or "on CPU" in text
    cfg = load_config_from_file(str(path))
    kind, procs, stage = EXPECTED[name]
    assert str(cfg.distributed_type).endswith(kind) and cfg.num_processes == procs
    assert cfg.use_cpu is False and cfg.mixed_precision == "no"
    raw = yaml.safe_load(text)
    if stage is None:
        assert not cfg.deepspeed_config
    else:
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == stage and ds["offload_optimizer_device"] == "none"
        assert ds["offload_param_device"] == "none" and ds["gradient_clipping"] == 1.0
        assert ds["gradient_accumulation_steps"] == 1
        assert "do not set accelerate_use_cpu=1" in text.lower()     # it would silently drop DeepSpeed
    if name == "multinode_example":
        assert raw["num_machines"] == 2 and raw["machine_rank"] == 0
        assert raw["main_process_ip"] and raw["main_process_port"] == 29500


# ----------------------------------------------------------------------------- accelerator
def test_build_accelerator_single_process(tmp_path):
    acc = build_accelerator(project_dir=str(tmp_path))
    assert acc.num_processes == 1 and not is_deepspeed(acc) and zero_stage(acc) == 0
    assert acc.logging_dir == os.path.join(str(tmp_path), "logs")
    with pytest.raises(ValueError, match="mixed_precision"):
        build_accelerator(mixed_precision="fp8")


def test_deepspeed_with_cpu_flag_is_rejected(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ValueError, match="Unset ACCELERATE_USE_CPU"):
        build_accelerator()


def test_deepspeed_auto_fields_are_filled_but_explicit_values_kept():
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    _fill_deepspeed_config(cfg, micro_batch=4, accumulation=3, max_grad_norm=0.5)
    assert cfg == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "gradient_clipping": 0.5}
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    _fill_deepspeed_config(cfg, micro_batch=4, accumulation=3, max_grad_norm=0.5)
    assert cfg == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    cfg = {}
    _fill_deepspeed_config(cfg, micro_batch=1, accumulation=1, max_grad_norm=None)
    assert cfg == {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


def _lora_like():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    return model


def test_gather_lora_state_dict_single_process():
    acc = build_accelerator()
    model = acc.prepare(_lora_like())
    state = gather_lora_state_dict(acc, model)
    assert sorted(state) == ["1.bias", "1.weight"]          # trainable only
    assert state["1.weight"].device.type == "cpu"            # gathered to the host, wherever training runs
    assert torch.equal(state["1.weight"], model[1].weight.detach().cpu())
    state["1.weight"].add_(1.0)                              # a copy, not a view
    assert not torch.equal(state["1.weight"], model[1].weight.detach().cpu())


def test_gather_lora_state_dict_uses_peft_for_peft_models(monkeypatch):
    calls = []

    def fake_peft_state_dict(module):
        calls.append(module)
        return {"lora_B.weight": module[1].weight}

    monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(get_peft_model_state_dict=fake_peft_state_dict))
    acc = build_accelerator()
    model = _lora_like()
    model.peft_config = {"default": object()}
    state = gather_lora_state_dict(acc, acc.prepare(model))
    assert list(state) == ["lora_B.weight"] and calls == [model]
    with pytest.raises(ValueError, match="frozen parameters"):
        gather_lora_state_dict(acc, model, state_dict_fn=lambda m: {"x": torch.empty(0)})


def test_gather_full_state_dict_single_process_matches_state_dict_in_small_buckets():
    class WithBuffers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _lora_like()
            self.register_buffer("running", torch.arange(3.0))                  # persistent: saved
            self.register_buffer("table", torch.ones(2), persistent=False)      # non-persistent: not saved

    acc = build_accelerator()
    module = WithBuffers()
    model = acc.prepare(module)
    state = gather_full_state_dict(acc, model, bucket_numel=5)                 # buckets smaller than a weight
    expected = module.state_dict()
    assert state.keys() == expected.keys() and "table" not in state and "body.0.weight" in state  # frozen too
    assert all(torch.equal(state[k], v) and state[k].device.type == "cpu" for k, v in expected.items())
    state["running"].add_(1.0)                                                  # copies, not views
    assert torch.equal(module.running, torch.arange(3.0))


def test_gradient_sync_sets_and_restores_the_boundary_flag():
    acc = build_accelerator()
    model = acc.prepare(_lora_like())
    assert acc.sync_gradients
    with gradient_sync(acc, model, sync=False):
        assert not acc.sync_gradients
    assert acc.sync_gradients
    with gradient_sync(acc, model, sync=True):
        assert acc.sync_gradients


# ----------------------------------------------------------------------------- tracking
def test_init_trackers_tensorboard_writes_events_and_config(tmp_path):
    acc = build_accelerator(project_dir=str(tmp_path))
    trackers = init_trackers(acc, "tiny", {"train": {"lr": 1e-4, "betas": [0.9, 0.99]}, "seed": 3}, "tensorboard")
    assert [t.name for t in trackers] == ["tensorboard"]
    acc.log({"reward/total/mean": 0.5}, step=1)
    acc.end_training()
    run_dir = tmp_path / "logs" / "tiny"
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.rglob("*"))
    hparams = yaml.safe_load(next(run_dir.rglob("hparams.yml")).read_text())
    assert hparams["train.lr"] == 1e-4 and hparams["train.betas"] == "[0.9, 0.99]"


def test_init_trackers_reuses_trackers_given_to_build_accelerator(tmp_path):
    acc = build_accelerator(log_with="tensorboard", project_dir=str(tmp_path))
    trackers = init_trackers(acc, "tiny", {"a": 1}, "tensorboard")
    assert [t.name for t in trackers] == ["tensorboard"]
    acc.end_training()


def test_init_trackers_none_and_errors(tmp_path):
    acc = build_accelerator(project_dir=str(tmp_path))
    assert init_trackers(acc, "x", {}, "none") == [] and init_trackers(acc, "x", {}, None) == []
    with pytest.raises(ValueError, match="report_to must be one of"):
        init_trackers(acc, "x", {}, "mlflow")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ImportError, match="pip install wandb"):
            init_trackers(acc, "x", {}, "wandb")


def test_init_trackers_needs_a_log_dir_for_tensorboard():
    acc = build_accelerator()
    with pytest.raises(ValueError, match="project_dir"):
        init_trackers(acc, "x", {}, "tensorboard")


def test_flatten_config():
    assert flatten_config({"a": {"b": 1, "c": {"d": None}}, "e": (1, 2)}) == {"a.b": 1, "a.c.d": "None", "e": "(1, 2)"}


def test_save_video_gif(tmp_path):
    frames = torch.zeros(3, 3, 6, 8)
    frames[0] = 0.5
    frames[1, 0] = 1.0                                       # red
    frames[2] = 2.0                                          # out of range -> clipped to white
    path = save_video(frames, tmp_path / "sub" / "v.gif", fps=4)
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.size == (8, 6)
        im.seek(0)
        assert im.convert("RGB").getpixel((0, 0)) == (128, 128, 128)
        im.seek(1)
        assert im.convert("RGB").getpixel((3, 3)) == (255, 0, 0)
        im.seek(2)
        assert im.convert("RGB").getpixel((7, 5)) == (255, 255, 255)
    save_video(torch.rand(2, 1, 4, 4), tmp_path / "grey.gif")   # single channel is fine
    with pytest.raises(ValueError, match=r"\[F, C, H, W\]"):
        save_video(torch.rand(2, 4, 4), tmp_path / "bad.gif")
    with pytest.raises(ValueError, match="NaN"):
        save_video(torch.full((1, 3, 2, 2), float("nan")), tmp_path / "nan.gif")
    with pytest.raises(ValueError, match=".gif or .mp4"):
        save_video(frames, tmp_path / "v.avi")


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is not None, reason="imageio-ffmpeg is installed")
def test_save_video_mp4_without_ffmpeg_suggests_gif(tmp_path):
    with pytest.raises(ImportError, match="gif"):
        save_video(torch.rand(2, 3, 4, 4), tmp_path / "v.mp4")


def test_save_video_grid_layout(tmp_path):
    videos = torch.stack([torch.full((2, 3, 4, 5), v) for v in (0.0, 0.2, 0.6)])   # [B=3, F, C, H, W]
    videos[:, 1] += 0.2                                      # distinct frames (Pillow merges identical ones)
    path = save_video_grid(videos, tmp_path / "grid.gif", nrow=2, padding=1, pad_value=1.0)
    with Image.open(path) as im:
        # 2 rows x 2 columns of 4x5 tiles with 1-pixel padding: (2*5+3) x (2*4+3)
        assert im.size == (13, 11) and im.n_frames == 2
        rgb = np.asarray(im.convert("RGB"))
    assert tuple(rgb[0, 0]) == (255, 255, 255)               # padding
    assert tuple(rgb[1, 1]) == (0, 0, 0)                     # video 0, top left
    assert tuple(rgb[1, 7]) == (51, 51, 51)                  # video 1, top right
    assert tuple(rgb[6, 1]) == (153, 153, 153)               # video 2, second row
    assert tuple(rgb[6, 7]) == (255, 255, 255)               # empty fourth cell
    with pytest.raises(ValueError, match="one shape"):
        save_video_grid([torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4)], tmp_path / "x.gif")


def test_plot_curve_png(tmp_path):
    path = plot_curve({"reward/total/mean": [0.1, 0.3, 0.2], "train/loss": [1.0, 0.5, 0.25]},
                      tmp_path / "curves.png", title="tiny")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] / 2      # two stacked panels
    with pytest.raises(ValueError, match="non-empty series"):
        plot_curve({"a": []}, tmp_path / "empty.png")


def test_format_summary_flat_and_nested():
    flat = format_summary({"reward/total/mean": 0.61234, "steps": 3, "lr": 1e-6}, title="Final")
    lines = flat.splitlines()
    assert lines[0] == "Final" and "0.6123" in flat and "1e-06" in flat and " 3" in flat
    assert len({len(line) for line in lines[1:]}) == 1                  # aligned columns
    nested = format_summary({"Total": {"before": 80.44, "after": 82.75}, "Quality": {"before": 82.2}})
    assert "before" in nested and "after" in nested
    quality = next(line for line in nested.splitlines() if line.startswith("Quality"))
    assert quality.split() == ["Quality", "82.2000", "-"]
    assert "no metrics" in format_summary({})


# ----------------------------------------------------------------------------- 2 CPU processes
@pytest.mark.distributed
@pytest.mark.parametrize("config, kind, stage", [("zero2", "DEEPSPEED", 2), ("zero3", "DEEPSPEED", 3),
                                                 ("ddp", "MULTI_CPU", 0)])
def test_two_processes_train_checkpoint_and_resume(tmp_path, config, kind, stage):
    """2 CPU processes: hand-accumulated steps match a 1-process replay, checkpoint + resume are exact.

    No ACCELERATE_USE_CPU: build_accelerator must make both processes cooperate on its own
    (gloo for DeepSpeed, CPU DDP otherwise).
    """
    if stage and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    proc = accelerate_launch(config, ROOT / "tests" / "_accel_worker.py", [str(tmp_path)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2
    assert result["distributed_type"].endswith(kind) and result["zero_stage"] == stage
    assert result["max_diff_vs_reference"] < 1e-5 and result["ranks_equal"]
    assert result["restored_equals_saved"] and result["lora_file_equals_saved"]
    assert result["resume_exact"] and result["third_step_moved"]
    assert result["lora_shapes"] == {"0.lora_A": [2, 6], "0.lora_B": [8, 2], "2.lora_A": [2, 8], "2.lora_B": [3, 2]}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-000002"]


@pytest.mark.distributed
def test_full_finetune_under_zero3_two_processes_resumes_exactly(tmp_path):
    """model.finetune=full, 2 CPU processes, ZeRO-3: 2 + 2 steps with a resume equal 4 straight steps, the saved
    denoiser loads with from_pretrained, and train/update_ratio is exact on partitioned weights (full and LoRA)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    proc = accelerate_launch("zero3", ROOT / "tests" / "_full_ft_worker.py", [str(tmp_path)], timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["num_processes"] == 2 and r["zero_stage"] == 3
    assert r["keys_equal"] and r["no_lora_dir"] and r["moved_from_base"] > 0.9
    assert r["max_diff_resume"] < 1e-6, r["max_diff_resume"]
    assert len(r["ratios_a"]) == len(r["ratios_b"]) == 4 and all(x > 0 for x in r["ratios_a"])
    np.testing.assert_allclose(r["ratios_a"], r["ratios_b"], rtol=1e-5)
    assert abs(r["full_ratio"] - 0.01) < 1e-6 and r["full_ratio_ranks_equal"]
    assert r["lora_ratio"] == pytest.approx(r["lora_expected"], rel=1e-6) and r["lora_expected"] > 0
    assert any(name.endswith(".safetensors") for name in r["checkpoint_weights"])
