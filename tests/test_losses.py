"""Policy loss, Gaussian KL and pseudo-Huber distance against hand-computed numbers."""
import math

import pytest
import torch

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
    with pytest.raises(ValueError, match="kl_beta"):
        gaussian_kl(mean, ref, 0.0)
    with pytest.raises(ValueError, match="broadcast"):
        gaussian_kl(mean, ref, torch.ones(3))


def test_pseudo_huber_hand_computed():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    d = pseudo_huber(x, y, c=0.5)
    # sample 0: sqrt(25 / 2 + 0.25) - 0.5 ; sample 1 (x == y): 0
    torch.testing.assert_close(d, torch.tensor([math.sqrt(12.75) - 0.5, 0.0]))
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros(2))
    # default c = 0.001: close to the RMS distance for large differences
    assert pseudo_huber(x.detach(), y)[0].item() == pytest.approx(math.sqrt(12.5), abs=1.1e-3)
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(x, y, c=0.0)
    with pytest.raises(ValueError, match="shape"):
        pseudo_huber(x, y[:1])
