"""RewardServer: weighted totals, chunking, result validation, error policy, devices, frames, autograd."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from pisces_rl.rewards import RewardError, RewardServer
from pisces_rl.rewards.frames import (subsample_frames, temporal_windows, uniform_frame_indices,
                                      window_frame_indices)


def videos_(b=3, f=4, seed=0, **kw):
    return torch.rand(b, f, 3, 6, 6, generator=torch.Generator().manual_seed(seed), **kw)


def frame_coded(b, f):
    """Videos whose every pixel of frame t equals t / (f - 1): [b, f, 1, 2, 2]."""
    codes = torch.arange(f, dtype=torch.float32) / (f - 1)
    return codes.view(1, f, 1, 1, 1).expand(b, f, 1, 2, 2).clone()


def fixed(values):
    """Reward returning ``values[i]`` for the video whose prompt is ``str(i)``."""
    def reward(videos, prompts, **kwargs):
        return [values[int(p)] for p in prompts]
    return reward


class Recorder:
    """Records the batch size and frames of every call; scores = first-frame pixel value."""

    def __init__(self):
        self.sizes, self.frames, self.devices = [], [], []

    def __call__(self, videos, prompts, **kwargs):
        self.sizes.append(videos.shape[0])
        self.frames.append(videos.shape[1])
        self.devices.append(videos.device.type)
        if videos.device.type == "meta":
            return torch.zeros(videos.shape[0])
        return videos[:, 0, 0, 0, 0]


def prompts_(n):
    return [str(i) for i in range(n)]


# ---------------------------------------------------------------- totals and metrics

def test_weighted_total_matches_hand_computation():
    server = RewardServer({"a": (fixed([1.0, 2.0, 3.0]), 0.5), "b": (fixed([10.0, None, 30.0]), 2.0)})
    out = server(videos_(3), prompts_(3))
    assert out.names == ["a", "b"] and server.names == ["a", "b"]
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3, 2)
    torch.testing.assert_close(out.weights, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out.total, torch.tensor([20.5, 1.0, 61.5]))  # b missing for video 1: a only
    assert math.isnan(out.scores[1, 1].item())
    m = out.metrics()
    assert m["reward/a/mean"] == pytest.approx(2.0) and m["reward/a/std"] == pytest.approx(math.sqrt(2 / 3))
    assert m["reward/b/mean"] == pytest.approx(20.0) and m["reward/b/not_applicable"] == 1
    assert m["reward/total/mean"] == pytest.approx((20.5 + 1.0 + 61.5) / 3) and m["reward/total/nan"] == 0
    torch.testing.assert_close(out["b"], out.scores[:, 1], equal_nan=True)


def test_total_is_nan_when_no_reward_applies():
    server = RewardServer({"a": (fixed([1.0, None]), 1.0), "b": (fixed([None, None]), 3.0)})
    out = server(videos_(2), prompts_(2))
    assert out.total[0].item() == 1.0 and math.isnan(out.total[1].item())
    assert out.metrics()["reward/total/nan"] == 1 and out.not_applicable == {"a": 1, "b": 2}


def test_returning_none_means_not_applicable_for_the_whole_chunk():
    server = RewardServer({"never": (lambda v, p, **k: None, 1.0), "one": (lambda v, p, **k: torch.ones(len(p)), 1.0)})
    out = server(videos_(4), prompts_(4))
    assert torch.isnan(out.scores[:, 0]).all() and out.not_applicable["never"] == 4
    torch.testing.assert_close(out.total, torch.ones(4))
    assert math.isnan(out.metrics()["reward/never/mean"])


def test_numpy_and_tuple_results_are_accepted():
    server = RewardServer({"np": (lambda v, p, **k: np.arange(len(p)), 1.0),
                           "tup": (lambda v, p, **k: tuple(torch.tensor(0.5) for _ in p), 1.0)})
    out = server(videos_(3), prompts_(3))
    torch.testing.assert_close(out.total, torch.tensor([0.5, 1.5, 2.5]))


# ---------------------------------------------------------------- chunking and kwargs

def test_rewards_are_called_in_chunks_of_max_batch_size():
    rec = Recorder()
    server = RewardServer({"rec": (rec, 1.0)}, max_batch_size=3)
    videos = videos_(7)
    out = server(videos, prompts_(7))
    assert rec.sizes == [3, 3, 1]
    torch.testing.assert_close(out.scores[:, 0], videos[:, 0, 0, 0, 0])


def test_per_sample_kwargs_are_sliced_with_the_chunk_and_others_passed_whole():
    seen = []

    def reward(videos, prompts, ids, tags, scale, **kwargs):
        seen.append((len(tags), scale))
        return ids.float() * scale

    server = RewardServer({"ids": (reward, 1.0)}, max_batch_size=2)
    out = server(videos_(5), prompts_(5), ids=torch.arange(5), tags=list("abcde"), scale=10.0)
    torch.testing.assert_close(out.total, torch.arange(5).float() * 10)
    assert seen == [(2, 10.0), (2, 10.0), (1, 10.0)]


# ---------------------------------------------------------------- contract violations

@pytest.mark.parametrize("result, match", [
    (lambda n: torch.zeros(n, 1), r"reward 'bad' returned a tensor of shape \[3, 1\].*squeeze"),
    (lambda n: torch.zeros(n + 1), r"reward 'bad' returned 4 scores for 3 videos"),
    (lambda n: [0.0] * (n - 1), r"reward 'bad' returned 2 scores for 3 videos"),
    (lambda n: ["good"] * n, r"reward 'bad' returned a str at position 0"),
    (lambda n: {"score": 1.0}, r"reward 'bad' returned a dict"),
    (lambda n: torch.tensor([0.0, math.nan, 1.0]), r"reward 'bad' returned non-finite scores for 1 of 3.*allow_nan"),
    (lambda n: torch.tensor([0.0, math.inf, 1.0]), r"reward 'bad' returned non-finite"),
])
def test_bad_results_raise_one_error_naming_the_reward(result, match):
    server = RewardServer({"bad": (lambda v, p, **k: result(len(p)), 1.0)})
    with pytest.raises(RewardError, match=match):
        server(videos_(3), prompts_(3))


def test_exception_inside_a_reward_is_wrapped_with_name_and_fix():
    def explode(videos, prompts, **kwargs):
        raise ValueError("boom")

    server = RewardServer({"explode": (explode, 1.0)})
    with pytest.raises(RewardError, match=r"reward 'explode' raised ValueError: boom.*on_error='skip'") as info:
        server(videos_(2), prompts_(2))
    assert isinstance(info.value.__cause__, ValueError)


def test_skip_mode_scores_failing_chunk_nan_counts_and_logs_once(caplog):
    def flaky(videos, prompts, **kwargs):
        if "3" in prompts:
            raise RuntimeError("decoder crashed")
        return torch.ones(len(prompts))

    server = RewardServer({"flaky": (flaky, 1.0), "one": (lambda v, p, **k: torch.full((len(p),), 2.0), 1.0)},
                          max_batch_size=2, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="pisces_rl.rewards"):
        out = server(videos_(5), prompts_(5))
        server(videos_(5), prompts_(5))
    torch.testing.assert_close(out.scores[:, 0], torch.tensor([1.0, 1.0, math.nan, math.nan, 1.0]), equal_nan=True)
    torch.testing.assert_close(out.total, torch.tensor([3.0, 3.0, 2.0, 2.0, 3.0]))  # the other reward still counts
    assert out.skipped == {"flaky": 2, "one": 0} and out.metrics()["reward/flaky/skipped"] == 2
    assert server.skipped_total["flaky"] == 4
    warnings = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert len(warnings) == 1 and "decoder crashed" in warnings[0].getMessage()


def test_skip_mode_skips_only_nan_entries():
    server = RewardServer({"n": (lambda v, p, **k: torch.tensor([1.0, math.nan, 3.0]), 1.0)}, on_error="skip")
    out = server(videos_(3), prompts_(3))
    assert out.skipped == {"n": 1} and out.not_applicable == {"n": 0}
    assert torch.isnan(out.total).tolist() == [False, True, False]


def test_allow_nan_turns_nan_into_not_applicable():
    def maybe(videos, prompts, **kwargs):
        return torch.tensor([1.0, math.nan])

    maybe.allow_nan = True
    out = RewardServer({"maybe": (maybe, 1.0)})(videos_(2), prompts_(2))
    assert out.not_applicable == {"maybe": 1} and out.skipped == {"maybe": 0}


# ---------------------------------------------------------------- inputs and construction

@pytest.mark.parametrize("videos, prompts, match", [
    (torch.rand(2, 3, 6, 6), ["a", "b"], r"\[B, F, C, H, W\]"),
    (torch.rand(2, 3, 3, 6, 6), ["a"], "2 videos but 1 prompts"),
    (torch.rand(2, 3, 3, 6, 6), "ab", "list of strings"),
    (torch.rand(2, 3, 3, 6, 6) * 2 - 1, ["a", "b"], r"\(videos \+ 1\) / 2"),
    (torch.full((1, 2, 3, 4, 4), math.nan), ["a"], "NaN"),
])
def test_bad_inputs_raise_with_the_fix(videos, prompts, match):
    server = RewardServer({"one": (lambda v, p, **k: torch.ones(len(p)), 1.0)})
    with pytest.raises(ValueError, match=match):
        server(videos, prompts)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rewards={}), "at least one reward"),
    (dict(rewards={"a": (len, "heavy")}), r"reward 'a' has weight 'heavy'"),
    (dict(rewards={"a": (len, 1.0, 2.0)}), r"\(reward_or_spec, weight\)"),
    (dict(rewards={"a": (len, 1.0)}, on_error="ignore"), "'raise' or 'skip'"),
    (dict(rewards={"a": (len, 1.0)}, max_batch_size=0), "max_batch_size"),
    (dict(rewards={"a": (len, 1.0)}, num_frames=0), "num_frames"),
])
def test_bad_server_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, RewardError), match=match):
        RewardServer(**kwargs)


def test_sequence_form_uses_reward_names_and_rejects_duplicates():
    def a(videos, prompts, **kwargs):
        return torch.ones(len(prompts))

    b = Recorder()
    b.name = "first_pixel"
    server = RewardServer([a, (b, 0.5)])
    assert server.names == ["a", "first_pixel"] and server.weights.tolist() == [1.0, 0.5]
    assert server.rewards == {"a": (a, 1.0), "first_pixel": (b, 0.5)}
    more = RewardServer({**server.rewards, "c": (a, 2.0)})       # the constructor's form round-trips
    assert more.names == ["a", "first_pixel", "c"] and more.weights.tolist() == [1.0, 0.5, 2.0]
    with pytest.raises(RewardError, match="two rewards are named 'a'"):
        RewardServer([a, a])


def test_empty_batch_gives_empty_output():
    out = RewardServer({"one": (lambda v, p, **k: torch.ones(len(p)), 1.0)})(torch.zeros(0, 2, 3, 4, 4), [])
    assert out.scores.shape == (0, 1) and out.total.shape == (0,)


# ---------------------------------------------------------------- devices

def test_videos_move_to_the_declared_device_and_scores_come_back():
    declared, module_reward, default = Recorder(), Recorder(), Recorder()
    declared.device = "meta"

    class OnMeta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, videos, prompts, **kwargs):
            return module_reward(videos, prompts)

    server = RewardServer({"declared": (declared, 1.0), "module": (OnMeta(), 1.0), "default": (default, 1.0)})
    out = server(videos_(2), prompts_(2))
    assert declared.devices == ["meta"] and module_reward.devices == ["meta"] and default.devices == ["cpu"]
    assert out.scores.device.type == "cpu" and out.total.device.type == "cpu"
    declared.device = "cpu"  # read at every call, not cached at construction
    server(videos_(2), prompts_(2))
    assert declared.devices[-1] == "cpu"
    server_default = RewardServer({"default": (default, 1.0)}, device="meta")
    server_default(videos_(2), prompts_(2))
    assert default.devices[-1] == "meta"


# ---------------------------------------------------------------- frames

def test_uniform_and_window_indices():
    assert uniform_frame_indices(9, 3) == [0, 4, 8]
    assert uniform_frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_frame_indices(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert uniform_frame_indices(5, 1) == [2]
    assert window_frame_indices(8, 2, 2).tolist() == [[0, 3], [4, 7]]
    assert window_frame_indices(7, 2).tolist() == [[0, 1, 2], [3, 5, 6]]  # segments [0,3) and [3,7), 3 frames each
    assert window_frame_indices(10, 3, 1).tolist() == [[1], [4], [7]]
    with pytest.raises(ValueError, match="set num_frames <= 4"):
        uniform_frame_indices(4, 5)
    with pytest.raises(ValueError, match=r"windows of 2 frames, fewer than num_frames=3.*temporal_windows to <= 2"):
        window_frame_indices(8, 4, 3)


def test_subsample_and_windows_pick_the_right_frames():
    videos = frame_coded(2, 8)
    picked = subsample_frames(videos, 3)[0, :, 0, 0, 0] * 7
    torch.testing.assert_close(picked, torch.tensor([0.0, 4.0, 7.0]))  # round(3.5) = 4
    assert subsample_frames(videos, None) is videos
    windows = temporal_windows(videos, 2, 2)
    assert windows.shape == (2, 2, 2, 1, 2, 2)
    torch.testing.assert_close(windows[:, 1, :, 0, 0, 0] * 7, torch.tensor([[0.0, 3.0], [4.0, 7.0]]))


def test_server_subsamples_frames_and_averages_windows():
    rec = Recorder()
    out = RewardServer({"rec": (rec, 1.0)}, num_frames=3)(frame_coded(2, 8), prompts_(2))
    assert rec.frames == [3]
    windowed = Recorder()
    out = RewardServer({"rec": (windowed, 1.0)}, num_frames=2, temporal_windows=2, max_batch_size=3)(
        frame_coded(2, 8), prompts_(2))
    assert windowed.sizes == [3, 1] and windowed.frames == [2, 2]  # 2 windows x 2 videos, in chunks of 3
    torch.testing.assert_close(out.total, torch.full((2,), (0 + 4) / 7 / 2))  # first frames 0 and 4 of 7


def test_windowed_calls_repeat_per_sample_kwargs_and_keep_global_ones_whole():
    seen = []

    def reward(videos, prompts, ids, table, **kwargs):
        seen.append((ids.tolist(), list(prompts), len(table)))
        return ids.float()

    out = RewardServer({"r": (reward, 1.0)}, temporal_windows=2)(frame_coded(2, 8), ["p", "q"],
                                                                  ids=torch.tensor([3, 5]), table=list("wxyz"))
    assert seen == [([3, 5, 3, 5], ["p", "q", "p", "q"], 4)]  # window-major; the length-4 list is not per-sample
    torch.testing.assert_close(out.total, torch.tensor([3.0, 5.0]))


def test_window_average_ignores_not_applicable_windows():
    def late_only(videos, prompts, **kwargs):
        first = videos[:, 0, 0, 0, 0]
        return [None if x == 0 else float(x) for x in first]

    out = RewardServer({"late": (late_only, 1.0)}, temporal_windows=2)(frame_coded(1, 8), ["0"])
    torch.testing.assert_close(out.total, torch.tensor([4 / 7]))
    assert out.not_applicable == {"late": 0}


def test_too_few_frames_for_num_frames_is_a_clear_error():
    server = RewardServer({"rec": (Recorder(), 1.0)}, num_frames=8)
    with pytest.raises(ValueError, match=r"num_frames=8.*5 frames"):
        server(videos_(1, f=5), ["0"])


# ---------------------------------------------------------------- autograd

def sharp(videos, prompts, **kwargs):
    return (videos[..., 1:, :] - videos[..., :-1, :]).abs().mean(dim=(1, 2, 3, 4))


def test_differentiable_mode_backprops_only_through_differentiable_rewards():
    def diff(videos, prompts, **kwargs):
        return sharp(videos, prompts)

    diff.differentiable = True
    videos = videos_(3, requires_grad=True)
    server = RewardServer({"diff": (diff, 2.0), "plain": (sharp, 5.0)}, max_batch_size=2)
    out = server.differentiable(videos, prompts_(3))
    assert out.total.requires_grad and out.scores[:, 0].requires_grad
    out.total.sum().backward()
    expected, = torch.autograd.grad(2.0 * sharp(videos, None).sum(), videos)
    torch.testing.assert_close(videos.grad, expected)  # "plain" (weight 5) contributed no gradient

    only_plain = RewardServer({"plain": (sharp, 1.0)}).differentiable(videos, prompts_(3))
    assert not only_plain.total.requires_grad
    assert not server(videos, prompts_(3)).total.requires_grad  # __call__ never builds a graph


def test_differentiable_reward_returning_a_list_is_rejected_in_differentiable_mode():
    def listy(videos, prompts, **kwargs):
        return [0.0] * len(prompts)

    listy.differentiable = True
    with pytest.raises(RewardError, match="'listy' declares differentiable=True but returned a list"):
        RewardServer({"listy": (listy, 1.0)}).differentiable(videos_(2, requires_grad=True), prompts_(2))


def test_differentiable_windows_keep_gradients_finite_when_a_window_is_missing():
    def first_window_only(videos, prompts, **kwargs):
        score = videos.mean(dim=(1, 2, 3, 4))
        return torch.where(videos[:, 0, 0, 0, 0] < 0.5, score, torch.full_like(score, math.nan))

    first_window_only.differentiable = True
    first_window_only.allow_nan = True
    videos = frame_coded(1, 8).requires_grad_(True)
    out = RewardServer({"f": (first_window_only, 1.0)}, temporal_windows=2).differentiable(videos, ["0"])
    out.total.sum().backward()
    assert torch.isfinite(videos.grad).all()
    assert videos.grad[0, :4].abs().sum() > 0 and videos.grad[0, 4:].abs().sum() == 0
