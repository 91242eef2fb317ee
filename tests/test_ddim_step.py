"""The ``"ddim"`` noise type (DDPO's stochastic DDIM step) against a re-implementation of DDPO's
``ddim_step_with_logprob`` on diffusers' ``DDIMScheduler``, in VP coordinates."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from pisces_rl.models.vp import alpha_bar_at, vp_flow_schedule, vp_velocity
from pisces_rl.rollout import sde_std_table, sde_step_with_logprob
from pisces_rl.trainer.losses import gaussian_kl


def sd_ddim(**overrides):
    """Stable Diffusion's DDIM scheduler settings (the config of runwayml/stable-diffusion-v1-5, DDPO's base model)."""
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    cfg.update(overrides)
    return DDIMScheduler(**cfg)


def ddpo_step(sched, model_output, timestep, sample, eta, noise):
    """kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``, ``ddim_step_with_logprob`` and
    ``_get_variance``, line by line for epsilon prediction without clipping (steps 1-7 and the log-prob), except
    that the previous timestep is not clamped to 0 before ``prev_timestep >= 0`` is tested, so the last step uses
    ``final_alpha_cumprod`` as diffusers' ``DDIMScheduler.step`` does. Returns ``(prev_sample, log_prob, mean, std)``."""
    prev_timestep = timestep - sched.config.num_train_timesteps // sched.num_inference_steps
    alpha_prod_t = sched.alphas_cumprod[timestep]
    alpha_prod_t_prev = sched.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sched.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    pred_epsilon = model_output
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean, std_dev_t


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_type_is_ddpos_step_in_vp_coordinates(eta):
    """(a) DDPO's mean, std, sample and log-prob (VP coordinates) from the flow-coordinate step: x = z / (a + b),
    v = vp_velocity(eps), results times (a' + b'). Every step of a 10-step SD grid, float32, atol 2e-5."""
    sched = sd_ddim()
    n = 10
    timesteps, sigmas = vp_flow_schedule(sched, n, torch.device("cpu"))
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        t = int(timesteps[i])
        z, eps, noise = (torch.randn(2, 4, 2, 4, 4, generator=g) for _ in range(3))
        ref_prev, ref_lp, ref_mean, ref_std = ddpo_step(sched, eps, t, z, eta, noise)
        ab = alpha_bar_at(sched, timesteps[i].expand(2), z)
        ab_next = sched.alphas_cumprod[t - 100] if t >= 100 else sched.final_alpha_cumprod
        scale, scale_next = ab.sqrt() + (1 - ab).sqrt(), ab_next.sqrt() + (1 - ab_next).sqrt()
        step = sde_step_with_logprob(vp_velocity(eps, z, ab, "epsilon"), z / scale, sigmas[i], sigmas[i + 1], eta,
                                     noise=noise, sde_type="ddim")
        torch.testing.assert_close(step.mean * scale_next, ref_mean, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(step.std.flatten() * scale_next, ref_std.float().expand(2), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(step.prev_sample * scale_next, ref_prev, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(step.log_prob, ref_lp, atol=2e-5, rtol=1e-5)
        again = sde_step_with_logprob(vp_velocity(eps, z, ab, "epsilon"), z / scale, sigmas[i], sigmas[i + 1], eta,
                                      prev_sample=step.prev_sample, sde_type="ddim")
        assert torch.equal(again.log_prob, step.log_prob)   # (b) scoring mode: ratio exactly 1


def test_ddim_eta_zero_is_exactly_euler_and_the_std_table():
    """At eta = 0 the ddim type is the flow Euler step bit for bit; (c) the std table is DDPO's std_dev_t / (a'+b')
    on the 50-step SD grid (DDPO's sample.num_steps); the last step to sigma' = 0 (set_alpha_to_one) is
    deterministic; eta scales it linearly and the SDE window zeroes the steps outside."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    for sigma, sigma_next in [(1.0, 0.9), (0.7, 0.4), (0.05, 0.01), (0.3, 0.0)]:
        ode = sde_step_with_logprob(v, x, sigma, sigma_next, 0.0, sde_type="ddim", generator=g)
        dt = torch.tensor(sigma_next) - torch.tensor(sigma)                      # float32, as in the step
        assert torch.equal(ode.prev_sample, x + v * dt)
        assert torch.equal(ode.prev_sample, sde_step_with_logprob(v, x, sigma, sigma_next, 0.0).prev_sample)
        assert torch.equal(ode.log_prob, torch.zeros(3))
    sched = sd_ddim(set_alpha_to_one=True)
    _, sigmas = vp_flow_schedule(sched, 50, torch.device("cpu"))
    std, total = sde_std_table(sigmas.double(), 1.0, "ddim")
    sched.set_timesteps(50)
    ac = sched.alphas_cumprod.double()
    ts = sched.timesteps.long()
    ab, ab_prev = ac[ts], torch.cat([ac[ts[1:]], torch.ones(1, dtype=torch.float64)])
    ddpo_std = ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    torch.testing.assert_close(std, ddpo_std / (ab_prev.sqrt() + (1 - ab_prev).sqrt()), atol=1e-6, rtol=1e-5)
    assert std[-1] == 0 and total == pytest.approx(float(std.square().sum()))
    half, _ = sde_std_table(sigmas.double(), 0.5, "ddim", sde_window=(0, 10))
    torch.testing.assert_close(half[:10], 0.5 * std[:10])
    assert torch.equal(half[10:], torch.zeros(40, dtype=half.dtype))


def test_ddim_refuses_eta_above_one_and_handles_sigma_one():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="eta <= 1"):
        sde_step_with_logprob(x, x, 1.0, 0.8, 1.2, sde_type="ddim")
    step = sde_step_with_logprob(x, x, 1.0, 0.8, 0.5, generator=torch.Generator().manual_seed(0), sde_type="ddim")
    torch.testing.assert_close(step.std.flatten(), torch.full((2,), 0.4))      # eta * sigma' at alpha_bar = 0
    assert torch.isfinite(step.log_prob).all()


def test_ddim_kl_is_the_vp_kl_times_dsigma():
    """The trainer's KL (gaussian_kl with dt) for ddim: |dsigma| * mean_d (mu - mu_ref)^2 / (2 std^2), and the exact
    part mean_d (mu - mu_ref)^2 / (2 std^2) is the same in flow and VP coordinates (both scaled by a' + b')."""
    g = torch.Generator().manual_seed(2)
    x, v, v_ref = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    a = sde_step_with_logprob(v, x, 0.6, 0.5, 1.0, generator=g, sde_type="ddim")
    b = sde_step_with_logprob(v_ref, x, 0.6, 0.5, 1.0, prev_sample=a.prev_sample, sde_type="ddim")
    exact = gaussian_kl(a.mean, b.mean, a.std)
    scale = 1 / math.sqrt(0.5**2 + 0.5**2)          # a' + b' at sigma' = 0.5
    vp = ((a.mean - b.mean) * scale).square().mean(dim=(1, 2, 3)) / (2 * (a.std.flatten() * scale) ** 2)
    torch.testing.assert_close(exact, vp)
    torch.testing.assert_close(gaussian_kl(a.mean, b.mean, a.std, dt=-0.1), 0.1 * exact)


def _toy_gradients(sde_type, eta, n=200_000, d=4, seed=0, shuffle=False):
    """A 3-step toy sampler on [n, d] latents (sigmas 1, 0.7, 0.4, 0) whose velocity ``(1 + theta_i) x`` has one
    parameter per step, and a non-linear reward ``sum_d w_d (x_T - 0.5)^2``: the pathwise gradient (noise held fixed)
    and the score-function (GRPO / REINFORCE, mean baseline) estimate of d E[r] / d theta for the two stochastic
    steps (the last, deterministic step's parameter is left out, as no score-function estimator credits it)."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.tensor([1.0, 0.7, 0.4, 0.0])
    theta = torch.tensor([0.5, -0.4, 0.3], requires_grad=True)
    w = torch.tensor([1.0, -0.5, 0.3, 0.8])
    x = torch.randn(n, d, generator=g)
    xs = [x]
    for i in range(3):
        step = sde_step_with_logprob((1 + theta[i]) * x, x, sig[i], sig[i + 1], eta,
                                     noise=torch.randn(n, d, generator=g), sde_type=sde_type)
        x = step.prev_sample
        xs.append(x)
    r = ((x - 0.5) ** 2 * w).sum(-1)
    pathwise = torch.autograd.grad(r.mean(), theta)[0][:2]
    log_p = 0
    for i in range(2):   # log_prob is the mean over the d elements: d * log_prob is the density of the step
        xi = xs[i].detach()
        log_p = log_p + d * sde_step_with_logprob((1 + theta[i]) * xi, xi, sig[i], sig[i + 1], eta,
                                                  prev_sample=xs[i + 1].detach(), sde_type=sde_type).log_prob
    r = r.detach()
    r = r[torch.randperm(n, generator=g)] if shuffle else r
    score = torch.autograd.grad(((r - r.mean()) * log_p).mean(), theta)[0][:2]
    return pathwise, score


@pytest.mark.parametrize("sde_type, eta, n", [("ddim", 1.0, 200_000), ("ddim", 0.5, 800_000), ("flow_grpo", 0.7, 200_000)])
def test_ddim_score_function_gradient_is_unbiased_on_a_toy(sde_type, eta, n):
    """(d) The unbiasedness check on a toy where every SDE step has a sizeable std (the tiny-Wan check of
    tests/test_grpo_unbiased.py cannot resolve ddim at its budget: there DDIM's second step has std 0.006). The
    score-function estimate from the ddim step's log-prob equals the pathwise gradient within 5e-3 (200k samples;
    800k at eta 0.5, whose halved std quadruples the estimator's variance; measured errors <= 2e-3 for ddim at eta 1
    on seeds 0 and 1, gradients ~0.07); with the rewards shuffled it does not."""
    pathwise, score = _toy_gradients(sde_type, eta, n=n)
    assert pathwise.abs().max() > 0.05
    torch.testing.assert_close(score, pathwise, atol=5e-3, rtol=0)
    _, shuffled = _toy_gradients(sde_type, eta, n=n, shuffle=True)
    assert (shuffled - pathwise).abs().max() > 0.03
