"""Prompt data: loading prompt lists and the group-keeping GRPO sampler."""
from .prompts import BUILTIN_PROMPTS, load_prompts, vbench_dimensions, vbench_entries, vbench_prompts
from .sampler import GroupSampler, PromptGroups

__all__ = ["load_prompts", "vbench_prompts", "vbench_entries", "vbench_dimensions", "BUILTIN_PROMPTS",
           "GroupSampler", "PromptGroups"]
