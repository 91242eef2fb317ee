"""benchmarks/shapes_reward_alignment.py: in-group rank statistics, and one end-to-end pass on the tiny model."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from pisces_rl.config import GRPOConfig, load_config


@pytest.fixture(scope="module")
def alignment(load_benchmark):
    return load_benchmark("shapes_reward_alignment")


def test_spearman_matches_scipy_with_ties(alignment):
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, 8).astype(float), rng.normal(size=8)
        if len(np.unique(x)) > 1:
            assert alignment.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(alignment.spearman(np.ones(5), np.arange(5.0)))


def _columns(signal_of_judge, groups=6, size=4, seed=0):
    rng = np.random.default_rng(seed)
    judge = rng.uniform(size=groups * size)
    cols = {"group": np.repeat(np.arange(groups), size), "judge/total": judge,
            "judge/quality": judge, "judge/semantic": rng.uniform(size=groups * size)}
    cols["reward/total"] = cols["advantage"] = signal_of_judge(judge)
    return cols


def test_a_signal_equal_to_the_judge_is_the_oracle(alignment):
    out = alignment.summarise(_columns(lambda j: 2 * j + 1))
    assert out["spearman/advantage/total"]["mean"] == pytest.approx(1.0)
    assert out["best_of_group/advantage"]["mean"] == pytest.approx(out["best_of_group/oracle"]["mean"])
    assert out["best_of_group/oracle"]["mean"] > 0 > out["best_of_group/worst"]["mean"]


def test_a_reversed_signal_picks_the_worst(alignment):
    out = alignment.summarise(_columns(lambda j: -j))
    assert out["spearman/reward/total/total"]["mean"] == pytest.approx(-1.0)
    assert out["best_of_group/reward/total"]["mean"] == pytest.approx(out["best_of_group/worst"]["mean"])


def test_end_to_end_on_the_tiny_model(alignment, tmp_path, fresh_accelerate_state):
    cfg = load_config(GRPOConfig, None, [
        f"output_dir={tmp_path}", "logging.report_to=none", "train.prompts_per_step=2", "train.num_generations=3",
        "train.sample_batch_size=6", "sampling.num_inference_steps=2", "sampling.num_frames=5",
        "sampling.height=16", "sampling.width=16", "rewards.weights={ot_quality: 1.0, ot_semantic: 1.0}",
        "train.advantage_mode=per_reward", "data.prompts=shapes:train:8"])
    cols = alignment.collect(cfg, iterations=2)
    assert len(cols["group"]) == 12 and len(np.unique(cols["group"])) == 4
    assert {"reward/ot_quality", "reward/ot_semantic", "advantage", "judge/total"} <= set(cols)
    # per_reward advantages are summed with the reward weights: zero mean inside every group
    for g in np.unique(cols["group"]):
        assert abs(cols["advantage"][cols["group"] == g].mean()) < 1e-5
    out = alignment.summarise(cols)
    assert out["groups"] == 4 and out["group_size"] == 3
    assert -1.0 <= out["best_of_group/worst"]["mean"] <= out["best_of_group/oracle"]["mean"] <= 1.0
