"""The consistency-distillation term (PISCES Eq. 7) shared by GRPO and direct backprop, on the tiny Wan model."""
from __future__ import annotations

import pytest
import torch

from pisces_rl.config import BackpropConfig, ConfigError, GRPOConfig, load_config
from pisces_rl.trainer import BackpropTrainer, GRPOTrainer
from pisces_rl.trainer.backprop import BackpropBatch
from pisces_rl.trainer.consistency import LoraEMA
from pisces_rl.trainer.losses import pseudo_huber


def brightness(videos, prompts, **kwargs):
    """Differentiable toy reward: mean pixel value, [B, F, C, H, W] -> [B]."""
    return videos.mean(dim=(1, 2, 3, 4))


brightness.differentiable = True

SIZE = ["sampling.num_inference_steps=4", "sampling.num_frames=5", "sampling.height=16", "sampling.width=16",
        "logging.report_to=none", "data.num_eval_prompts=1"]


def grpo_config(tmp_path, *overrides):
    base = [f"output_dir={tmp_path}", "train.max_steps=2", "train.prompts_per_step=1", "train.group_size=2",
            "train.sample_batch_size=2", "train.train_batch_size=2", "train.learning_rate=5e-3",
            "train.clip_range=0.2", "train.cd_weight=1.0", *SIZE]
    return load_config(GRPOConfig, None, [*base, *overrides])


def lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad}


def perturb_lora(policy, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.device))


def test_grpo_cd_term_is_eq7_equals_backprop_cd_and_differs_from_the_base_anchor(tmp_path):
    """L_CD at a GRPO rollout state, from the reference formula: roar-ai/pisces ``fastvideo/distill_grpo.py``
    (student ``solver.euler_style_multiphase_pred`` to σ_min with one phase, teacher ``solver.euler_step`` one level
    down, target network's jump with ``is_target=True``, ``--not_apply_cfg_solver``: one conditional pass each)."""
    grpo = GRPOTrainer(grpo_config(tmp_path / "g", "sampling.guidance_scale=3.0"), rewards={"b": brightness})
    perturb_lora(grpo.policy)  # student (LoRA) != teacher (LoRA disabled)
    rollout, _ = grpo.sample(0)
    mb, j = torch.tensor([1, 0]), torch.tensor([1, 2])
    policy, s, x = grpo.policy, rollout.sigmas, rollout.latents[[1, 0], [1, 2]]
    cond = (rollout.prompt_embeds[mb], None, 1.0)                           # cd_guidance_scale = 1 (default)
    ts = torch.cat([rollout.timesteps, torch.zeros(1)])
    view = lambda v: v.view(-1, 1, 1, 1, 1)  # noqa: E731
    with torch.no_grad():
        with policy.lora_disabled():
            x_next = x + view(s[j + 1] - s[j]) * policy.predict_velocity(x, ts[j], *cond)
        target = x_next + view(s[-1] - s[j + 1]) * policy.predict_velocity(x_next, ts[j + 1], *cond)
        student = x + view(s[-1] - s[j]) * policy.predict_velocity(x, ts[j], *cond)
    expected = pseudo_huber(student, target).mean()
    cd = grpo.consistency_loss(rollout, j, mb)
    assert cd.requires_grad, "the student jump must carry the gradient"
    torch.testing.assert_close(cd.detach(), expected, rtol=1e-5, atol=1e-8)
    assert expected > 1e-4, "a real teacher step leaves a CD gap"

    # the same state through BackpropTrainer.loss: x0 = 0 and ε = x / σ give x_σ = x exactly up to rounding
    bp_cfg = load_config(BackpropConfig, None, [f"output_dir={tmp_path / 'b'}", "train.latent_source=generated",
                                                "train.prompts_per_step=1", "train.group_size=2", "train.sample_batch_size=2",
                                                "train.train_batch_size=2", "train.teacher_steps=4", *SIZE])
    backprop = BackpropTrainer(bp_cfg, rewards={"b": brightness}, policy=policy)
    torch.testing.assert_close(backprop.sigmas, s)
    batch = BackpropBatch(torch.zeros_like(x), ["p", "p"], torch.zeros(2, dtype=torch.long), cond[0], None,
                          x / view(s[j]), j)
    _, stats, _ = backprop.loss(batch, torch.arange(2))
    torch.testing.assert_close(stats["cd_loss"], expected, rtol=1e-4, atol=1e-8)

    # the old "cd" term, now train.base_anchor_weight: the SDE mean against the base model's, a different thing
    from pisces_rl.rollout import rescore_log_prob

    with torch.no_grad():
        out = rescore_log_prob(policy, rollout, j, mb)
        with policy.lora_disabled():
            ref = rescore_log_prob(policy, rollout, j, mb)
    anchor = pseudo_huber(out.mean, ref.mean).mean()
    assert abs(anchor - expected) > 0.1 * expected, (anchor, expected)
    stats = {}
    grpo.config.train.base_anchor_weight = 0.5
    with torch.no_grad():
        extra = grpo._regularisers(rollout, j, mb, out, stats)
    torch.testing.assert_close(stats["cd_loss"], expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats["base_anchor"], anchor)
    torch.testing.assert_close(extra, expected + 0.5 * anchor, rtol=1e-5, atol=1e-8)


def test_grpo_cd_guidance_applies_cfg_to_student_teacher_and_target(tmp_path):
    grpo = GRPOTrainer(grpo_config(tmp_path, "sampling.guidance_scale=3.0", "train.cd_guidance_scale=null"),
                       rewards={"b": brightness})
    rollout, _ = grpo.sample(0)
    batches = []  # denoiser batch of each call (its output [n, C, F, h, w])
    hook = grpo.policy.transformer.register_forward_hook(lambda m, args, out: batches.append(out[0].shape[0]))
    try:
        grpo.consistency_loss(rollout, torch.tensor([0, 1]), torch.tensor([0, 1]))
    finally:
        hook.remove()
    assert batches == [4, 4, 4], "teacher, target and student each run CFG on the [2b] batch"
    with pytest.raises(ConfigError, match="train.cd_guidance_scale"):
        GRPOTrainer(grpo_config(tmp_path, "sampling.guidance_scale=1.0", "train.cd_guidance_scale=2.0"),
                    rewards={"b": brightness})


def test_grpo_ema_target_resumes_exactly(tmp_path):
    over = ("train.cd_target=ema", "train.cd_ema_decay=0.5")
    straight = GRPOTrainer(grpo_config(tmp_path / "a", "train.max_steps=4", *over), rewards={"b": brightness})
    init = lora(straight)
    metrics = straight.train()
    assert "train/cd_loss" in metrics and metrics["train/cd_loss"] > 0
    first = GRPOTrainer(grpo_config(tmp_path / "b", *over), rewards={"b": brightness})
    first.train()
    second = GRPOTrainer(grpo_config(tmp_path / "b", "train.max_steps=4", "checkpoint.resume_from=latest", *over),
                         rewards={"b": brightness})
    second.train()
    assert second.step == 4
    a, b = lora(straight), lora(second)
    assert any(not torch.equal(a[k], init[k]) for k in a), "LoRA did not train"
    assert any(not torch.equal(second.ema.shadow[k], b[k]) for k in a), "EMA equals the live weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(straight.ema.shadow[k], second.ema.shadow[k], rtol=0, atol=1e-6, msg=k)


def test_ema_swap_keeps_a_graph_recorded_before_it_valid():
    """GRPO records the log-prob step's graph before the CD target swaps the EMA in: the swap must neither break
    that backward nor change its gradient."""
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    ema = LoraEMA([("w", w)], decay=0.5)
    ema.shadow["w"] = torch.zeros(2, 2)
    y = ((x @ w) ** 2).sum()
    with ema.swapped():
        assert torch.equal(w.detach(), torch.zeros(2, 2))
    y.backward()
    expected = 2 * x.detach().T @ (x.detach() @ w.detach())  # d/dw sum((xw)^2)
    torch.testing.assert_close(w.grad, expected)
    assert torch.equal(w.detach(), torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
