"""model.finetune=full through the trainers on the tiny Wan model (single CPU process); 2 processes under
ZeRO-3 are in test_accel.py."""
from __future__ import annotations

import os

import pytest
import torch

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
from pisces_rl.trainer import BackpropTrainer, GRPOTrainer

TINY = ["train.prompts_per_step=1", "train.group_size=2", "train.sample_batch_size=2", "train.train_batch_size=2",
        "sampling.num_inference_steps=3", "sampling.num_frames=5", "sampling.height=16", "sampling.width=16",
        "logging.report_to=none", "data.num_eval_prompts=1", "model.finetune=full"]


def brightness(videos, prompts, **kwargs):
    """Mean pixel value, [B, F, C, H, W] -> [B]; differentiable, so it also drives direct backprop."""
    return videos.mean(dim=(1, 2, 3, 4))


brightness.differentiable = True


def grpo(out, *overrides):
    cfg = load_config(GRPOConfig, None, [f"output_dir={out}", "train.learning_rate=1e-3", "train.clip_range=0.2",
                                         *TINY, *overrides])
    return GRPOTrainer(cfg, rewards={"b": brightness})


def weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_grpo_step_with_full_finetune_moves_base_weights_and_keeps_the_reference(tmp_path):
    from diffusers import WanTransformer3DModel

    trainer = grpo(tmp_path, "train.max_steps=1", "train.kl_beta=0.1")
    before, reference = weights(trainer.policy.transformer), weights(trainer.policy.reference)
    metrics = trainer.train()
    after = weights(trainer.policy.transformer)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > 0.9 * len(before), f"only {len(moved)} of {len(before)} denoiser weights moved"
    assert any("blocks.0.attn1.to_q.weight" == k for k in moved)              # a base weight LoRA never touches
    assert all(torch.equal(v, trainer.policy.reference.state_dict()[k]) for k, v in reference.items())
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-12)              # step 0: policy == reference
    assert metrics["train/update_ratio"] > 0
    saved = WanTransformer3DModel.from_pretrained(str(tmp_path / "transformer")).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in after.items())
    assert not (tmp_path / "lora").exists()
    assert os.path.isdir(tmp_path / "checkpoints" / "checkpoint-000001" / "transformer")


def test_full_finetune_resume_continues_exactly(tmp_path):
    """2 + 2 steps with a checkpoint in between equal 4 straight steps (as the LoRA resume test)."""
    straight = grpo(tmp_path / "a", "train.max_steps=4", "train.kl_beta=0.05")
    straight.train()
    grpo(tmp_path / "b", "train.max_steps=2", "train.kl_beta=0.05").train()
    second = grpo(tmp_path / "b", "train.max_steps=4", "train.kl_beta=0.05", "checkpoint.resume_from=latest")
    second.train()
    assert second.step == 4
    a, b = weights(straight.policy.transformer), weights(second.policy.transformer)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(torch.tensor(straight.history["train/update_ratio"]),
                               torch.tensor(second.history["train/update_ratio"]), rtol=1e-5, atol=0)


def test_backprop_step_with_full_finetune_and_ema_target(tmp_path):
    from diffusers import WanTransformer3DModel

    cfg = load_config(BackpropConfig, None, [f"output_dir={tmp_path}", "train.max_steps=1", "train.teacher_steps=4",
                                             "train.cd_target=ema", "train.learning_rate=1e-3", *TINY])
    trainer = BackpropTrainer(cfg, rewards={"b": brightness})
    before = weights(trainer.policy.transformer)
    metrics = trainer.train()
    after = weights(trainer.policy.transformer)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 0.9 * len(before)
    assert metrics["train/cd_loss"] >= 0 and metrics["train/update_ratio"] > 0
    ema = WanTransformer3DModel.from_pretrained(str(tmp_path / "lora_ema")).state_dict()   # the EMA denoiser
    expected = {k: 0.95 * before[k] + 0.05 * after[k] for k in before}                     # one EMA update
    for k in before:
        torch.testing.assert_close(ema[k], expected[k], rtol=0, atol=1e-6, msg=k)
