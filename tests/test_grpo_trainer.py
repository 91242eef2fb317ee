"""End-to-end GRPO trainer tests on the tiny in-code Wan model (single CPU process)."""
from __future__ import annotations

import os

import pytest
import torch

from pisces_rl.config import GRPOConfig, load_config
from pisces_rl.trainer import GRPOTrainer


def mean_brightness(videos, prompts, **kwargs):
    """A cheap differentiable user reward: mean pixel value per video, [B, F, C, H, W] -> [B]."""
    return videos.mean(dim=(1, 2, 3, 4))


def tiny_config(tmp_path, *overrides):
    base = [
        f"output_dir={tmp_path}",
        "train.max_steps=2",
        "train.prompts_per_step=1",
        "train.num_generations=2",
        "train.sample_batch_size=2",
        "train.train_batch_size=2",
        "train.learning_rate=5e-3",
        "train.epsilon=0.2",
        "sampling.num_inference_steps=3",
        "sampling.num_frames=5",
        "sampling.height=16",
        "sampling.width=16",
        "logging.report_to=none",
    ]
    return load_config(GRPOConfig, None, [*base, *overrides])


def lora_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad}


def base_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters() if not p.requires_grad}


def test_lora_params_change_and_base_params_do_not(tmp_path):
    trainer = GRPOTrainer(tiny_config(tmp_path), rewards={"brightness": mean_brightness})
    lora0, base0 = lora_state(trainer), base_state(trainer)
    assert lora0 and base0
    metrics = trainer.train()
    lora1, base1 = lora_state(trainer), base_state(trainer)
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0), "no LoRA parameter moved"
    assert all(torch.equal(base0[k], base1[k]) for k in base0), "a frozen base parameter moved"
    for key in ("train/loss", "train/clipfrac", "train/approx_kl", "reward/brightness/mean", "reward/total/mean",
                "time/step_s"):
        assert key in metrics, key
    assert os.path.isdir(tmp_path / "lora")
    assert list((tmp_path / "samples").glob("final.*"))


def test_resume_continues_exactly(tmp_path):
    straight = GRPOTrainer(tiny_config(tmp_path / "a", "train.max_steps=4"), rewards={"b": mean_brightness})
    straight.train()
    first = GRPOTrainer(tiny_config(tmp_path / "b", "train.max_steps=2"), rewards={"b": mean_brightness})
    first.train()
    second = GRPOTrainer(tiny_config(tmp_path / "b", "train.max_steps=4", "checkpoint.resume_from=latest"),
                         rewards={"b": mean_brightness})
    assert second.step == 0
    second.train()
    assert second.step == 4
    a, b = lora_state(straight), lora_state(second)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_custom_reward_by_import_path_in_config(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    cfg = tiny_config(tmp_path, "rewards.weights={reward_plugins:shape_recorder: 1.0}", "train.max_steps=1")
    trainer = GRPOTrainer(cfg)
    trainer.train()
    import reward_plugins

    calls = reward_plugins.shape_recorder.calls
    assert calls, "custom reward was never called"
    shape, n_prompts = calls[-1]
    assert shape[0] == n_prompts == 2 and shape[1:] == (5, 3, 16, 16)


def test_with_ot_rewards_on_tiny_encoder(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=1", "rewards.weights={ot_quality: 1.0, ot_semantic: 1.0}",
                      "train.advantage_mode=per_reward", "train.beta=0.01")
    metrics = GRPOTrainer(cfg).train()
    for name in ("ot_quality", "ot_semantic"):
        assert 0.0 <= metrics[f"reward/{name}/mean"] <= 1.0 or name == "ot_quality"
    assert "train/kl" in metrics


def test_bad_group_arithmetic_is_one_clear_error(tmp_path):
    from pisces_rl.config import ConfigError

    with pytest.raises(ConfigError, match="sample_batch_size"):
        GRPOTrainer(tiny_config(tmp_path, "train.num_generations=3"), rewards={"b": mean_brightness})


def test_before_after_evaluation_with_a_judge(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=1", "logging.judge=shapesbench", "data.eval_source=builtin:tiny",
                      "data.num_eval_prompts=3")
    trainer = GRPOTrainer(cfg, rewards={"brightness": mean_brightness})
    assert len(trainer.eval_prompts) == 3
    trainer.train()
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    evaluation = summary["eval"]
    for key in ("judge/total", "judge/quality", "judge/semantic", "reward/brightness", "reward/total"):
        assert set(evaluation[key]) == {"before", "after"}, key
        assert 0.0 <= evaluation["judge/total"]["before"] <= 1.0
    assert (tmp_path / "before_after.gif").exists() and (tmp_path / "reward_curve.png").exists()
    # "before" is the base model: evaluating it again with the LoRA disabled reproduces it exactly
    again = trainer.evaluate(base_model=True).metrics
    assert again["judge/total"] == evaluation["judge/total"]["before"]


@pytest.mark.parametrize("shared", [False, True])
def test_shared_group_noise_starts_a_group_from_one_latent(tmp_path, shared):
    cfg = tiny_config(tmp_path, "train.prompts_per_step=2", "train.num_generations=3", "train.sample_batch_size=2",
                      f"train.shared_group_noise={str(shared).lower()}")
    trainer = GRPOTrainer(cfg, rewards={"brightness": mean_brightness})
    rollout, group_ids = trainer.sample(0)
    start = rollout.latents[:, 0]                                               # [B, C, F, h, w]
    same = torch.tensor([[torch.equal(start[i], start[j]) for j in range(6)] for i in range(6)])
    in_group = group_ids[:, None] == group_ids[None, :]
    if shared:
        assert same[in_group].all() and not same[~in_group].any()
        assert not torch.equal(rollout.latents[0, -1], rollout.latents[1, -1])   # the SDE steps still differ
    else:
        assert same.sum() == 6                                                  # only each video with itself


def test_sde_window_with_shared_noise_trains_on_the_window_steps_only(tmp_path):
    """Flow-GRPO-Fast style: a group shares its start, steps outside sampling.sde_window are ODE steps, so a group's
    videos agree until the window and every trained step lies inside it; the update still moves the LoRA."""
    cfg = tiny_config(tmp_path, "train.shared_group_noise=true", "train.num_generations=3", "train.sample_batch_size=3",
                      "train.train_batch_size=3", "sampling.num_inference_steps=4", "sampling.sde_window=[1,2]")
    trainer = GRPOTrainer(cfg, rewards={"brightness": mean_brightness})
    rollout, _ = trainer.sample(0)
    assert torch.equal(rollout.train_step_indices, torch.ones(3, 1, dtype=torch.long))
    torch.testing.assert_close(rollout.latents[0, :2], rollout.latents[2, :2], atol=1e-5, rtol=0)  # row order only
    assert (rollout.latents[0, 2] - rollout.latents[2, 2]).abs().max() > 0.1
    lora0 = lora_state(trainer)
    trainer.train()
    assert any(not torch.equal(lora0[k], v) for k, v in lora_state(trainer).items())


@pytest.mark.parametrize("noise_block", [1, 2])
def test_kl_term_is_flow_grpo_kl_of_the_trained_step(tmp_path, noise_block):
    """``train.beta``'s KL is Flow-GRPO's: ``((mean - mean_ref) ** 2).mean(dims) / (2 * std_dev_t ** 2)`` with
    ``std_dev_t = eta * sqrt(sigma / (1 - sigma))`` (yifan123/flow_grpo ``scripts/train_sd3.py``,
    ``sd3_sde_with_logprob.py``), per video at its trained step; with ``noise_block = k`` the mean difference
    is block-averaged, ``k * avgpool_k``, as in the step density (``pisces_rl.rollout.sde``)."""
    from pisces_rl.rollout import rescore_log_prob

    eta, beta = 0.7, 0.1
    cfg = tiny_config(tmp_path, f"train.beta={beta}", f"sampling.noise_block={noise_block}", f"sampling.eta={eta}")
    trainer = GRPOTrainer(cfg, rewards={"b": mean_brightness})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                                   # a non-zero LoRA, so the policy differs from the base
        for p in trainer.policy.transformer.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    rollout, _ = trainer.sample(0)
    j, mb = rollout.train_step_indices[:, 0], torch.arange(len(rollout))
    out = rescore_log_prob(trainer.policy, rollout, j, mb)
    stats = {}
    extra = trainer._regularisers(rollout, j, mb, out, stats)
    with torch.no_grad(), trainer.policy.lora_disabled():
        ref = rescore_log_prob(trainer.policy, rollout, j, mb)

    sigma, sigma_next = rollout.sigmas[j], rollout.sigmas[j + 1]                       # [b]
    std_dev_t = eta * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, sigma_next, sigma)))
    diff = (out.mean - ref.mean).detach()                                              # [b, C, F, h, w]
    if noise_block > 1:
        k = noise_block
        *lead, h, w = diff.shape
        diff = diff.reshape(*lead, h // k, k, w // k, k).mean(dim=(-3, -1)) * k
    expected = (diff**2).mean(dim=(1, 2, 3, 4)) / (2 * std_dev_t**2)                  # [b]
    assert expected.min() > 0
    torch.testing.assert_close(stats["kl"], expected.mean(), rtol=1e-4, atol=0)
    torch.testing.assert_close(extra.detach(), beta * expected.mean(), rtol=1e-4, atol=0)


def test_batch_scaled_advantages_in_the_trainer(tmp_path):
    """``train.scale_rewards=batch`` divides by the std of the whole batch (one process here)."""
    from pisces_rl.trainer.advantages import group_advantages

    cfg = tiny_config(tmp_path, "train.scale_rewards=batch", "train.prompts_per_step=2")
    trainer = GRPOTrainer(cfg, rewards={"b": mean_brightness})
    rollout, group_ids = trainer.sample(0)
    scores = trainer.rewards(rollout.videos, rollout.prompts)
    adv = trainer.advantages(scores, group_ids)
    torch.testing.assert_close(adv, group_advantages(scores.total, group_ids, scale="batch"))
    assert not torch.allclose(adv, group_advantages(scores.total, group_ids, scale="group"))
