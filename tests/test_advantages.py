"""Group-baseline advantages, checked against hand-computed values and Flow-GRPO's / trl's formulas."""
import math

import numpy as np
import pytest
import torch

from pisces_rl.trainer.advantages import group_advantages, group_index

NAN = float("nan")
EPS = 1e-4  # added to the std by trl's GRPOTrainer and flow_grpo/stat_tracking.py


def flow_grpo_advantages(prompts, rewards, global_std):
    """``PerPromptStatTracker(global_std).update(prompts, rewards)`` of yifan123/flow_grpo
    ``flow_grpo/stat_tracking.py`` (type 'grpo', fresh tracker), transcribed: per-prompt mean, and ``np.std``
    of the prompt's rewards or, with ``global_std``, of all rewards, plus 1e-4."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.zeros_like(rewards)
    for prompt in np.unique(prompts):
        r = rewards[prompts == prompt]
        std = (np.std(rewards) if global_std else np.std(r)) + 1e-4
        adv[prompts == prompt] = (r - np.mean(r)) / std
    return torch.tensor(adv, dtype=torch.float32)


def test_single_group_uses_population_std():
    # mean 2.5, population std sqrt(1.25) = 1.118034 (unbiased would be sqrt(5/3) = 1.290994)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([7, 7, 7, 7]))
    s = math.sqrt(1.25) + EPS
    expected = torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert adv.dtype == torch.float32 and adv.shape == (4,)


def test_groups_are_independent_and_labels_can_be_strings():
    scores = torch.tensor([1.0, 10.0, 3.0, 30.0])
    adv = group_advantages(scores, ["a cat", "a dog", "a cat", "a dog"])
    expected = torch.tensor([-1.0 / (1 + EPS), -10.0 / (10 + EPS), 1.0 / (1 + EPS), 10.0 / (10 + EPS)])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_sum_mode_weights_rewards_before_normalising():
    # one group of three: totals w0 * s0 + w1 * s1
    scores = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    a = group_advantages(scores, [0, 0, 0], weights=[1.0, 1.0])   # totals 0, 1, 3: mean 4/3
    std_a = math.sqrt(((0 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 3) + EPS
    torch.testing.assert_close(a, torch.tensor([-4 / 3, -1 / 3, 5 / 3]) / std_a, atol=1e-6, rtol=0)
    b = group_advantages(scores, [0, 0, 0], weights=[1.0, 0.0])   # totals 0, 1, 0: mean 1/3
    torch.testing.assert_close(b, torch.tensor([-1 / 3, 2 / 3, -1 / 3]) / (math.sqrt(2 / 9) + EPS), atol=1e-6, rtol=0)
    # default weights are 1, and a [B] input is taken as the already-combined total
    torch.testing.assert_close(group_advantages(scores, [0, 0, 0]), a)
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 1.0, 3.0]), [0, 0, 0]), a)


def test_per_reward_mode_normalises_each_column():
    scores = torch.tensor([[1.0, 5.0], [3.0, 5.0], [0.0, 2.0], [0.0, 8.0]])
    adv = group_advantages(scores, [0, 0, 1, 1], mode="per_reward", weights=[1.0, 0.5])
    expected = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -3.0], [0.0, 3.0]])   # deviations from group means
    expected = expected / torch.tensor([[1 + EPS, 3 + EPS]])            # group stds 1 (reward 0), 3 (reward 1)
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
    # valid members 1 and 3: mean 2, std 1 -> (-1, +1) / (1 + eps); NaN member -> 0
    adv = group_advantages(torch.tensor([1.0, NAN, 3.0]), [0, 0, 0])
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]) / (1 + EPS), atol=1e-6, rtol=0)
    assert not torch.isnan(adv).any()
    # an all-NaN group is 0 everywhere
    assert torch.equal(group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0]), [0, 0, 1, 1])[:2], torch.zeros(2))


def test_nan_handling_per_reward_and_sum():
    scores = torch.tensor([[1.0, NAN], [2.0, 1.0], [3.0, 3.0]])
    per = group_advantages(scores, [0, 0, 0], mode="per_reward")
    s = math.sqrt(2 / 3) + EPS
    torch.testing.assert_close(per[:, 0], torch.tensor([-1 / s, 0.0, 1 / s]), atol=1e-6, rtol=0)
    torch.testing.assert_close(per[:, 1], torch.tensor([0.0, -1.0, 1.0]) / (1 + EPS), atol=1e-6, rtol=0)
    # sum mode: NaN rewards drop out of the sample's sum -> totals 1, 3, 6 (mean 10/3)
    tot = group_advantages(scores, [0, 0, 0], mode="sum")
    dev = torch.tensor([1.0, 3.0, 6.0]) - 10 / 3
    torch.testing.assert_close(tot, dev / (dev.pow(2).mean().sqrt() + EPS), atol=1e-6, rtol=0)
    # a sample whose rewards are all NaN gets 0
    assert group_advantages(torch.tensor([[NAN, NAN], [1.0, 2.0], [2.0, 2.0]]), [0, 0, 0])[0] == 0


def test_clipping():
    # nine zeros and a one: mean 0.1, std 0.3 -> the outlier gets 0.9 / 0.3001, the others -0.1 / 0.3001
    scores = torch.tensor([0.0] * 9 + [1.0])
    ids = [0] * 10
    assert group_advantages(scores, ids, clip=None)[-1].item() == pytest.approx(0.9 / (0.3 + EPS), abs=1e-6)
    adv = group_advantages(scores, ids, clip=2.0)
    assert adv[-1].item() == pytest.approx(2.0) and adv[0].item() == pytest.approx(-0.1 / (0.3 + EPS), abs=1e-6)


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


# ----------------------------------------------------------------------------- scale_rewards
def test_near_tied_group_is_blown_up_by_group_scaling_but_not_by_batch_scaling():
    """Correctness review F8: per-group std turns a near-tied group into +-1 advantages of pure noise; the
    batch std (Flow-GRPO ``global_std=True``, trl ``scale_rewards="batch"``) keeps it near 0 when another
    group spreads. Both checked against the transcription of flow_grpo's ``PerPromptStatTracker``."""
    tied = torch.tensor([0.5, 0.5 + 1e-6, 0.0, 1.0], dtype=torch.float64)        # group 0 near-tied, group 1 spread
    ids = [0, 0, 1, 1]
    # the old eps (1e-8 -> 0 here) turned a 1e-6 gap into exactly +-1
    assert group_advantages(tied, ids, scale="group", eps=0.0)[:2].tolist() == [-1.0, 1.0]
    group = group_advantages(tied, ids, scale="group")                       # eps = 1e-4 damps gaps << eps
    torch.testing.assert_close(group[:2], torch.tensor([-5e-7, 5e-7]) / (5e-7 + EPS), atol=1e-6, rtol=0)
    batch = group_advantages(tied, ids, scale="batch")
    assert batch[:2].abs().max() < 1e-5 and batch[3].item() == pytest.approx(0.5 / (tied.std(unbiased=False) + EPS))

    noisy = [0.50, 0.51, 0.0, 1.0]                                            # a tie within reward noise (> eps)
    group = group_advantages(torch.tensor(noisy), ids, scale="group")
    batch = group_advantages(torch.tensor(noisy), ids, scale="batch")
    assert group[1].item() == pytest.approx(0.005 / (0.005 + EPS), abs=1e-5) and group[1] > 0.98
    assert batch[1].item() == pytest.approx(0.005 / (np.std(noisy) + EPS), abs=1e-5) and batch[1] < 0.015
    torch.testing.assert_close(group, flow_grpo_advantages(ids, noisy, global_std=False), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch, flow_grpo_advantages(ids, noisy, global_std=True), atol=1e-5, rtol=0)


def test_scale_rewards_none_is_the_group_centred_reward():
    """trl ``scale_rewards="none"`` (Dr. GRPO): ``advantages = rewards - mean_grouped_rewards``, no std."""
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.3, 0.3, 0.3])
    adv = group_advantages(rewards, [0, 0, 0, 1, 1, 1], scale="none", clip=None)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]))


def test_batch_scale_per_reward_columns_nan_and_gathered_scores():
    scores = torch.tensor([[1.0, 10.0], [3.0, NAN], [2.0, 30.0], [6.0, 50.0]])     # [B=4, R=2], groups of 2
    ids = [0, 0, 1, 1]
    adv = group_advantages(scores, ids, mode="per_reward", scale="batch")
    # each column has its own batch std over its valid entries; NaN -> 0 and out of the stats
    std0, std1 = np.std([1.0, 3.0, 2.0, 6.0]), np.std([10.0, 30.0, 50.0])
    expected = torch.tensor([[-1 / (std0 + EPS), 0.0], [1 / (std0 + EPS), 0.0],
                             [-2 / (std0 + EPS), -10 / (std1 + EPS)], [2 / (std0 + EPS), 10 / (std1 + EPS)]])
    torch.testing.assert_close(adv, expected.float(), atol=1e-6, rtol=0)
    # two "processes" with the whole batch's scores give the whole batch's advantages
    halves = [group_advantages(scores[i:i + 2], ids[i:i + 2], mode="per_reward", scale="batch",
                               batch_scores=scores) for i in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), adv)
    # "sum" mode combines batch_scores with the same weights before its std
    w = [1.0, 0.5]
    whole = group_advantages(scores, ids, weights=w, scale="batch")
    half = group_advantages(scores[2:], ids[2:], weights=w, scale="batch", batch_scores=scores)
    torch.testing.assert_close(half, whole[2:])
    with pytest.raises(ValueError, match="batch_scores has 1 reward columns"):
        group_advantages(scores, ids, scale="batch", batch_scores=scores[:, 0])
    with pytest.raises(ValueError, match="train.scale_rewards"):
        group_advantages(scores, ids, scale="global")


@pytest.mark.distributed
def test_batch_std_is_gathered_over_two_processes(tmp_path):
    """2 CPU processes, 2 whole groups each: with ``gather_scores`` every process scales by the std of the
    whole batch, exactly as one process holding all 8 videos."""
    import json

    from _launch import ROOT, accelerate_launch
    proc = accelerate_launch("ddp", ROOT / "tests" / "_advantages_worker.py", [str(tmp_path)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result_{rank}.json").read_text())
        assert result["num_processes"] == 2 and result["distributed_type"].endswith("MULTI_CPU")
        for mode in ("sum", "per_reward"):
            r = result[mode]
            assert r["gathered_equals_batch"] and r["max_diff_vs_whole_batch"] < 1e-6
            assert r["local_std_diff"] > 1e-2                  # a per-process std would have been wrong
