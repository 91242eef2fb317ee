"""benchmarks/shapes_oracle_grpo.py: the judge as a reward, the seed summary, a GRPO run and a null NFT run on the
tiny model."""
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


TINY_RUN = ["train.max_steps=2", "sampling.num_inference_steps=2", "sampling.num_frames=5",
            "data.prompts=shapes:train:8", "train.prompts_per_step=1"]


def _check_run(out, steps):
    assert {"total", "quality", "semantic"} <= set(out["eval"])
    for values in out["eval"].values():
        if values["before"] == values["before"]:        # NaN for a dimension that no prompt constrains
            assert values["delta"] == pytest.approx(values["after"] - values["before"])
    assert 0.0 <= out["eval"]["total"]["before"] <= 1.0
    assert len(out["train_reward"]) == len(out["train_judge"]) == steps
    assert all(0.0 <= v <= 1.0 for v in out["train_judge"])


def test_one_grpo_run_on_the_tiny_model(oracle, fresh_accelerate_state):
    out = oracle.run("recipes/configs/grpo_tiny_cpu.yaml", TINY_RUN, seed=3, eval_prompts=2, eval_draws=2)
    _check_run(out, steps=2)
    assert out["train_reward"] == pytest.approx(out["train_judge"])      # the judge is the training reward


def test_null_nft_run_trains_on_noise_and_logs_the_judge(oracle, fresh_accelerate_state):
    out = oracle.run("recipes/configs/nft_tiny_cpu.yaml", TINY_RUN, seed=3, null=True, eval_prompts=2, eval_draws=1)
    _check_run(out, steps=2)
    assert out["train_reward"] != pytest.approx(out["train_judge"])      # trained on noise, judge logged only
    rewards = oracle.oracle_rewards(0, null=True)
    assert rewards["judge_total"][1] == 0.0 and rewards["noise"][1] == 1.0
    a, b = oracle.NoiseReward(5), oracle.NoiseReward(5)
    videos = torch.zeros(4, 2, 3, 8, 8)
    first = a(videos, ["p"] * 4)
    assert torch.equal(first, b(videos, ["p"] * 4))                     # seeded: the control is reproducible
    assert not torch.equal(first, a(videos, ["p"] * 4))                 # fresh noise at every call
