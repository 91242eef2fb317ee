"""The recipes as users run them: `accelerate launch recipes/<recipe>.py --config ... key=value`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from _launch import ROOT, accelerate_launch

TINY = ["train.max_steps=1", "train.prompts_per_step=2", "train.num_generations=2", "train.sample_batch_size=2",
        "train.train_batch_size=2", "sampling.num_inference_steps=3", "sampling.height=16", "sampling.width=16",
        "logging.report_to=none", "data.num_eval_prompts=1"]


def lora_tensors(run_dir):
    files = list((run_dir / "lora").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def test_short_video_recipe_single_process(tmp_path):
    proc = accelerate_launch("single", ROOT / "recipes" / "grpo_short_video.py",
                             ["--config", "recipes/configs/grpo_tiny_cpu.yaml", *TINY, "logging.report_to=tensorboard",
                              f"output_dir={tmp_path}"], num_processes=1)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["num_processes"] == 1
    assert "reward/ot_quality/mean" in summary["metrics"] and "reward/ot_semantic/mean" in summary["metrics"]
    assert (tmp_path / "config.yaml").exists() and list((tmp_path / "samples").glob("final.gif"))
    assert list((tmp_path / "checkpoints").glob("checkpoint-000001"))
    assert list(tmp_path.rglob("events.out.tfevents*")), "no tensorboard log written"
    assert lora_tensors(tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_long_video_recipe_two_processes_deepspeed(tmp_path, stage):
    args = ["--config", "recipes/configs/grpo_long_video_tiny_cpu.yaml", *TINY, "sampling.num_frames=9",
            "rewards.num_frames=2", f"output_dir={tmp_path}"]
    proc = accelerate_launch(f"zero{stage}", ROOT / "recipes" / "grpo_long_video.py", args, num_processes=2,
                             timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["zero_stage"] == stage
    assert summary["batch"]["prompts_per_process"] == 1
    lora = lora_tensors(tmp_path)
    assert lora and all(t.numel() > 0 for t in lora.values()), "LoRA weights saved incomplete (ZeRO-3 shards?)"
    rank = 8  # ModelConfig default
    assert all(rank in t.shape for t in lora.values())


def test_recipe_help_and_bad_key():
    script = str(ROOT / "recipes" / "grpo_short_video.py")
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert helped.returncode == 0 and "train.max_steps" in helped.stdout
    bad = subprocess.run([sys.executable, script, "--config", "recipes/configs/grpo_tiny_cpu.yaml",
                          "train.max_step=2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "train.max_steps" in bad.stderr
