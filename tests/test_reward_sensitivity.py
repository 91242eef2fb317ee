"""benchmarks/shapes_reward_sensitivity.py: each corruption does what its name says and nothing else."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def sens(load_benchmark):
    return load_benchmark("shapes_reward_sensitivity")


@pytest.fixture(scope="module")
def videos():
    return torch.rand(2, 9, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_every_corruption_keeps_shape_and_range_and_changes_the_video(sens, videos):
    for kind in sens.QUALITY + sens.SEMANTIC:
        out = sens.corrupt(videos, kind)
        assert out.shape == videos.shape and out.min() >= 0 and out.max() <= 1, kind
        assert not torch.equal(out, videos), kind


def test_frame_corruptions_touch_only_their_frames(sens, videos):
    odd = sens.corrupt(videos, "flicker")
    assert torch.equal(odd[:, 0::2], videos[:, 0::2]) and torch.allclose(odd[:, 1::2], 0.75 * videos[:, 1::2])
    even = sens.corrupt(videos, "flicker_even")
    changed = [t for t in range(9) if not torch.equal(even[:, t], videos[:, t])]
    assert changed == [2, 4, 6]


def test_semantic_corruptions(sens, videos):
    assert torch.equal(sens.corrupt(videos, "reversed"), videos.flip(1))
    assert torch.equal(sens.corrupt(videos, "recolour")[:, :, 0], videos[:, :, 2])


def test_jitter_is_seeded_and_moves_content(sens, videos):
    a, b = sens.corrupt(videos, "jitter", seed=3), sens.corrupt(videos, "jitter", seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, sens.corrupt(videos, "jitter", seed=4))


def test_unknown_corruption_is_rejected(sens, videos):
    with pytest.raises(ValueError, match="unknown corruption"):
        sens.corrupt(videos, "sepia")
