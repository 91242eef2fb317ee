"""The group-keeping prompt sampler of GRPO: G copies per prompt, whole groups per process.

Prompts are drawn in shuffled passes over the list (pass ``e`` is a permutation seeded by ``(seed, e)``),
``P`` per iteration, so no prompt repeats before the others have had their turn. With ``N`` prompts and
``P <= N`` a pass serves ``N // P`` iterations and the ``N mod P`` prompts left at its end wait for the next
pass (a different shuffle, so nothing is skipped for long); an iteration's ``P`` prompts are then always
distinct. (With ``P > N`` repeats inside an iteration are unavoidable: passes are simply concatenated.)
The iteration's prompts are its groups, numbered ``0..P-1``; process ``r`` of ``n`` gets groups
``r*P/n .. (r+1)*P/n - 1``, each repeated G times::

    iteration 0, P = 4, G = 2, n = 2      groups:  0   1   2   3       (prompts c, a, d, b)
        process 0 -> prompts [c, c, a, a],  group_ids [0, 0, 1, 1]
        process 1 -> prompts [d, d, b, b],  group_ids [2, 2, 3, 3]

Everything is a pure function of ``(prompts, seed, iteration)``: resuming at iteration ``k`` only needs
``k``, and every process computes the same global order without communicating.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["GroupSampler", "PromptGroups"]


class PromptGroups(NamedTuple):
    """One process's prompts for one iteration; unpacks as ``prompts, group_ids = ...``."""

    prompts: list[str]  # [P/n * G] each prompt's G copies contiguous
    group_ids: list[int]  # [P/n * G] group index within the iteration (0..P-1), shared by the G copies


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"GroupSampler: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class GroupSampler:
    """Deterministic per-iteration prompt groups for ``num_processes`` processes.

    Args:
        prompts: the prompt list (e.g. from :func:`~pisces_rl.data.load_prompts`).
        group_size: G, videos per prompt.
        prompts_per_iteration: P, distinct groups per iteration over all processes; must be divisible by
            ``num_processes`` so that groups are never split between processes.
        num_processes, process_index: this process's place among all (``accelerator`` values).
        seed: shuffling seed (>= 0).
    """

    def __init__(self, prompts: Sequence[str], group_size: int, prompts_per_iteration: int,
                 num_processes: int = 1, process_index: int = 0, seed: int = 0):
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"GroupSampler: prompts must be a list of strings, got {type(prompts).__name__}; "
                             "load them with pisces_rl.data.load_prompts")
        if not prompts:
            raise ValueError("GroupSampler: the prompt list is empty")
        self.prompts = list(prompts)
        self.group_size = _check_int("group_size", group_size, 1)
        self.prompts_per_iteration = _check_int("prompts_per_iteration", prompts_per_iteration, 1)
        self.num_processes = _check_int("num_processes", num_processes, 1)
        self.process_index = _check_int("process_index", process_index, 0)
        self.seed = _check_int("seed", seed, 0)
        if self.process_index >= self.num_processes:
            raise ValueError(f"GroupSampler: process_index {process_index} is out of range for "
                             f"{num_processes} processes")
        if self.prompts_per_iteration % self.num_processes:
            raise ValueError(f"GroupSampler: {prompts_per_iteration} prompts per iteration cannot be split into "
                             f"whole groups over {num_processes} processes; use a multiple of {num_processes} "
                             "(train.prompts_per_step)")
        self._passes: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, prompts: Sequence[str], train: Any, num_processes: int = 1,
                    process_index: int = 0) -> "GroupSampler":
        """Build from a ``TrainConfig`` (``num_generations``, ``prompts_per_step``, ``seed``)."""
        return cls(prompts, group_size=train.num_generations, prompts_per_iteration=train.prompts_per_step,
                   num_processes=num_processes, process_index=process_index, seed=train.seed)

    @property
    def prompts_per_process(self) -> int:
        """Groups (distinct prompts) per process and iteration."""
        return self.prompts_per_iteration // self.num_processes

    @property
    def videos_per_process(self) -> int:
        """Videos per process and iteration (``prompts_per_process * group_size``)."""
        return self.prompts_per_process * self.group_size

    def _pass_order(self, index: int) -> np.ndarray:
        """Permutation of the prompt indices for pass ``index`` over the list (two most recent cached)."""
        if index not in self._passes:
            if len(self._passes) >= 2:
                self._passes.pop(min(self._passes))
            rng = np.random.default_rng([self.seed, index])
            self._passes[index] = rng.permutation(len(self.prompts))
        return self._passes[index]

    def iteration_indices(self, iteration: int) -> list[int]:
        """Prompt-list indices of all ``P`` groups of ``iteration`` (same on every process)."""
        iteration = _check_int("iteration", iteration, 0)
        n, P = len(self.prompts), self.prompts_per_iteration
        used = n - n % P if P <= n else n  # prompts each pass serves (a whole number of iterations if P <= n)
        positions = range(iteration * P, (iteration + 1) * P)
        return [int(self._pass_order(pos // used)[pos % used]) for pos in positions]

    def prompts_for_iteration(self, iteration: int) -> PromptGroups:
        """This process's prompts (each repeated G times, copies contiguous) and their group ids."""
        indices = self.iteration_indices(iteration)
        first = self.process_index * self.prompts_per_process
        prompts: list[str] = []
        group_ids: list[int] = []
        for group in range(first, first + self.prompts_per_process):
            prompts.extend([self.prompts[indices[group]]] * self.group_size)
            group_ids.extend([group] * self.group_size)
        return PromptGroups(prompts, group_ids)

    def iterate(self, start: int = 0, stop: Optional[int] = None) -> Iterator[PromptGroups]:
        """``prompts_for_iteration(it)`` for ``it = start, start + 1, ...`` (endless if ``stop`` is None)."""
        it = start
        while stop is None or it < stop:
            yield self.prompts_for_iteration(it)
            it += 1

    def __repr__(self) -> str:
        return (f"GroupSampler({len(self.prompts)} prompts, group_size={self.group_size}, "
                f"prompts_per_iteration={self.prompts_per_iteration}, process {self.process_index}/"
                f"{self.num_processes}, seed={self.seed})")
