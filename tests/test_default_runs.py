"""benchmarks/shapes_default_runs.py and plot_default_runs.py: the null control's rewards, and the pre-registered
criterion (Δ R > 0 on every seed and the mean above the null's) as the plot script applies it."""
from __future__ import annotations

import json

import pytest
import torch

from pisces_rl.config import GRPOConfig, load_config


@pytest.fixture(scope="module")
def plot(load_benchmark):
    return load_benchmark("plot_default_runs")


def _run(seed: int, rewards: list[float], judge: float = 0.0) -> dict:
    """One run as the runner writes it: R = ot_quality + ot_semantic at each evaluation."""
    return {"seed": seed, "curve": {"iteration": [0, 10][:len(rewards)], "reward/pisces": rewards,
                                    "reward/ot_quality": rewards, "reward/ot_semantic": [0.0] * len(rewards)},
            "judge": {"total": {"before": 0.5, "after": 0.5 + judge, "delta": judge}}}


def test_verdict_is_the_preregistered_criterion(plot):
    null = [_run(s, [0.5, 0.48]) for s in range(3)]                              # null mean Δ -0.02
    assert plot.verdict({"run": [_run(s, [0.5, 0.51]) for s in range(3)], "null": null}).startswith("passes")
    below_null = {"run": [_run(s, [0.5, 0.51]) for s in range(3)], "null": [_run(s, [0.5, 0.6]) for s in range(3)]}
    assert plot.verdict(below_null).startswith("fails")                          # every seed rises, but less than null
    one_falls = plot.verdict({"run": [_run(0, [0.5, 0.5]), _run(1, [0.5, 0.6]), _run(2, [0.5, 0.6])], "null": null})
    assert one_falls.startswith("fails") and "[0]" in one_falls                  # Δ = 0 is not a rise
    stopped = plot.verdict({"run": [_run(0, [0.5, 0.45])], "null": null[:1]})   # decided on seed 0, rest not run
    assert stopped.startswith("fails") and "1 runs" in stopped
    assert plot.verdict({"run": [_run(0, [0.5, 0.6])], "null": []}).startswith("incomplete")
    assert "6/6" in plot.verdict({"run": [_run(s, [0.5, 0.6]) for s in range(6)], "null": null})


def test_load_groups_rows_and_nulls_by_file_name(plot, tmp_path):
    for name, seed in (("grpo-seed1", 1), ("grpo-seed0", 0), ("grpo-null-seed0", 0), ("nft_cfgfree-seed2", 2)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": [_run(seed, [0.5, 0.6])]}))
    (tmp_path / "notes.json").write_text("{}")                                   # not a run file: ignored
    rows = plot.load(str(tmp_path))
    assert sorted(rows) == ["grpo", "nft_cfgfree"]
    assert [r["seed"] for r in rows["grpo"]["run"]] == [0, 1] and len(rows["grpo"]["null"]) == 1
    assert plot.delta(rows["grpo"]["run"][0]) == pytest.approx(0.1)
    assert "| run | 0, 1 |" in plot.table("grpo", rows["grpo"])


def test_null_control_logs_the_rewards_at_weight_zero_and_trains_on_noise(load_benchmark):
    runs = load_benchmark("shapes_default_runs")
    config = load_config(GRPOConfig, "recipes/configs/grpo_tiny_cpu.yaml", [])
    server = runs.null_rewards(config, seed=3)
    names = list(config.rewards.weights)
    assert server.names == [*names, "noise"] and server.weights.tolist() == [0.0] * len(names) + [1.0]
    videos = torch.rand(4, 5, 3, 16, 16)
    a, b = server(videos, ["a red circle"] * 4), runs.null_rewards(config, seed=3)(videos, ["a red circle"] * 4)
    assert torch.equal(a.total, a["noise"]) and torch.equal(a.total, b.total)   # total = the seeded noise alone
    assert torch.isfinite(a.scores).all()                                        # the real rewards are still scored
