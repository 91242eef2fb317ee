"""End-to-end trainer runs on a CUDA device (tiny in-code models; skipped where there is no GPU).

The CPU suite covers the logic; these check that every tensor lands on the accelerator, that bf16 autocast works
through sampling, rewards and updates, and that the OT rewards give the same numbers on GPU as on CPU.
"""
from __future__ import annotations

import json

import pytest
import torch

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMALL = ["train.max_steps=2", "train.prompts_per_step=2", "train.num_generations=2", "train.sample_batch_size=4",
         "train.train_batch_size=2", "sampling.num_inference_steps=3", "sampling.height=16", "sampling.width=16",
         "logging.report_to=none", "data.num_eval_prompts=2", "rewards.encoder=tiny"]


def _lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_grpo_trains_on_cuda(tmp_path, precision, fresh_accelerate_state):
    from pisces_rl.trainer import GRPOTrainer

    cfg = load_config(GRPOConfig, None, [f"output_dir={tmp_path}", *SMALL, f"train.mixed_precision={precision}",
                                         "train.learning_rate=5e-3", "train.epsilon=0.2"])
    trainer = GRPOTrainer(cfg)
    assert trainer.accelerator.device.type == "cuda"
    assert all(p.is_cuda for p in trainer.policy.trainable_parameters())
    before = _lora(trainer)
    metrics = trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith(("train/", "reward/")))
    assert any(not torch.equal(before[k], v) for k, v in _lora(trainer).items()), "no LoRA parameter moved"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and "reward/total" in summary["eval"]


def test_backprop_trains_on_cuda(tmp_path, fresh_accelerate_state):
    from pisces_rl.trainer import BackpropTrainer

    cfg = load_config(BackpropConfig, None, [f"output_dir={tmp_path}", *SMALL, "train.teacher_steps=4",
                                             "train.learning_rate=5e-3", "train.mixed_precision=bf16"])
    trainer = BackpropTrainer(cfg)
    assert trainer.accelerator.device.type == "cuda"
    before = _lora(trainer)
    metrics = trainer.train()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert any(not torch.equal(before[k], v) for k, v in _lora(trainer).items()), "no LoRA parameter moved"


def test_ot_rewards_match_between_cpu_and_cuda():
    from pisces_rl.rewards import build_reward_server

    torch.manual_seed(0)
    videos = torch.rand(3, 5, 3, 32, 32)
    prompts = ["a red circle moving left", "two blue squares", "a green triangle above a red circle"]
    spec = {"weights": {"ot_quality": 1.0, "ot_semantic": 1.0}, "encoder": "tiny"}
    cpu = build_reward_server(spec, device="cpu")(videos, prompts)
    gpu = build_reward_server(spec, device="cuda")(videos.cuda(), prompts)
    assert gpu.names == cpu.names == ["ot_quality", "ot_semantic"]
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-3, atol=1e-4)
