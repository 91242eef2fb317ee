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
