"""Group-normalised advantages, checked against hand-computed values."""
import math

import pytest
import torch

from pisces_rl.trainer.advantages import group_advantages, group_index

NAN = float("nan")


def test_single_group_uses_population_std():
    # mean 2.5, population std sqrt(1.25) = 1.118034 (unbiased would be sqrt(5/3) = 1.290994)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([7, 7, 7, 7]))
    s = math.sqrt(1.25)
    expected = torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert adv.dtype == torch.float32 and adv.shape == (4,)


def test_groups_are_independent_and_labels_can_be_strings():
    scores = torch.tensor([1.0, 10.0, 3.0, 30.0])
    adv = group_advantages(scores, ["a cat", "a dog", "a cat", "a dog"])
    torch.testing.assert_close(adv, torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-6, rtol=0)


def test_sum_mode_weights_rewards_before_normalising():
    # one group of three: totals w0 * s0 + w1 * s1
    scores = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    a = group_advantages(scores, [0, 0, 0], weights=[1.0, 1.0])   # totals 0, 1, 3: mean 4/3
    std_a = math.sqrt(((0 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 3)
    torch.testing.assert_close(a, torch.tensor([-4 / 3, -1 / 3, 5 / 3]) / std_a, atol=1e-6, rtol=0)
    b = group_advantages(scores, [0, 0, 0], weights=[1.0, 0.0])   # totals 0, 1, 0: mean 1/3
    torch.testing.assert_close(b, torch.tensor([-1 / 3, 2 / 3, -1 / 3]) / math.sqrt(2 / 9), atol=1e-6, rtol=0)
    # default weights are 1, and a [B] input is taken as the already-combined total
    torch.testing.assert_close(group_advantages(scores, [0, 0, 0]), a)
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 1.0, 3.0]), [0, 0, 0]), a)


def test_per_reward_mode_normalises_each_column():
    scores = torch.tensor([[1.0, 5.0], [3.0, 5.0], [0.0, 2.0], [0.0, 8.0]])
    adv = group_advantages(scores, [0, 0, 1, 1], mode="per_reward", weights=[1.0, 0.5])
    expected = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    # weights are applied by the loss in this mode, not here
    torch.testing.assert_close(group_advantages(scores, [0, 0, 1, 1], mode="per_reward"), expected)


def test_zero_variance_groups_give_exact_zeros():
    # 0.1 is not representable; rounding noise divided by eps would give large values
    scores = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7], dtype=torch.float32)
    adv = group_advantages(scores, [0, 0, 0, 1, 1, 1, 1])
    assert torch.equal(adv, torch.zeros(7))
    # a group with a single member also has zero variance
    assert torch.equal(group_advantages(torch.tensor([3.0, 1.0, 2.0]), [0, 1, 1])[0], torch.tensor(0.0))


def test_nan_samples_get_zero_and_are_excluded_from_stats():
    # valid members 1 and 3: mean 2, std 1 -> (-1, +1); NaN member -> 0
    adv = group_advantages(torch.tensor([1.0, NAN, 3.0]), [0, 0, 0])
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    assert not torch.isnan(adv).any()
    # an all-NaN group is 0 everywhere
    assert torch.equal(group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0]), [0, 0, 1, 1])[:2], torch.zeros(2))


def test_nan_handling_per_reward_and_sum():
    scores = torch.tensor([[1.0, NAN], [2.0, 1.0], [3.0, 3.0]])
    per = group_advantages(scores, [0, 0, 0], mode="per_reward")
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(per[:, 0], torch.tensor([-1 / s, 0.0, 1 / s]), atol=1e-6, rtol=0)
    torch.testing.assert_close(per[:, 1], torch.tensor([0.0, -1.0, 1.0]), atol=1e-6, rtol=0)
    # sum mode: NaN rewards drop out of the sample's sum -> totals 1, 3, 6 (mean 10/3)
    tot = group_advantages(scores, [0, 0, 0], mode="sum")
    dev = torch.tensor([1.0, 3.0, 6.0]) - 10 / 3
    torch.testing.assert_close(tot, dev / dev.pow(2).mean().sqrt(), atol=1e-6, rtol=0)
    # a sample whose rewards are all NaN gets 0
    assert group_advantages(torch.tensor([[NAN, NAN], [1.0, 2.0], [2.0, 2.0]]), [0, 0, 0])[0] == 0


def test_clipping():
    # nine zeros and a one: mean 0.1, std 0.3 -> the outlier gets 3.0, the others -1/3
    scores = torch.tensor([0.0] * 9 + [1.0])
    ids = [0] * 10
    assert group_advantages(scores, ids, clip=None)[-1].item() == pytest.approx(3.0, abs=1e-6)
    adv = group_advantages(scores, ids, clip=2.0)
    assert adv[-1].item() == pytest.approx(2.0) and adv[0].item() == pytest.approx(-1 / 3, abs=1e-6)


def test_group_size_check_detects_split_groups():
    scores = torch.tensor([1.0, 2.0, 3.0])
    group_advantages(scores, [0, 0, 0], group_size=3)
    with pytest.raises(ValueError, match="split a group"):
        group_advantages(scores, [0, 0, 1], group_size=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=torch.tensor([1.0, float("inf")]), group_ids=[0, 0]), "inf"),
    (dict(scores=torch.tensor([1.0, 2.0]), group_ids=[0, 0, 0]), "one group id per sample"),
    (dict(scores=torch.ones(2, 2), group_ids=[0, 0], weights=[1.0]), "one weight per reward"),
    (dict(scores=torch.ones(2), group_ids=[0, 0], mode="mean"), "advantage_mode"),
    (dict(scores=torch.ones(2, 2, 2), group_ids=[0, 0]), r"\[B\] or \[B, R\]"),
    (dict(scores=torch.ones(2), group_ids=[0, 0], clip=0.0), "adv_clip_max"),
])
def test_bad_input_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)


def test_group_index():
    inv, n = group_index(["b", "a", "b", "c"])
    assert inv.tolist() == [0, 1, 0, 2] and n == 3
    inv, n = group_index(torch.tensor([5, 2, 5]))
    assert inv.tolist() == [1, 0, 1] and n == 2
    with pytest.raises(TypeError, match="integer"):
        group_index(torch.tensor([0.0, 1.0]))
