"""DiffusionNFT (train.algorithm=nft) on the tiny in-code Wan model (CPU).

Reference: NVlabs/DiffusionNFT@24af555, scripts/train_nft_sd3.py (T), flow_grpo/stat_tracking.py (ST),
config/nft.py (C), config/base.py (B); paper arXiv 2509.16117.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from _launch import ROOT, accelerate_launch
from pisces_rl.config import ConfigError, GRPOConfig, load_config, nft_batch_arithmetic
from pisces_rl.trainer import GRPOTrainer, NFTTrainer, online_trainer
from pisces_rl.trainer.nft import nft_advantages, nft_loss, old_policy_decay, optimality_weight


def brightness(videos, prompts, **kwargs):
    """Toy black-box reward: mean pixel value, [B, F, C, H, W] -> [B]."""
    return videos.mean(dim=(1, 2, 3, 4))


def tiny_config(tmp_path, *overrides):
    base = [f"output_dir={tmp_path}", "train.max_steps=2", "train.prompts_per_step=2", "train.num_generations=2",
            "train.sample_batch_size=2", "train.train_batch_size=2", "train.learning_rate=5e-3",
            "sampling.num_inference_steps=3", "sampling.height=16", "sampling.width=16", "logging.report_to=none",
            "data.num_eval_prompts=1"]
    return load_config(GRPOConfig, str(ROOT / "recipes/configs/nft_tiny_cpu.yaml"), [*base, *overrides])


def live(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad}


def perturb(params, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.device))


# ---------------------------------------------------------------------- the maths
def test_loss_on_hand_computed_scalars():
    """T:934-960 by hand: x0 = 1, eps = 0, t = 0.5 (x_t = 0.5), v = 2, v_old = 1, r = 0.8, scale 5.

    beta = 1: v+ = 2, v- = 0 -> x0+ - x0 = -1.5, x0- - x0 = -0.5; adaptive L+ = 2.25/1.5 = 1.5, L- = 0.25/0.5 = 0.5,
    loss = 5 (0.8 * 1.5 + 0.2 * 0.5) = 6.5; plain: 5 (0.8 * 2.25 + 0.2 * 0.25) = 9.25.
    beta = 0.5: v+ = 1.5, v- = 0.5 -> -1.25, -0.75; L+ = 1.25, L- = 0.75; loss = 5 (0.8 * 1.25 + 0.2 * 0.75) / 0.5 = 11.5.
    d loss / dv (beta = 1, adaptive, weight detached) = 5 (0.8 * 2 * 1.5 * 0.5 / 1.5 - 0.2 * 2 * 0.5 * 0.5 / 0.5) = 3.
    """
    x0, x_t, t, r = torch.ones(1, 1), torch.full((1, 1), 0.5), torch.tensor([0.5]), torch.tensor([0.8])
    v = torch.full((1, 1), 2.0, requires_grad=True)
    v_old = torch.ones(1, 1)
    loss, stats = nft_loss(v, v_old, x_t, x0, t, r, beta=1.0, adaptive=True, scale=5.0)
    assert loss.item() == pytest.approx(6.5) and stats["positive_loss"].item() == pytest.approx(1.5)
    assert stats["negative_loss"].item() == pytest.approx(0.5)
    loss.sum().backward()
    assert v.grad.item() == pytest.approx(3.0)
    assert nft_loss(v, v_old, x_t, x0, t, r, 1.0, adaptive=False)[0].item() == pytest.approx(9.25)
    assert nft_loss(v, v_old, x_t, x0, t, r, 0.5, adaptive=True)[0].item() == pytest.approx(11.5)


def test_loss_matches_the_reference_lines_on_random_tensors():
    """The loss written as T:934-960 (float64 weight, means over non-batch dims, x adv_clip_max)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(3, 4, 2, 3, 3, generator=g)
    t = torch.tensor([0.9, 0.5, 0.2])
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    v, v_old = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(3, 4, 2, 3, 3, generator=g)
    adv = torch.tensor([7.0, -1.3, 0.0])
    beta, clip = 0.1, 5.0
    dims = (1, 2, 3, 4)
    # --- reference, line for line
    r = torch.clamp(torch.clamp(adv, -clip, clip) / clip / 2.0 + 0.5, 0, 1)
    te = t.view(-1, 1, 1, 1, 1)
    pos = beta * v + (1 - beta) * v_old
    neg = (1.0 + beta) * v_old - beta * v
    xp = x_t - te * pos
    wp = torch.abs(xp.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    lp = ((xp - x0) ** 2 / wp).mean(dim=dims)
    xn = x_t - te * neg
    wn = torch.abs(xn.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    ln = ((xn - x0) ** 2 / wn).mean(dim=dims)
    expected = r * lp / beta + (1.0 - r) * ln / beta
    ours, _ = nft_loss(v, v_old, x_t, x0, t, optimality_weight(adv, clip), beta, adaptive=True, scale=clip)
    torch.testing.assert_close(ours.double(), (expected * clip).double(), rtol=1e-6, atol=1e-6)
    assert optimality_weight(adv, clip).tolist() == pytest.approx([1.0, 0.37, 0.5])


def test_advantages_group_mean_global_std():
    """ST:26-31 with global_std=True (B:57): (R - mean of the prompt's rewards) / (np.std(all rewards) + 1e-4)."""
    R = torch.tensor([1.0, 3.0, 10.0, 14.0, 6.0, 6.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    std = float(R.std(unbiased=False))                                  # numpy's default ddof=0
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0], dtype=torch.float64) / (std + 1e-4)
    torch.testing.assert_close(nft_advantages(R, groups), expected)
    # on one process of two: the std is that of both processes' rewards, the group means stay local
    torch.testing.assert_close(nft_advantages(R[:2], groups[:2], all_rewards=R), expected[:2])
    per_group = nft_advantages(R, groups, reward_std="group")       # group stds 1, 2 and 0
    torch.testing.assert_close(per_group, torch.tensor([-1 / 1.0001, 1 / 1.0001, -2 / 2.0001, 2 / 2.0001, 0.0, 0.0],
                                                       dtype=torch.float64))
    with_nan = nft_advantages(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([0, 0, 0]))
    assert torch.isnan(with_nan[1]) and with_nan[0].item() == pytest.approx(-1 / 1.0001)
    assert optimality_weight(with_nan, 5.0)[0].item() == pytest.approx(0.5 - 0.1 / 1.0001)


def test_old_policy_decay_matches_return_decay():
    """T:169-189: type 1 = min(0.001 step, 0.5); type 2 = 0 before 75, then min(0.0075 (step - 75), 0.999)."""
    assert [old_policy_decay(s) for s in (0, 1, 40, 500, 900)] == pytest.approx([0, 0.001, 0.04, 0.5, 0.5])
    assert [old_policy_decay(s, 75, 0.0075, 0.999) for s in (0, 74, 75, 100, 300)] == pytest.approx(
        [0, 0, 0, 0.1875, 0.999])


# ---------------------------------------------------------------------- the trainer
def test_samples_come_from_the_old_policy_by_ode_without_cfg(tmp_path):
    trainer = NFTTrainer(tiny_config(tmp_path), rewards={"b": brightness})
    assert trainer.rollout_sampling.eta == 0 and trainer.rollout_sampling.guidance_scale == 1.0
    assert trainer.config.sampling.guidance_scale == 4.0          # evaluation keeps the sampling section's
    perturb(trainer.policy.trainable_parameters(), seed=0)       # theta != old
    theta = live(trainer)
    a, b = trainer.sample(0), trainer.sample(0)
    assert torch.equal(a.latents, b.latents), "ODE sampling with the same seed must repeat"
    assert all(torch.equal(v, theta[k]) for k, v in live(trainer).items()), "sampling left the old weights in"
    assert a.negative_prompt_embeds is None and a.latents.shape == trainer.policy.latent_shape(4, 5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(trainer.policy.decode(a.latents), a.videos)    # x0 = the sampler's last latent
    with trainer.old.swapped():                                  # the old weights, installed by hand
        by_old = trainer.sample(0)
    assert torch.equal(by_old.latents, a.latents)
    trainer.old.shadow = {k: v.clone() for k, v in theta.items()}
    assert not torch.equal(trainer.sample(0).latents, a.latents), "theta must sample differently from old"


@pytest.mark.parametrize("adaptive", [False, True])
def test_all_r_one_is_flow_matching_on_the_samples(tmp_path, adaptive):
    """r = 1, beta = 1, kl 0: loss = 5 t^2 w mean((v_theta(x_t) - (eps - x0))^2) on the sampled x0, whatever the old
    policy (paper Eq. 6 with r = 1; w = 1, or 1 / sg(t mean|v - (eps - x0)|) with the adaptive weight)."""
    trainer = NFTTrainer(tiny_config(tmp_path, "nft.kl_weight=0", "nft.beta=1", f"nft.adaptive_weight={str(adaptive).lower()}"),
                         rewards={"b": brightness})
    perturb(trainer.policy.trainable_parameters(), seed=0)
    batch = trainer.sample(0)
    mb, k = torch.arange(2), trainer.batch["train_timesteps_per_video"]
    assert k == 2                                                  # int(0.99 * 3)
    ones = torch.ones(4)

    def trainer_losses():
        out = []
        for s in trainer._micro_batch_losses(batch, ones, mb, k, torch.Generator().manual_seed(5)):
            grads = torch.autograd.grad(s["_loss"], trainer.policy.trainable_parameters())
            out.append((s["_loss"].detach(), grads))
        return out

    got = trainer_losses()
    perturb(list(trainer.old.shadow.values()), seed=3, scale=0.5)  # another old policy: no effect when r = 1
    again = trainer_losses()
    gen = torch.Generator().manual_seed(5)                          # the same draws: levels, then noise
    levels = trainer.training_levels(k, 2, gen)
    noise = torch.randn((2, k, *batch.latents.shape[1:]), generator=gen)
    timesteps, sigmas = trainer.policy.flow_schedule(3)
    for j in range(k):
        t = sigmas[levels[:, j]].view(-1, 1, 1, 1, 1)
        x0, eps = batch.latents[:2], noise[:, j]
        x_t = (1 - t) * x0 + t * eps
        v = trainer.policy.predict_velocity(x_t, timesteps[levels[:, j]], batch.prompt_embeds[:2])
        err = (v - (eps - x0)) ** 2
        w = 1.0 if not adaptive else 1.0 / (t * (v - (eps - x0)).abs().mean((1, 2, 3, 4), keepdim=True)).detach()
        fm = 5.0 * (t ** 2 * w * err).mean((1, 2, 3, 4)).mean()
        grads = torch.autograd.grad(fm, trainer.policy.trainable_parameters())
        for loss, g in (got[j], again[j]):
            torch.testing.assert_close(loss, fm.detach(), rtol=1e-5, atol=1e-7)
            for a, b in zip(g, grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert any(g.abs().sum() > 0 for g in got[0][1])


def test_iteration_updates_old_policy_and_logs(tmp_path):
    trainer = NFTTrainer(tiny_config(tmp_path, "nft.old_decay_rate=0.3", "train.train_batch_size=1"),
                         rewards={"b": brightness})
    assert trainer.batch["optimizer_steps_per_iteration"] == 4 and trainer.batch["train_timesteps_per_video"] == 2
    old = {k: v.clone() for k, v in trainer.old.shadow.items()}
    theta0 = live(trainer)
    assert all(torch.equal(old[k], theta0[k]) for k in old), "old := theta at the start (T:576-579)"
    m = trainer.train_step(0)
    eta = min(0.3 * 4, 0.5)                                        # after 4 optimiser steps (T:1035)
    assert trainer.old.optimizer_steps == 4 and m["train/old_eta"] == pytest.approx(eta)
    theta = live(trainer)
    for k in old:
        torch.testing.assert_close(trainer.old.shadow[k], eta * old[k] + (1 - eta) * theta[k], rtol=0, atol=1e-7)
    assert m["train/update_ratio"] > 0 and 0 <= m["train/r_mean"] <= 1 and m["train/rewarded_fraction"] == 1.0
    for key in ("train/loss", "train/policy_loss", "train/kl", "train/old_deviation", "train/grad_norm",
                "train/positive_loss", "train/negative_loss", "reward/b/mean"):
        assert key in m and m[key] == m[key], key


def test_resume_is_exact_two_plus_two_equals_four(tmp_path):
    over = ("nft.old_decay_rate=0.2", "checkpoint.save_every=1")
    straight = NFTTrainer(tiny_config(tmp_path / "a", "train.max_steps=4", *over), rewards={"b": brightness})
    straight.train()
    first = NFTTrainer(tiny_config(tmp_path / "b", *over), rewards={"b": brightness})
    init = live(first)
    first.train()
    second = NFTTrainer(tiny_config(tmp_path / "b", "train.max_steps=4", "checkpoint.resume_from=latest", *over),
                        rewards={"b": brightness})
    second.train()
    assert second.step == 4 and len(second.history["train/loss"]) == 4
    assert second.old.optimizer_steps == straight.old.optimizer_steps == 4 * 2     # 2 micro-batch steps each
    a, b = live(straight), live(second)
    assert any(not torch.equal(a[k], init[k]) for k in a), "the policy did not train"
    assert any(not torch.equal(second.old.shadow[k], b[k]) for k in a), "old == theta: the decay never acted"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(straight.old.shadow[k], second.old.shadow[k], rtol=0, atol=1e-6, msg=k)
    assert straight.history["train/loss"] == pytest.approx(second.history["train/loss"], rel=1e-5)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["batch"]["train_timesteps_per_video"] == 2 and "train/old_eta" in summary["metrics"]


def test_config_checks_and_dispatch(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    assert isinstance(online_trainer(cfg, rewards={"b": brightness}), NFTTrainer)
    assert isinstance(online_trainer(tiny_config(tmp_path, "train.algorithm=grpo"), rewards={"b": brightness}),
                      GRPOTrainer)
    bad = {"train.advantage_mode=per_reward": "train.advantage_mode", "train.beta=0.1": "train.beta",
           "train.shared_group_noise=true": "train.shared_group_noise",
           "nft.timestep_fraction=0.2": "nft.timestep_fraction"}
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key):
            nft_batch_arithmetic(tiny_config(tmp_path, override), 1)
    for override, key in {"nft.old_decay_max=1.0": "nft.old_decay_max", "nft.beta=0": "nft.beta",
                          "nft.reward_std=batch": "nft.reward_std", "train.algorithm=ppo": "train.algorithm"}.items():
        with pytest.raises(ConfigError, match=key):
            tiny_config(tmp_path, override)
    monkeypatch.setattr("pisces_rl.trainer.nft.zero_stage", lambda acc: 3)
    with pytest.raises(ValueError, match="ZeRO-3"):
        NFTTrainer(cfg, rewards={"b": brightness})


@pytest.mark.distributed
def test_two_processes_deepspeed_zero2(tmp_path):
    """2 CPU processes under ZeRO-2: global-std r over both processes, old-policy swap and update identical on both,
    checkpoint + reload redoes an iteration bit for bit (tests/_nft_worker.py)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    proc = accelerate_launch("zero2", ROOT / "tests" / "_nft_worker.py", [str(tmp_path)], timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2 and result["zero_stage"] == 2
    assert result["r_uses_both_processes"] and result["r_differs_from_local_std"]
    assert result["ranks_equal"] and result["resume_exact"]
    assert result["restored_optimizer_steps"] == 1 and result["optimizer_steps"] == 2
    for it in result["trace"]:
        assert it["swap_restored"] and it["old_formula"] and it["moved"]
        assert it["eta"] == pytest.approx(it["expected_eta"])


def test_shipped_nft_configs_match_their_grpo_twins():
    """nft_*_cpu.yaml: algorithm nft, NFT's checks pass, and the ShapesWorld one keeps grpo_shapes_cpu.yaml's world,
    rewards, prompts, evaluation prompts and 32 videos per iteration; both evaluate CFG-free as they sample (NFT: the
    reference's evaluation; GRPO: its CFG-free rollouts). Each keeps the iterations and learning rate that passed its
    pre-registered default run (benchmarks/results/default_runs.md): NFT 40 at 1e-3, GRPO 80 at 5e-4."""
    configs = ROOT / "recipes" / "configs"
    for name in ("nft_tiny_cpu.yaml", "nft_shapes_cpu.yaml"):
        cfg = load_config(GRPOConfig, str(configs / name))
        assert cfg.train.algorithm == "nft" and cfg.nft.eta == 0 and cfg.nft.guidance_scale == 1.0
        assert nft_batch_arithmetic(cfg, 1)["train_timesteps_per_video"] >= 1
    nft = load_config(GRPOConfig, str(configs / "nft_shapes_cpu.yaml")).to_dict()
    grpo = load_config(GRPOConfig, str(configs / "grpo_shapes_cpu.yaml")).to_dict()
    for section in ("model", "rewards", "data"):
        assert nft[section] == grpo[section], section
    for key in ("num_frames", "height", "width", "num_inference_steps"):
        assert nft["sampling"][key] == grpo["sampling"][key], key
    assert nft["sampling"]["guidance_scale"] == nft["nft"]["guidance_scale"] == grpo["sampling"]["guidance_scale"] == 1.0
    assert nft["logging"]["judge"] == grpo["logging"]["judge"] == "shapesbench"
    for key in ("prompts_per_step", "num_generations", "seed"):
        assert nft["train"][key] == grpo["train"][key], key
    assert (nft["train"]["max_steps"], nft["train"]["learning_rate"]) == (40, 1e-3)
    assert (grpo["train"]["max_steps"], grpo["train"]["learning_rate"], grpo["train"]["advantage_mode"]) == (80, 5e-4, "sum")


def test_recipe_runs_nft_by_train_algorithm(tmp_path, fresh_accelerate_state):
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "recipes" / "grpo_short_video.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    metrics = recipe.main(["--config", str(ROOT / "recipes/configs/nft_tiny_cpu.yaml"), "train.max_steps=1",
                           "train.prompts_per_step=1", "train.num_generations=2", "train.sample_batch_size=2",
                           "train.train_batch_size=2", "sampling.num_inference_steps=2", "sampling.height=16",
                           "sampling.width=16", "logging.report_to=none", "data.num_eval_prompts=1",
                           f"output_dir={tmp_path}"])
    assert "train/old_eta" in metrics and "reward/ot_quality/mean" in metrics
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["batch"]["train_timesteps_per_video"] == 1 and list((tmp_path / "lora").glob("*.safetensors"))
