"""Rollouts: flow-matching SDE sampling with per-step log-probabilities.

>>> rollout = sample_rollout(policy, prompts, sampling_cfg, generator=torch.Generator().manual_seed(0))
>>> rollout.latents.shape          # [B, T+1, C, F, h, w]
>>> new = rescore_log_prob(policy, rollout, rollout.train_step_indices[:, 0])   # under autograd
>>> ratio = torch.exp(new.log_prob - rollout.log_probs.gather(1, rollout.train_step_indices[:, :1]).squeeze(1))
"""
from .sampler import rescore_log_prob, sample_rollout, select_train_steps
from .sde import SDE_TYPES, SDEStep, resolve_sde_type, sde_std, sde_std_table, sde_step_with_logprob
from .types import Rollout, cat

__all__ = ["sde_step_with_logprob", "sde_std", "sde_std_table", "SDE_TYPES", "resolve_sde_type", "SDEStep", "Rollout", "cat", "sample_rollout", "rescore_log_prob",
           "select_train_steps"]
