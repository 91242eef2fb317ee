"""GroupSampler: whole groups per process, exact coverage, determinism, pure function of the iteration."""
from __future__ import annotations

from collections import Counter

import pytest

from pisces_rl.config import TrainConfig
from pisces_rl.data import GroupSampler, PromptGroups

PROMPTS = [f"prompt {i}" for i in range(12)]


def all_ranks(P, G, n, iteration, prompts=PROMPTS, seed=0):
    return [GroupSampler(prompts, G, P, num_processes=n, process_index=r, seed=seed).prompts_for_iteration(iteration)
            for r in range(n)]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ranks_cover_the_iteration_exactly_once_with_contiguous_groups(n):
    P, G = 4, 3
    global_indices = GroupSampler(PROMPTS, G, P, seed=0).iteration_indices(2)
    expected = [PROMPTS[i] for i in global_indices]
    seen_groups = []
    for rank, (prompts, group_ids) in enumerate(all_ranks(P, G, n, 2)):
        assert len(prompts) == len(group_ids) == P // n * G
        groups = [group_ids[k:k + G] for k in range(0, len(group_ids), G)]
        assert all(len(set(g)) == 1 for g in groups)  # each group's G copies are contiguous
        ids = [g[0] for g in groups]
        assert ids == list(range(rank * P // n, (rank + 1) * P // n))  # rank r gets a contiguous block
        for k, gid in enumerate(ids):
            assert prompts[k * G:(k + 1) * G] == [expected[gid]] * G
        seen_groups.extend(ids)
    assert sorted(seen_groups) == list(range(P))  # no group missing, none split or duplicated across ranks


def test_deterministic_and_iterations_differ():
    a, b = GroupSampler(PROMPTS, 2, 4, seed=7), GroupSampler(PROMPTS, 2, 4, seed=7)
    assert [a.prompts_for_iteration(i) for i in range(5)] == [b.prompts_for_iteration(i) for i in range(5)]
    assert a.iteration_indices(0) != a.iteration_indices(1)
    assert a.iteration_indices(0) != GroupSampler(PROMPTS, 2, 4, seed=8).iteration_indices(0)


def test_pure_function_of_iteration_for_exact_resume():
    sequential = GroupSampler(PROMPTS, 2, 4, seed=3)
    expected = [sequential.prompts_for_iteration(i) for i in range(9)]
    resumed = GroupSampler(PROMPTS, 2, 4, seed=3)
    assert resumed.prompts_for_iteration(8) == expected[8]  # jump ahead first, then go back
    assert [resumed.prompts_for_iteration(i) for i in range(9)] == expected
    assert list(resumed.iterate(start=6, stop=9)) == expected[6:]


def test_passes_use_every_prompt_before_repeating():
    sampler = GroupSampler(PROMPTS, 2, 4, seed=1)  # 12 prompts, 4 per iteration: 3 iterations per pass
    for first in (0, 3, 6):
        drawn = [i for it in range(first, first + 3) for i in sampler.iteration_indices(it)]
        assert sorted(drawn) == list(range(12))


def test_leftover_prompts_wait_but_iterations_stay_distinct():
    prompts = PROMPTS[:10]  # 10 prompts, 4 per iteration: each pass serves 2 iterations, 2 prompts wait
    sampler = GroupSampler(prompts, 2, 4, seed=0)
    counts = Counter()
    for it in range(40):
        indices = sampler.iteration_indices(it)
        assert len(set(indices)) == 4
        counts.update(indices)
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 12


def test_more_prompts_per_iteration_than_prompts():
    sampler = GroupSampler(["a", "b", "c"], 2, 4, seed=0)
    prompts, group_ids = sampler.prompts_for_iteration(0)
    assert len(prompts) == 8 and group_ids == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(prompts) == {"a", "b", "c"}


def test_from_config_and_named_tuple():
    train = TrainConfig(prompts_per_step=4, num_generations=3, seed=5)
    sampler = GroupSampler.from_config(PROMPTS, train, num_processes=2, process_index=1)
    out = sampler.prompts_for_iteration(0)
    assert isinstance(out, PromptGroups) and out.group_ids == [2, 2, 2, 3, 3, 3]
    assert sampler.videos_per_process == 6 and sampler.seed == 5


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(prompts_per_iteration=3, num_processes=2), r"3 prompts per iteration cannot be split .* multiple of 2"),
    (dict(num_processes=2, process_index=2), r"process_index 2 is out of range for 2 processes"),
    (dict(group_size=0), r"group_size must be an integer >= 1, got 0"),
    (dict(seed=-1), r"seed must be an integer >= 0"),
    (dict(prompts=[]), r"the prompt list is empty"),
    (dict(prompts="a cat"), r"prompts must be a list of strings, got str"),
])
def test_errors(kwargs, pattern):
    args = dict(prompts=PROMPTS, group_size=2, prompts_per_iteration=4, num_processes=1, process_index=0, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        GroupSampler(**args)


def test_negative_iteration_is_rejected():
    with pytest.raises(ValueError, match="iteration must be an integer >= 0, got -1"):
        GroupSampler(PROMPTS, 2, 4).prompts_for_iteration(-1)
