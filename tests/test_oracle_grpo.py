"""benchmarks/shapes_oracle_grpo.py: the judge as a reward, the seed summary, and one run on the tiny model."""
from __future__ import annotations

import pytest
import torch

from pisces_rl.worlds.shapes import ShapesBench, caption_scene, render_videos, sample_scene


@pytest.fixture(scope="module")
def oracle(load_benchmark):
    return load_benchmark("shapes_oracle_grpo")


def test_the_judge_reward_is_the_per_video_total(oracle):
    scenes = [sample_scene(i) for i in range(3)]
    videos = torch.as_tensor(render_videos(scenes, num_frames=9, size=32))          # [3, 9, 3, 32, 32]
    prompts = [caption_scene(s) for s in scenes]
    noisy = (videos + 0.3 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    reward = oracle.judge_total(torch.cat([videos, noisy]), prompts + prompts)
    assert reward.shape == (6,) and reward.dtype == torch.float32
    expected = ShapesBench().evaluate(videos, prompts).sample_total
    assert torch.allclose(reward[:3], torch.as_tensor(expected, dtype=torch.float32))
    assert (reward[:3] > reward[3:]).all()              # noise lowers the judge, so it lowers this reward


def test_summary_over_seeds(oracle):
    runs = [{"total": {"before": 0.5, "after": a, "delta": a - 0.5}} for a in (0.6, 0.4, 0.8)]
    s = oracle.summarise(runs)["total"]
    assert oracle.summarise(runs[:1])["total"]["after"]["std"] == 0.0
    assert s["delta"]["mean"] == pytest.approx(0.1) and s["before"]["std"] == 0.0
    assert s["after"]["std"] == pytest.approx(torch.tensor([0.6, 0.4, 0.8]).std(unbiased=True).item())


def test_one_run_on_the_tiny_model(oracle, fresh_accelerate_state):
    out = oracle.run("recipes/configs/grpo_tiny_cpu.yaml", [
        "train.max_steps=1", "sampling.num_inference_steps=2", "sampling.num_frames=5", "data.num_eval_prompts=2",
        "data.prompts=shapes:train:8", "data.eval_source=shapes:heldout:2"], seed=3)
    assert {"total", "quality", "semantic"} <= set(out)
    for values in out.values():
        if values["before"] == values["before"]:        # NaN for a dimension that no prompt constrains
            assert values["delta"] == pytest.approx(values["after"] - values["before"])
    assert 0.0 <= out["total"]["before"] <= 1.0
