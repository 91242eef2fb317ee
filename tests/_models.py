"""Shared test helpers for building tiny policies."""
from types import SimpleNamespace


def model_cfg(**overrides):
    """A ``model:`` section for ``build_policy``: the tiny in-code Wan with a rank-4 LoRA, overridable."""
    cfg = dict(pretrained="tiny", family="wan", dtype="fp32", lora_rank=4, lora_alpha=8,
               lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_path=None,
               gradient_checkpointing=False, seed=0)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)
