"""Flow-matching SDE step maths, SDE rollouts on the tiny Wan policy, and the ratio == 1 invariant."""
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pisces_rl.models import build_policy, build_tiny_wan_pipeline
from pisces_rl.models.vp import alpha_bar_from_sigma
from pisces_rl.rollout import (SDE_TYPES, Rollout, cat, rescore_log_prob, sample_rollout, sde_std_table,
                               sde_step_with_logprob)

PROMPTS = ["two red squares moving left", "a blue circle"]


def model_cfg(**overrides):
    cfg = dict(pretrained="tiny", family="wan", dtype="fp32", lora_rank=4, lora_alpha=4,
               lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_path=None,
               gradient_checkpointing=False, seed=0)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def sampling_cfg(**overrides):
    cfg = dict(num_frames=5, height=32, width=32, num_inference_steps=4, guidance_scale=4.0, eta=0.25,
               train_timestep_fraction=1.0, decode_chunk_size=0, negative_prompt="", max_sequence_length=16)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def tuned_policy(**overrides):
    """A tiny policy whose LoRA is perturbed (B != 0), so it differs from the base model."""
    policy = build_policy(model_cfg(**overrides), device="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return policy


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the SDE step
def flow_grpo_reference(v, x, sigma, sigma_next, eta, noise):
    """yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` (``sde_step_with_logprob``), written
    out for a batch of sigmas: ``std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))) * eta``,
    ``mean = x (1 + s^2 / (2 sigma) dt) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt``, noise ``s sqrt(-dt)``."""
    s, sn = sigma.view(-1, 1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1, 1)
    dt = sn - s
    s_t = eta * torch.sqrt(s / (1 - torch.where(s == 1, sn, s)))
    mean = x * (1 + s_t**2 / (2 * s) * dt) + v * (1 + s_t**2 * (1 - s) / (2 * s)) * dt
    return mean, s_t * torch.sqrt(-dt)


def dance_grpo_reference(v, x, sigma, sigma_next, eta, noise):
    """XueZeyue/DanceGRPO ``fastvideo/train_grpo_hunyuan.py`` ``flux_step(..., grpo=True, sde_solver=True)`` (the
    same function is in roar-ai/pisces ``fastvideo/distill_grpo.py``), line by line."""
    s, sn = sigma.view(-1, 1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1, 1)
    dsigma = sn - s
    prev_sample_mean = x + dsigma * v
    pred_original_sample = x - s * v
    std_dev_t = eta * torch.sqrt(s - sn)
    score_estimate = -(x - pred_original_sample * (1 - s)) / s**2
    log_term = -0.5 * eta**2 * score_estimate
    return prev_sample_mean + log_term * dsigma, std_dev_t


def ddim_reference(v, x, sigma, sigma_next, eta, noise):
    """DDPO's DDIM step (kvablack/ddpo-pytorch ``ddim_with_logprob.py``: ``variance = (1 - ab') / (1 - ab) *
    (1 - ab / ab')``, ``std = eta sqrt(variance)``, ``mean = sqrt(ab') x0 + sqrt(1 - ab' - std^2) eps``) in VP
    coordinates ``z = (sqrt(ab) + sqrt(1 - ab)) x``, mapped back to flow coordinates (tests/test_ddim_step.py
    checks it on DDIMScheduler itself)."""
    s, sn = sigma.view(-1, 1, 1, 1, 1).double(), sigma_next.view(-1, 1, 1, 1, 1).double()
    ab, abn = alpha_bar_from_sigma(s).double(), alpha_bar_from_sigma(sn).double()
    x0, eps = x - s * v, x + (1 - s) * v
    std = eta * ((1 - abn) / (1 - ab) * (1 - ab / abn)).sqrt()
    mean = abn.sqrt() * x0 + (1 - abn - std**2).sqrt() * eps
    scale = abn.sqrt() + (1 - abn).sqrt()
    return (mean / scale).float(), (std / scale).float()


REFERENCES = {"flow_grpo": flow_grpo_reference, "dance_grpo": dance_grpo_reference, "ddim": ddim_reference}


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_log_prob_matches_the_reference_step(sde_type):
    """Mean, std, sample and log-prob against the reference code of each noise type (cited on the helpers),
    including the sigma = 1 first step; the log-prob is the full Gaussian density averaged over elements."""
    g = gen()
    x, v, noise = (torch.randn(4, 4, 2, 3, 3, generator=g) for _ in range(3))
    sigma, sigma_next, eta = torch.tensor([1.0, 0.9, 0.6, 0.3]), torch.tensor([0.8, 0.7, 0.5, 0.1]), 0.4
    step = sde_step_with_logprob(v, x, sigma, sigma_next, eta, noise=noise, sde_type=sde_type)
    mean, std = REFERENCES[sde_type](v, x, sigma, sigma_next, eta, noise)
    expected = torch.distributions.Normal(mean, std).log_prob(mean + std * noise).mean(dim=(1, 2, 3, 4))
    if sde_type == "ddim":  # DDPO's density is the VP latent's: minus log(sqrt(ab') + sqrt(1 - ab')) per element
        ab_next = alpha_bar_from_sigma(sigma_next)
        expected = expected - torch.log(ab_next.sqrt() + (1 - ab_next).sqrt())
    torch.testing.assert_close(step.mean, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(step.std, std, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(step.prev_sample, mean + std * noise, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(step.log_prob, expected, atol=1e-5, rtol=1e-5)


def test_the_two_noise_types_differ_only_in_s_t():
    """dance_grpo is flow_grpo's SDE with s_t = eta instead of eta * sqrt(sigma / (1 - sigma)): at sigma = 0.5 the
    two coincide, and elsewhere flow_grpo with eta' = eta / sqrt(sigma / (1 - sigma)) gives the same step."""
    g = gen(4)
    x, v, noise = (torch.randn(2, 5, generator=g) for _ in range(3))
    a = sde_step_with_logprob(v, x, 0.5, 0.3, 0.3, noise=noise, sde_type="dance_grpo")
    b = sde_step_with_logprob(v, x, 0.5, 0.3, 0.3, noise=noise, sde_type="flow_grpo")
    torch.testing.assert_close(a.prev_sample, b.prev_sample)
    c = sde_step_with_logprob(v, x, 0.8, 0.6, 0.3, noise=noise, sde_type="dance_grpo")
    d = sde_step_with_logprob(v, x, 0.8, 0.6, 0.3 / math.sqrt(0.8 / 0.2), noise=noise, sde_type="flow_grpo")
    torch.testing.assert_close(c.prev_sample, d.prev_sample)
    torch.testing.assert_close(c.log_prob, d.log_prob)
    with pytest.raises(ValueError, match="sde_type must be one of 'flow_grpo', 'dance_grpo', 'ddim'"):
        sde_step_with_logprob(v, x, 0.8, 0.6, 0.3, sde_type="dance")


def test_documented_std_table_on_the_shift_2_grid():
    """The per-step std table the sde module docstring quotes (and the correctness review, F3, measured): shift 2,
    16 steps, eta 0.25. flow_grpo: 0.25 at sigma = 1 (0.254 at the next step) falling to 0.034; dance_grpo:
    0.046 rising to 0.088; total injected variance 0.256 vs 0.062; the last step (to sigma = 0) injects none."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    scheduler.set_timesteps(16)
    sigmas = scheduler.sigmas.double()
    flow, flow_var = sde_std_table(sigmas, 0.25, "flow_grpo")
    dance, dance_var = sde_std_table(sigmas, 0.25, "dance_grpo")
    assert flow.shape == dance.shape == (16,) and flow[-1] == dance[-1] == 0
    assert [round(x, 3) for x in flow[[0, 1, 14]].tolist()] == [0.25, 0.254, 0.034]
    assert [round(x, 3) for x in dance[[0, 14]].tolist()] == [0.046, 0.088]
    assert (dance[1:15] > dance[:14]).all() and (flow[2:15] < flow[1:14]).all()
    assert round(flow_var, 3) == 0.256 and round(dance_var, 3) == 0.062
    # the same numbers as the std the step itself uses (step i of the schedule)
    for i in (0, 7, 14):
        step = sde_step_with_logprob(torch.zeros(1, 3), torch.zeros(1, 3), sigmas[i].item(), sigmas[i + 1].item(),
                                     0.25, generator=gen(), sde_type="dance_grpo")
        assert abs(step.std.item() - dance[i].item()) < 1e-6
    windowed, var = sde_std_table(sigmas, 0.25, "dance_grpo", sde_window=(2, 4))
    assert torch.equal(windowed.nonzero().flatten(), torch.tensor([2, 3]))
    assert abs(var - dance[2:4].square().sum().item()) < 1e-12


def test_scoring_mode_matches_sampling_and_differentiates_through_the_mean_only():
    g = gen(2)
    x = torch.randn(2, 3, 5, generator=g)
    v = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    sampled = sde_step_with_logprob(v.detach(), x, 0.8, 0.5, 0.7, generator=g)
    prev = sampled.prev_sample.clone().requires_grad_(True)
    scored = sde_step_with_logprob(v, x, 0.8, 0.5, 0.7, prev_sample=prev)
    torch.testing.assert_close(scored.log_prob, sampled.log_prob, atol=1e-6, rtol=0)
    scored.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert prev.grad is None
    assert scored.log_prob.dtype == torch.float32


def test_half_precision_inputs_are_computed_in_fp32():
    x = torch.randn(2, 8).to(torch.bfloat16)
    step = sde_step_with_logprob(x, x, 0.5, 0.3, 0.3, generator=gen())
    assert step.prev_sample.dtype == step.log_prob.dtype == step.mean.dtype == torch.float32


@pytest.mark.parametrize("sde_type, expected_std", [("flow_grpo", 0.5 * math.sqrt(1.0 / (1.0 - 0.8)) * math.sqrt(0.2)),
                                                     ("dance_grpo", 0.5 * math.sqrt(0.2)), ("ddim", 0.5 * 0.8)])
def test_sigma_one_step_is_finite(sde_type, expected_std):
    """sigma = 1: flow_grpo uses the next sigma in sqrt(sigma / (1 - sigma)) (Flow-GRPO's ``sigma_max``);
    dance_grpo needs no special case, nor ddim (alpha_bar = 0: std = eta * sigma_next)."""
    x, v = torch.randn(2, 6, generator=gen()), torch.randn(2, 6, generator=gen(1))
    step = sde_step_with_logprob(v, x, 1.0, 0.8, 0.5, generator=gen(), sde_type=sde_type)
    assert torch.isfinite(step.prev_sample).all() and torch.isfinite(step.log_prob).all()
    torch.testing.assert_close(step.std.flatten(), torch.full((2,), expected_std))


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_last_step_to_zero_is_a_deterministic_euler_step(sde_type):
    """Every type ends on x0_hat = x - sigma v, the latent DanceGRPO / PISCES decode (``pred_original_sample``)."""
    x, v = torch.randn(2, 6, generator=gen()), torch.randn(2, 6, generator=gen(1))
    step = sde_step_with_logprob(v, x, 0.2, 0.0, 0.7, generator=gen(), sde_type=sde_type)
    torch.testing.assert_close(step.prev_sample, x - 0.2 * v)  # = predicted x0
    assert torch.equal(step.std, torch.zeros_like(step.std))
    assert torch.equal(step.log_prob, torch.zeros(2))


def test_eta_zero_is_the_diffusers_euler_step_with_zero_log_prob():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    x, v = torch.randn(2, 16, 2, 4, 4, generator=gen()), torch.randn(2, 16, 2, 4, 4, generator=gen(1))
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        step = sde_step_with_logprob(v, x, scheduler.sigmas[i], scheduler.sigmas[i + 1], eta=0.0)
        torch.testing.assert_close(step.prev_sample, expected, atol=1e-6, rtol=0)
        assert torch.equal(step.log_prob, torch.zeros(2))


@pytest.mark.parametrize("block, sde_type", [(1, "flow_grpo"), (2, "flow_grpo"), (1, "dance_grpo"), (1, "ddim"),
                                             (2, "ddim")])
def test_sde_preserves_the_marginals_of_a_gaussian_flow(block, sde_type):
    """Data x0 ~ N(0, a^2): the exact velocity is known, x_sigma ~ N(0, (1-sigma)^2 a^2 + sigma^2).
    Simulating the SDE from sigma = 1 with a large eta must land on the right marginal variance
    (a sign error in the score correction or the noise scale breaks this). With block noise the
    correction must be projected like the noise, or the variance off the noise subspace collapses."""
    a2 = 0.25
    var = lambda s: (1 - s) ** 2 * a2 + s**2  # noqa: E731
    sigmas = torch.linspace(1.0, 0.1, 61)
    g = gen()
    x = torch.randn(5000, 1, 1, 2, 2, generator=g)
    for i in range(60):
        s = sigmas[i]
        v = x * (s - (1 - s) * a2) / var(s)
        x = sde_step_with_logprob(v, x, s, sigmas[i + 1], eta=0.7, generator=g, noise_block=block,
                                  sde_type=sde_type).prev_sample
    assert abs(x.var().item() / var(0.1) - 1) < 0.05
    block_mean = x.mean(dim=(-2, -1))          # the explored coordinate ...
    off_block = x - block_mean[..., None, None]  # ... and the deterministic rest
    assert abs(block_mean.var().item() * 4 / var(0.1) - 1) < 0.08
    assert abs(off_block.var().item() * 4 / 3 / var(0.1) - 1) < 0.08


def test_block_noise_is_constant_on_blocks_and_scores_in_block_coordinates():
    g = gen()
    x, v = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    step = sde_step_with_logprob(v, x, 0.8, 0.6, 0.9, generator=g, noise_block=2)
    delta = step.prev_sample - step.mean                                      # std * U z
    torch.testing.assert_close(delta, delta[..., ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1))
    z = 2 * delta[..., ::2, ::2] / step.std                                   # U^T delta / std
    expected = torch.distributions.Normal(0.0, step.std).log_prob(step.std * z).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(step.log_prob, expected, atol=1e-5, rtol=1e-5)
    again = sde_step_with_logprob(v, x, 0.8, 0.6, 0.9, prev_sample=step.prev_sample, noise_block=2)
    torch.testing.assert_close(again.log_prob, step.log_prob)
    g1, g2 = gen(5), gen(5)       # the block size does not change how much of the random stream a step uses
    sde_step_with_logprob(v, x, 0.8, 0.6, 0.9, generator=g1, noise_block=2)
    sde_step_with_logprob(v, x, 0.8, 0.6, 0.9, generator=g2)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))
    plain = sde_step_with_logprob(v, x, 0.8, 0.6, 0.9, generator=gen(3))
    assert torch.equal(plain.prev_sample, sde_step_with_logprob(v, x, 0.8, 0.6, 0.9, generator=gen(3),
                                                                noise_block=1).prev_sample)
    with pytest.raises(ValueError, match="noise_block must be >= 1 and divide"):
        sde_step_with_logprob(v, x, 0.8, 0.6, 0.9, noise_block=3)


def test_invalid_step_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(x, x, 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(x, x, 1.2, 0.5, 0.3)
    with pytest.raises(ValueError, match="eta"):
        sde_step_with_logprob(x, x, 0.5, 0.3, -0.1)
    with pytest.raises(ValueError, match="same shape"):
        sde_step_with_logprob(torch.zeros(2, 4), x, 0.5, 0.3, 0.3)
    with pytest.raises(ValueError, match=r"shape \[\] or \[2\]"):
        sde_step_with_logprob(x, x, torch.tensor([0.5, 0.4, 0.3]), 0.2, 0.3)


# ------------------------------------------------------------------ rollouts
def test_sample_rollout_shapes_determinism_and_train_steps():
    policy = tuned_policy()
    cfg = sampling_cfg(num_inference_steps=5, decode_chunk_size=1)
    r = sample_rollout(policy, PROMPTS * 2, cfg, generator=gen())
    assert len(r) == 4 and r.num_steps == 5
    assert r.latents.shape == (4, 6, 16, 2, 4, 4) and r.latents.dtype == torch.float32
    assert r.log_probs.shape == (4, 5) and r.timesteps.shape == (5,) and r.sigmas.shape == (6,)
    assert r.prompt_embeds.shape == r.negative_prompt_embeds.shape == (4, 16, 32)
    assert r.videos.shape == (4, 5, 3, 32, 32) and 0 <= r.videos.min() and r.videos.max() <= 1
    assert r.sigmas[0] == 1.0 and r.sigmas[-1] == 0.0
    assert torch.equal(r.log_probs[:, -1], torch.zeros(4)) and (r.log_probs[:, :-1] != 0).all()
    assert torch.equal(r.train_step_indices, torch.arange(4).expand(4, 4))  # every stochastic step
    again = sample_rollout(policy, PROMPTS * 2, cfg, generator=gen())
    assert torch.equal(again.latents, r.latents) and torch.equal(again.videos, r.videos)
    other = sample_rollout(policy, PROMPTS * 2, cfg, generator=gen(1))
    assert not torch.allclose(other.latents[:, -1], r.latents[:, -1])

    half = sample_rollout(policy, PROMPTS * 2, sampling_cfg(num_inference_steps=5, train_timestep_fraction=0.5),
                          generator=gen())
    idx = half.train_step_indices
    assert idx.shape == (4, 2) and (idx[:, 0] < idx[:, 1]).all() and idx.min() >= 0 and idx.max() <= 3
    assert len({tuple(row) for row in idx.tolist()}) > 1, "subsets are drawn per video"


def test_eta_zero_rollout_reproduces_the_plain_pipeline():
    policy = tuned_policy()
    cfg = sampling_cfg(eta=0.0)
    r = sample_rollout(policy, PROMPTS, cfg, generator=gen(3))
    frames = policy.pipeline(PROMPTS, num_frames=5, height=32, width=32, num_inference_steps=4, guidance_scale=4.0,
                             max_sequence_length=16, generator=gen(3), output_type="pt").frames
    torch.testing.assert_close(r.videos, frames, atol=1e-4, rtol=0)
    assert torch.equal(r.log_probs, torch.zeros(2, 4)) and r.train_step_indices.shape == (2, 0)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_rescore_with_the_same_weights_gives_ratio_one(sde_type):
    """The invariant behind every clipped-ratio update: re-scoring a recorded rollout with the
    weights that sampled it gives exp(new - old) == 1, for every step, sub-batch and CFG, for every noise type
    (the rollout records its type and re-scoring uses it)."""
    policy = tuned_policy()
    r = sample_rollout(policy, PROMPTS * 2, sampling_cfg(num_inference_steps=5, sde_type=sde_type), generator=gen())
    assert r.sde_type == sde_type
    std = torch.stack([rescore_log_prob(policy, r, i).std.flatten()[0] for i in range(4)])
    expected, _ = sde_std_table(r.sigmas, 0.25, sde_type)
    torch.testing.assert_close(std.double(), expected[:4], atol=1e-6, rtol=0)
    for step in range(r.num_steps):
        new = rescore_log_prob(policy, r, step, batch_indices=[2, 0])
        ratio = torch.exp(new.log_prob - r.log_probs[[2, 0], step])
        torch.testing.assert_close(ratio, torch.ones(2), atol=1e-5, rtol=0)
    mixed = torch.tensor([3, 0, 1, 2])  # a different step per video, as the trainer uses
    new = rescore_log_prob(policy, r, mixed)
    old = r.log_probs.gather(1, mixed[:, None]).squeeze(1)
    torch.testing.assert_close(torch.exp(new.log_prob - old), torch.ones(4), atol=1e-5, rtol=0)
    with policy.lora_disabled():
        ref = rescore_log_prob(policy, r, mixed)
    assert (ref.log_prob - old).abs().max() > 1e-4, "the reference (LoRA off) model must score differently"


def test_auto_sde_type_is_the_familys_choice():
    """sampling.sde_type = "auto" (the config default) samples with the family's ``sde_type`` (Wan: flow_grpo) and
    records it resolved; explicit values win; an unknown value is refused with the choices."""
    from pisces_rl.models import WanFamily
    from pisces_rl.rollout import resolve_sde_type

    policy = tuned_policy()
    r = sample_rollout(policy, PROMPTS, sampling_cfg(num_inference_steps=2, sde_type="auto"), generator=gen(),
                       decode=False)
    assert r.sde_type == WanFamily.sde_type == "flow_grpo"
    assert resolve_sde_type("ddim", WanFamily()) == "ddim" and resolve_sde_type("auto", None) == "flow_grpo"
    with pytest.raises(ValueError, match="'auto', 'flow_grpo'"):
        resolve_sde_type("dance", WanFamily())


def test_sde_window_injects_noise_only_inside_and_trains_only_there():
    """sde_window=[1, 3] on 5 steps: steps 0, 3, 4 are ODE steps (log-prob 0, never trained), and videos that
    share their initial noise stay identical until step 1, then differ; re-scoring still gives ratio 1."""
    policy = tuned_policy()
    cfg = sampling_cfg(num_inference_steps=5, sde_window=[1, 3])
    start = torch.randn(policy.latent_shape(1, 5, 32, 32), generator=gen(7)).expand(4, -1, -1, -1, -1)
    r = sample_rollout(policy, PROMPTS[:1] * 4, cfg, generator=gen(), latents=start)
    assert r.sde_window == (1, 3)
    assert torch.equal(r.train_step_indices, torch.tensor([[1, 2]] * 4))
    assert (r.log_probs[:, 1:3] != 0).all() and torch.equal(r.log_probs[:, [0, 3, 4]], torch.zeros(4, 3))
    for i in range(1, 4):   # identical before the window (up to the batch row's float rounding), apart after it
        torch.testing.assert_close(r.latents[i, :2], r.latents[0, :2], atol=1e-5, rtol=0)
        assert (r.latents[i, 3] - r.latents[0, 3]).abs().max() > 0.01
    for step in range(5):
        new = rescore_log_prob(policy, r, step)
        torch.testing.assert_close(new.log_prob, r.log_probs[:, step], atol=1e-5, rtol=0)
        if step not in (1, 2):   # an ODE step: its recorded output is exactly the deterministic mean
            torch.testing.assert_close(new.mean, r.latents[:, step + 1], atol=1e-5, rtol=0)
    mixed = rescore_log_prob(policy, r, torch.tensor([0, 1, 2, 3]))
    assert mixed.log_prob[0] == 0 and mixed.log_prob[3] == 0 and (mixed.log_prob[1:3] != 0).all()
    half = sample_rollout(policy, PROMPTS * 2, sampling_cfg(num_inference_steps=5, sde_window=[0, 4],
                                                            train_timestep_fraction=0.5), generator=gen())
    assert half.train_step_indices.shape == (4, 2)
    blocky = sample_rollout(policy, PROMPTS * 2, sampling_cfg(num_inference_steps=5, sde_window=[0, 2],
                                                              noise_block=2), generator=gen())
    assert blocky.noise_block == 2
    for step in (0, 1):
        new = rescore_log_prob(policy, blocky, step)
        torch.testing.assert_close(new.log_prob, blocky.log_probs[:, step], atol=1e-5, rtol=0)
        delta = blocky.latents[:, step + 1] - new.mean
        torch.testing.assert_close(delta[..., ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1), delta,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sde_window"):
        sample_rollout(policy, PROMPTS, sampling_cfg(sde_window=[2, 9]))
    with pytest.raises(ValueError, match="different settings"):
        cat([r, sample_rollout(policy, PROMPTS, sampling_cfg(num_inference_steps=5), generator=gen())])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_lora_params_only(checkpointing):
    policy = tuned_policy(gradient_checkpointing=checkpointing)
    r = sample_rollout(policy, PROMPTS, sampling_cfg(), generator=gen())
    assert not r.latents.requires_grad and not r.log_probs.requires_grad
    out = rescore_log_prob(policy, r, r.train_step_indices[:, 1])
    out.log_prob.sum().backward()
    lora = policy.trainable_parameters()
    assert all(p.grad is not None for p in lora) and sum(p.grad.abs().sum() for p in lora) > 0
    frozen = [p for p in policy.pipeline.transformer.parameters() if not p.requires_grad]
    frozen += list(policy.pipeline.vae.parameters()) + list(policy.pipeline.text_encoder.parameters())
    assert frozen and all(p.grad is None for p in frozen)
    grads = torch.cat([p.grad.flatten() for p in lora])
    if checkpointing:  # identical to the plain backward
        plain = tuned_policy()
        rescore_log_prob(plain, r, r.train_step_indices[:, 1]).log_prob.sum().backward()
        torch.testing.assert_close(grads, torch.cat([p.grad.flatten() for p in plain.trainable_parameters()]))


def test_sampling_without_cfg_and_bad_configs():
    policy = build_policy(model_cfg(), device="cpu")
    r = sample_rollout(policy, PROMPTS, sampling_cfg(guidance_scale=1.0), generator=gen(), decode=False)
    assert r.negative_prompt_embeds is None and r.videos is None
    torch.testing.assert_close(torch.exp(rescore_log_prob(policy, r, 1).log_prob - r.log_probs[:, 1]), torch.ones(2),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="4k\\+1"):
        sample_rollout(policy, PROMPTS, sampling_cfg(num_frames=6))
    with pytest.raises(ValueError, match="train_timestep_fraction"):
        sample_rollout(policy, PROMPTS, sampling_cfg(train_timestep_fraction=0.0))
    with pytest.raises(ValueError, match="list of strings"):
        sample_rollout(policy, "one prompt", sampling_cfg())
    with pytest.raises(IndexError, match="out of range"):
        rescore_log_prob(policy, r, 4)
    with pytest.raises(ValueError, match="sde_type must be one of"):
        sample_rollout(policy, PROMPTS, sampling_cfg(sde_type="dance"))


# ------------------------------------------------------------------ Rollout container
def _toy_rollout(b=4, t=3, offset=0.0):
    return Rollout(
        prompts=[f"p{i}" for i in range(b)], prompt_embeds=torch.arange(b * 2 * 3.0).view(b, 2, 3) + offset,
        negative_prompt_embeds=None, latents=torch.randn(b, t + 1, 2, 1, 2, 2), log_probs=torch.randn(b, t),
        timesteps=torch.tensor([1000.0, 600.0, 300.0]), sigmas=torch.tensor([1.0, 0.6, 0.3, 0.0]),
        train_step_indices=torch.tensor([[0, 1]] * b), videos=torch.rand(b, 5, 3, 8, 8), guidance_scale=4.0,
        eta=0.3,
    )


def test_rollout_select_split_chunk_cat_roundtrip():
    r = _toy_rollout()
    sub = r.index_select([3, 1])
    assert sub.prompts == ["p3", "p1"] and torch.equal(sub.latents, r.latents[[3, 1]])
    assert torch.equal(sub.videos, r.videos[[3, 1]]) and torch.equal(sub.sigmas, r.sigmas)
    assert [len(c) for c in r.chunk(3)] == [2, 2] and [len(c) for c in r.split(3)] == [3, 1]
    back = cat(r.split(3))
    assert back.prompts == r.prompts and torch.equal(back.log_probs, r.log_probs)
    assert torch.equal(back.prompt_embeds, r.prompt_embeds) and back.negative_prompt_embeds is None
    assert r.to("cpu").latents.device.type == "cpu"
    mask = torch.tensor([True, False, False, True])
    assert r.index_select(mask).prompts == ["p0", "p3"]


def test_rollout_rejects_inconsistent_shapes_and_settings():
    r = _toy_rollout()
    with pytest.raises(ValueError, match="log_probs"):
        Rollout(**{**r.__dict__, "log_probs": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="different settings"):
        cat([r, Rollout(**{**r.__dict__, "eta": 0.5})])
    with pytest.raises(ValueError, match="different settings"):
        cat([r, Rollout(**{**r.__dict__, "sde_type": "dance_grpo"})])
    with pytest.raises(IndexError):
        r.index_select([7])


# ------------------------------------------------------------------ dtypes, devices, real configs
def _bf16_ratio_check(device):
    from pisces_rl.models import VideoPolicy, get_family

    policy = VideoPolicy(build_tiny_wan_pipeline(0), get_family("wan"), dtype=torch.bfloat16, device=device,
                         lora_rank=4, lora_alpha=4)
    assert policy.transformer.proj_out.weight.dtype == torch.bfloat16
    assert policy.transformer.scale_shift_table.dtype == torch.float32  # Wan's keep-in-fp32 modules
    assert policy.pipeline.vae.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    r = sample_rollout(policy, PROMPTS * 2, sampling_cfg(), generator=gen())
    assert r.latents.dtype == r.log_probs.dtype == torch.float32 and r.prompt_embeds.dtype == torch.bfloat16
    steps = torch.tensor([0, 1, 2, 0], device=device)
    new = rescore_log_prob(policy, r, steps[:2], batch_indices=[1, 3])
    old = r.log_probs[[1, 3]].gather(1, steps[:2, None]).squeeze(1)
    # bf16 matmuls may differ slightly with the batch composition: 1e-3 instead of the fp32 1e-5
    torch.testing.assert_close(torch.exp(new.log_prob - old), torch.ones(2, device=device), atol=1e-3, rtol=0)
    new.log_prob.sum().backward()
    assert sum(p.grad.abs().sum() for p in policy.trainable_parameters()) > 0


def test_bf16_base_keeps_lora_and_sampling_in_fp32():
    _bf16_ratio_check("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_policy_on_cuda():
    _bf16_ratio_check("cuda")


def test_works_with_the_real_config_dataclasses():
    config = pytest.importorskip("pisces_rl.config")
    policy = build_policy(config.ModelConfig(lora_rank=2), device="cpu")
    r = sample_rollout(policy, PROMPTS, config.SamplingConfig(num_inference_steps=2), generator=gen())
    assert r.latents.shape[:2] == (2, 3) and r.videos.shape == (2, 5, 3, 32, 32)


def test_shipped_recipes_use_their_sources_sde_type():
    """The PISCES-paper Wan recipes sample like the PISCES code (DanceGRPO's ``flux_step``, eta 0.25); the CPU
    recipes keep Flow-GRPO's noise, with which they have been run; the ε-prediction UNet recipe samples like DDPO
    (``ddim``). Each config states the type explicitly."""
    import glob
    import os

    from pisces_rl.config import BackpropConfig, GRPOConfig, load_config

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "configs", "*.yaml")))
    assert paths
    for path in paths:
        name = os.path.basename(path)
        with open(path) as f:
            assert "\n  sde_type: " in f.read(), f"{name} does not state its sampling.sde_type"
        cfg = load_config(BackpropConfig if name.startswith("backprop") else GRPOConfig, path)
        vp = "text_to_video_sd" in name or "cogvideox" in name
        expected = "flow_grpo" if name.endswith("_cpu.yaml") else "ddim" if vp else "dance_grpo"
        assert cfg.sampling.sde_type == expected, name
