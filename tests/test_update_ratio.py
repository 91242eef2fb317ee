"""train/update_ratio = ‖ΔW‖/‖W‖ per optimiser step, and benchmarks/update_ratio.py on the shipped Wan recipes."""
from __future__ import annotations

import math

import pytest
import torch

from pisces_rl.models import UpdateRatio, build_policy
from pisces_rl.models.lora import ADAPTER_NAME, lora_layers, merged_delta_sq_norm

from _models import model_cfg


@pytest.mark.parametrize("shape_a, shape_b", [((3, 7), (5, 3)), ((4, 2, 1, 3, 3), (6, 4, 1, 1, 1))])
def test_merged_delta_norm_equals_the_dense_difference(shape_a, shape_b):
    """‖s·(B1A1 − B0A0)‖_F² from the Gram-matrix form equals the dense [out, in] computation (issue 13:
    ΔW = the change of the merged LoRA update scale·B·A); conv adapters flatten to the same matrices."""
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(shape_a, generator=g), torch.randn(shape_b, generator=g)
    a1, b1 = a0 + 1e-3 * torch.randn(shape_a, generator=g), b0 + 1e-3 * torch.randn(shape_b, generator=g)
    dense = 1.7 * (b1.flatten(1).double() @ a1.flatten(1).double() - b0.flatten(1).double() @ a0.flatten(1).double())
    ours = merged_delta_sq_norm(a0, b0, a1, b1, scale=1.7)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, dense.pow(2).sum(), rtol=1e-9, atol=0)
    assert merged_delta_sq_norm(a0, b0, a0, b0, 1.7) == 0


def test_lora_update_ratio_is_the_merged_delta_over_the_base_weights():
    """Oracle: peft's own merged update ``get_delta_weight`` (= alpha/r · B·A) before and after, over the
    adapted layers' base weights: sqrt(Σ‖ΔW‖²) / sqrt(Σ‖W‖²)."""
    policy = build_policy(model_cfg(lora_rank=4, lora_alpha=2), device="cpu")
    tracker = UpdateRatio(policy.transformer)
    layers = lora_layers(policy.transformer)
    assert tracker.mode == "lora" and len(layers) == 16
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = {n: m.get_delta_weight(ADAPTER_NAME).clone() for n, m in layers}
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))            # moves A and B (B leaves 0)
        delta = sum((m.get_delta_weight(ADAPTER_NAME) - before[n]).double().pow(2).sum() for n, m in layers)
        base = sum(m.get_base_layer().weight.double().pow(2).sum() for _, m in layers)
    expected = math.sqrt(float(delta) / float(base))
    assert expected > 1e-4
    assert tracker.step() == pytest.approx(expected, rel=1e-9)
    assert tracker.step() == 0.0                                       # re-snapshotted: nothing moved since


def test_full_update_ratio_is_the_relative_parameter_change():
    policy = build_policy(model_cfg(finetune="full"), device="cpu")
    tracker = UpdateRatio(policy.transformer)
    assert tracker.mode == "full"
    start = tracker.state()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.mul_(1.01)                                               # ΔW = 0.01·W for every weight
    assert tracker.step() == pytest.approx(0.01, rel=1e-6)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.mul_(1.01)
    assert tracker.measure(start) == pytest.approx(1.01 ** 2 - 1, rel=1e-6)   # from an older snapshot
    with pytest.raises(ValueError, match="trainable"):
        UpdateRatio(torch.nn.Linear(2, 2).requires_grad_(False))


# ----------------------------------------------------------------------------- the shipped recipes
@pytest.mark.parametrize("recipe", ["grpo_short_video_wan", "grpo_long_video_wan", "backprop_short_video_wan",
                                    "backprop_long_video_wan"])
def test_shipped_wan_recipe_moves_the_model(recipe, load_benchmark):
    """Issue 13 acceptance: 10 optimiser steps with the recipe's optimisation settings and real rewards on the
    tiny model move W by ≥ 1e-3 in total, and no step by more than 5e-2 (benchmarks/update_ratio.py)."""
    bench = load_benchmark("update_ratio")
    result = bench.measure(recipe, steps=10)
    assert result["steps"] == 10 and result["first"] > 0 and all(math.isfinite(r) for r in result["ratios"])
    assert result["total"] >= bench.MIN_TOTAL, result
    assert result["max_step"] <= bench.MAX_STEP, result
    assert bench.passes(result)


def test_the_settings_before_issue_13_fail_the_range(load_benchmark):
    """LoRA r128/alpha128 at lr 1e-6 (the GRPO recipes before): W moves by < 1e-4 in 10 steps."""
    bench = load_benchmark("update_ratio")
    result = bench.measure("grpo_short_video_wan", steps=10, lr=1e-6,
                           extra={"model.lora_rank": 128, "model.lora_alpha": 128})
    assert result["total"] < 1e-4 and not bench.passes(result)
