"""Policy loss, Gaussian KL and pseudo-Huber distance against hand-computed numbers."""
import math

import pytest
import torch

from pisces_rl.rollout.sde import sde_step_with_logprob
from pisces_rl.trainer.losses import clipped_policy_loss, gaussian_kl, pseudo_huber


def test_clipped_loss_hand_computed():
    # ratios 1, 1.5, 0.5 with eps = 0.2 and advantages +1, +1, -1:
    #   l0 = max(-1, -1) = -1;  l1 = max(-1.5, -1.2) = -1.2;  l2 = max(0.5, 0.8) = 0.8
    lp = torch.tensor([0.0, math.log(1.5), math.log(0.5)], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, stats = clipped_policy_loss(lp, old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3, abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["ratio_min"].item() == pytest.approx(0.5, abs=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(loss.item())
    loss.backward()
    # only the unclipped sample carries gradient: d/dlp0 (-A0 * exp(lp0)) / 3 = -1/3
    torch.testing.assert_close(lp.grad, torch.tensor([-1 / 3, 0.0, 0.0]))


def test_ratio_one_gives_policy_gradient():
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0])
    loss, stats = clipped_policy_loss(lp, lp.detach().clone(), adv, clip_range=1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 4)


def test_per_reward_surrogates_are_weighted_and_summed():
    lp = torch.tensor([math.log(1.5), 0.0])
    old = torch.zeros(2)
    adv = torch.tensor([[1.0, -2.0], [-1.0, 3.0]])       # [B=2, R=2]
    loss, _ = clipped_policy_loss(lp, old, adv, clip_range=0.2, weights=[1.0, 0.5])
    # reward 0: max(-1.5, -1.2) = -1.2 ; max(1, 1) = 1        -> mean -0.1
    # reward 1: max(3.0, 2.4) = 3.0     ; max(-3, -3) = -3    -> mean 0.0
    assert loss.item() == pytest.approx(1.0 * -0.1 + 0.5 * 0.0, abs=1e-6)
    loss_eq, _ = clipped_policy_loss(lp, old, adv, clip_range=0.2)
    assert loss_eq.item() == pytest.approx(-0.1, abs=1e-6)


def test_clipped_loss_errors():
    lp, old = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="clip_range"):
        clipped_policy_loss(lp, old, torch.ones(3), clip_range=0.0)
    with pytest.raises(ValueError, match="old_log_prob shape"):
        clipped_policy_loss(lp, torch.zeros(2), torch.ones(3), clip_range=0.1)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, R\]"):
        clipped_policy_loss(lp, old, torch.ones(4), clip_range=0.1)
    with pytest.raises(ValueError, match="weights=None"):
        clipped_policy_loss(lp, old, torch.ones(3), clip_range=0.1, weights=[1.0])
    with pytest.raises(ValueError, match="reward columns"):
        clipped_policy_loss(lp, old, torch.ones(3, 2), clip_range=0.1, weights=[1.0, 2.0, 3.0])


def test_gaussian_kl_hand_computed_and_matches_torch_distributions():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    kl = gaussian_kl(mean, ref, std=0.5)
    # sample 0: (1 + 4) / (2 * 0.25) / 2 = 5.0 ; sample 1: 9 / 0.5 / 2 = 9.0
    torch.testing.assert_close(kl, torch.tensor([5.0, 9.0]))
    sigma = torch.tensor([0.5, 2.0])                        # one sigma per sample
    closed = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, sigma[:, None]), torch.distributions.Normal(ref, sigma[:, None])).mean(1)
    torch.testing.assert_close(gaussian_kl(mean, ref, sigma), closed)
    assert torch.equal(gaussian_kl(mean, mean.clone(), 0.3), torch.zeros(2))


def test_gaussian_kl_broadcasts_video_latents_and_rejects_zero_std():
    mean = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    ref = mean.detach() + 0.1
    kl = gaussian_kl(mean, ref, torch.full((2, 1, 1, 1, 1), 0.1))
    torch.testing.assert_close(kl, torch.full((2,), 0.5), atol=1e-5, rtol=0)   # 0.01 / (2 * 0.01)
    kl.sum().backward()
    assert mean.grad is not None
    with pytest.raises(ValueError, match="train.beta = 0"):
        gaussian_kl(mean, ref, 0.0)
    with pytest.raises(ValueError, match="std of shape .* does not broadcast"):
        gaussian_kl(mean, ref, torch.ones(3))
    with pytest.raises(ValueError, match="dt must be non-zero"):
        gaussian_kl(mean, ref, 0.1, dt=0.0)
    with pytest.raises(ValueError, match="noise_block=3 must divide"):
        gaussian_kl(mean, ref, 0.1, noise_block=3)


def _flow_grpo_mean(v, x, sigma, dt, std_dev_t):
    """``prev_sample_mean`` of yifan123/flow_grpo ``sd3_sde_with_logprob.py`` (sde_type='sde'), transcribed."""
    return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt


def test_gaussian_kl_is_flow_grpo_kl_for_one_step_with_dt_004():
    """KL on Flow-GRPO's scale (correctness review F2): for one SDE step with dt = -0.04 the trainer's KL
    equals ``((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dims) / (2 * std_dev_t ** 2)`` of
    yifan123/flow_grpo ``scripts/train_sd3.py``, where ``std_dev_t = eta * sqrt(sigma / (1 - sigma))`` is the
    4th value returned by ``sde_step_with_logprob`` (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
    without ``sqrt(-dt)``). The exact KL (variance ``std_dev_t^2 * |dt|``) is that divided by 0.04."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 4, 4, generator=g)
    v_pol, v_ref = torch.randn(2, *x.shape, generator=g)
    sigma, sigma_next, eta = 0.6, 0.56, 0.7
    dt = sigma_next - sigma
    pol = sde_step_with_logprob(v_pol, x, sigma, sigma_next, eta, generator=g)
    ref = sde_step_with_logprob(v_ref, x, sigma, sigma_next, eta, prev_sample=pol.prev_sample)

    std_dev_t = eta * math.sqrt(sigma / (1 - sigma))
    m_pol, m_ref = _flow_grpo_mean(v_pol, x, sigma, dt, std_dev_t), _flow_grpo_mean(v_ref, x, sigma, dt, std_dev_t)
    torch.testing.assert_close(pol.mean, m_pol, atol=1e-6, rtol=1e-6)
    flow_grpo_kl = ((m_pol - m_ref) ** 2).mean(dim=(1, 2, 3, 4)) / (2 * std_dev_t**2)          # [B]
    assert (flow_grpo_kl > 0).all()

    ours = gaussian_kl(pol.mean, ref.mean, pol.std, dt=torch.full((2,), dt))
    torch.testing.assert_close(ours, flow_grpo_kl, atol=0, rtol=1e-5)
    exact = gaussian_kl(pol.mean, ref.mean, pol.std)
    torch.testing.assert_close(exact, flow_grpo_kl / 0.04, atol=0, rtol=1e-5)
    # the exact KL is E_p[log p - log q] (with equal stds, log p - log q at p's mean), from the step log-probs
    at_mean = [sde_step_with_logprob(v, x, sigma, sigma_next, eta, prev_sample=pol.mean).log_prob
               for v in (v_pol, v_ref)]
    torch.testing.assert_close(exact, at_mean[0] - at_mean[1], atol=1e-5, rtol=1e-4)


def test_gaussian_kl_anchor_scale_with_dance_grpo_std():
    """With DanceGRPO's step std ``eta * sqrt(|dt|)`` (XueZeyue/DanceGRPO ``flux_step``; PISCES
    ``distill_grpo.py``) the same convention divides by the diffusion coefficient ``g^2 = eta^2``."""
    mean, ref = torch.tensor([[0.02, -0.01, 0.0, 0.03]]), torch.zeros(1, 4)
    eta, dt = 0.3, -0.04
    expected = (mean**2).mean() / (2 * eta**2)
    torch.testing.assert_close(gaussian_kl(mean, ref, std=eta * math.sqrt(-dt), dt=dt), expected.reshape(1))


def test_gaussian_kl_with_noise_block_uses_the_block_averaged_mean_difference():
    """With ``noise_block = k`` the step density is on the block-constant subspace (``pisces_rl.rollout.sde``,
    coordinates ``U^T y = k * avgpool_k(y)``), so the KL, read off the rollout's own step log-probs as
    ``log p(mu_p) - log q(mu_p)``, depends only on block averages of the mean difference (review F9)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 4, 4, generator=g)
    v_pol, v_ref = torch.randn(2, *x.shape, generator=g)
    sigma, sigma_next, eta, k = 0.8, 0.72, 0.5, 2
    pol = sde_step_with_logprob(v_pol, x, sigma, sigma_next, eta, generator=g, noise_block=k)
    ref = sde_step_with_logprob(v_ref, x, sigma, sigma_next, eta, prev_sample=pol.prev_sample, noise_block=k)
    lp = [sde_step_with_logprob(v, x, sigma, sigma_next, eta, prev_sample=pol.mean, noise_block=k).log_prob
          for v in (v_pol, v_ref)]
    kl = gaussian_kl(pol.mean, ref.mean, pol.std, noise_block=k)
    torch.testing.assert_close(kl, lp[0] - lp[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(kl, gaussian_kl(pol.mean, ref.mean, pol.std), rtol=0.05)   # unprojected differs
    # a mean difference with zero block averages (a checkerboard) is off the subspace: no KL
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0        # [4, 4] +-1
    zero = torch.zeros_like(ref.mean)
    assert torch.equal(gaussian_kl(zero + 0.1 * checker, zero, pol.std, noise_block=k), torch.zeros(2))
    assert gaussian_kl(zero + 0.1 * checker, zero, pol.std).min() > 0                     # unprojected: > 0


def test_pseudo_huber_is_elementwise_as_in_the_pisces_code():
    """Element-wise pseudo-Huber of roar-ai/pisces ``fastvideo/distill_grpo.py`` (and diffusers'
    ``train_lcm_distill_*.py --loss_type huber``): ``mean(sqrt((pred - target) ** 2 + c ** 2) - c)``. On
    d = [0.1, 0, 0, 0] it is 0.02475; the RMS-like form ``sqrt(mean(d^2) + c^2) - c`` gave 0.049 (review F5)."""
    x, y, c = torch.tensor([[0.1, 0.0, 0.0, 0.0]]), torch.zeros(1, 4), 0.001
    reference = torch.mean(torch.sqrt((x - y) ** 2 + c**2) - c)
    assert reference.item() == pytest.approx((math.sqrt(0.01 + 1e-6) - 0.001) / 4)
    torch.testing.assert_close(pseudo_huber(x, y, c), reference.reshape(1))
    assert pseudo_huber(x, y, c).item() == pytest.approx(0.02475, abs=1e-5)
    # the batch mean of per-sample values is the reference's mean over the whole batch
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 2, 4, 4, generator=g)
    torch.testing.assert_close(pseudo_huber(a, b, c).mean(), torch.mean(torch.sqrt((a - b) ** 2 + c**2) - c))


def test_pseudo_huber_hand_computed():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    d = pseudo_huber(x, y, c=0.5)
    # sample 0: ((sqrt(9 + 0.25) - 0.5) + (sqrt(16 + 0.25) - 0.5)) / 2 ; sample 1 (x == y): 0
    torch.testing.assert_close(d, torch.tensor([(math.sqrt(9.25) + math.sqrt(16.25)) / 2 - 0.5, 0.0]))
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros(2))
    # default c = 0.001: close to the mean absolute (L1) distance for large differences
    assert pseudo_huber(x.detach(), y)[0].item() == pytest.approx(3.5, abs=1.1e-3)
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(x, y, c=0.0)
    with pytest.raises(ValueError, match="shape"):
        pseudo_huber(x, y[:1])
