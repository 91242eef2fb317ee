"""GRPO post-training of a LoRA-wrapped text-to-video diffusion model.

One iteration (PISCES §1(d); the ddpo/flow_grpo loop)::

    prompts ─► G rollouts per prompt (SDE sampling, per-step log-probs)      # [B] videos, B = groups * G
            ─► RewardServer scores [B, R] and total [B]
            ─► group-normalised advantages ([B] or [B, R])
            ─► inner epochs: for each micro-batch and each trained timestep,
               clipped surrogate (+ β·KL to the LoRA-disabled model, + CD term) ─► accelerate.backward
            ─► optimizer step per (micro-batches × timesteps) accumulation window

The run around it (logging, evaluation, checkpoints, resume) is :class:`~pisces_rl.trainer.base.TrainerBase`.
Everything random is a pure function of ``(seed, iteration, process)``, so a resumed run continues exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import GRPOConfig, batch_arithmetic
from ..rollout import Rollout, rescore_log_prob, sample_rollout, sde_std_table
from .accel import gradient_sync
from .advantages import group_advantages
from .base import RewardsArg, TrainerBase, logger, seed_for
from .losses import clipped_policy_loss, gaussian_kl, pseudo_huber


class GRPOTrainer(TrainerBase):
    """Clipped GRPO/PPO post-training, usable from Python or through a recipe.

    Args:
        config: a :class:`~pisces_rl.config.GRPOConfig`.
        rewards: ``None`` (build from ``config.rewards``), a ready :class:`RewardServer`, or a mapping
            ``{name: reward}`` / ``{name: (reward, weight)}`` of callables or ``"module:function"`` specs
            (weights default to ``config.rewards.weights.get(name, 1.0)``).
        policy: an already built :class:`~pisces_rl.models.VideoPolicy` (default: built from ``config.model``).
        prompts: a prompt list overriding ``config.data.prompts``.

    Example::

        trainer = GRPOTrainer(load_config(GRPOConfig, overrides=["train.max_steps=2"]),
                              rewards={"bright": (lambda videos, prompts: videos.mean((1, 2, 3, 4)), 1.0)})
        trainer.train()
    """

    name = "GRPO"

    def __init__(self, config: GRPOConfig, rewards: RewardsArg = None, policy=None, prompts: Optional[list] = None):
        self._setup(config, rewards, policy, batch_arithmetic)
        self._setup_prompts(prompts)
        self._setup_optimizer(self.batch["optimizer_steps_per_iteration"] * config.train.max_steps)
        s = config.sampling  # the exploration the SDE sampler will inject (rollout/sde.py, sde_std_table)
        std, var = sde_std_table(self.policy.flow_schedule(s.num_inference_steps)[1], s.eta, s.sde_type, s.sde_window)
        logger.info("SDE %s eta=%g: per-step std %s, total injected variance %.4g", s.sde_type, s.eta,
                    [round(x, 4) for x in std.tolist()], var)

    def train_step(self, iteration: int) -> dict[str, float]:
        """Sample whole groups, score them, normalise advantages within groups, clipped updates."""
        rollout, group_ids = self.sample(iteration)                           # [B] videos
        scores = self.rewards(rollout.videos, rollout.prompts)                # [B, R], [B]
        advantages = self.advantages(scores, group_ids)                       # [B] or [B, R]
        metrics = self.update(rollout, advantages)
        metrics.update(self._reward_metrics(scores))
        return metrics

    def sample(self, iteration: int) -> tuple[Rollout, torch.Tensor]:
        """This process's rollouts for ``iteration``: whole groups, G videos per prompt."""
        prompts, group_ids = self.sampler.prompts_for_iteration(iteration)
        sbs = self.config.train.sample_batch_size
        gen = torch.Generator(device="cpu").manual_seed(seed_for(self.config.train.seed, iteration,
                                                              self.accelerator.process_index))
        self.policy.transformer.eval()
        latents = self._group_noise(group_ids, gen) if self.config.train.shared_group_noise else None
        chunks = [sample_rollout(self.policy, prompts[i:i + sbs], self.config.sampling, generator=gen,
                                 latents=None if latents is None else latents[i:i + sbs])
                  for i in range(0, len(prompts), sbs)]
        return Rollout.cat(chunks), torch.as_tensor(group_ids)

    def _group_noise(self, group_ids, gen: torch.Generator) -> torch.Tensor:
        """Initial noise ``[B, C, F, h, w]``, one draw per group repeated over its videos."""
        s = self.config.sampling
        ids = torch.as_tensor(group_ids)
        groups, index = torch.unique(ids, return_inverse=True)
        noise = torch.randn(self.policy.latent_shape(len(groups), s.num_frames, s.height, s.width), generator=gen)
        return noise[index]

    def advantages(self, scores, group_ids: torch.Tensor) -> torch.Tensor:
        """Group-normalised, clipped advantages (``train.advantage_mode``)."""
        t = self.config.train
        values = scores.scores if t.advantage_mode == "per_reward" else scores.total
        return group_advantages(values.float().cpu(), group_ids, weights=scores.weights if
                                t.advantage_mode == "per_reward" else None,
                                mode=t.advantage_mode, clip=t.adv_clip_max)

    def update(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """Inner epochs of clipped-surrogate updates over micro-batches x trained timesteps.

        One optimizer step per window of ``gradient_accumulation_steps`` micro-batches x K timesteps;
        :func:`gradient_sync` marks the window's last backward (DDP all-reduce / DeepSpeed step).
        """
        t, acc = self.config.train, self.accelerator
        num_k = rollout.train_step_indices.shape[1]                           # K trained steps per video
        window = t.gradient_accumulation_steps * num_k
        total = t.num_inner_epochs * math.ceil(len(rollout) / t.train_batch_size) * num_k
        gen = torch.Generator().manual_seed(seed_for(t.seed + 1, self.step, acc.process_index))
        weights = self.rewards.weights if t.advantage_mode == "per_reward" else None
        stats: dict[str, list[float]] = {}
        self.model.train()
        n = 0
        for _ in range(t.num_inner_epochs):
            order = torch.randperm(len(rollout), generator=gen)
            for mb in order.split(t.train_batch_size):
                for k in range(num_k):
                    j = rollout.train_step_indices[mb, k]                      # [b] one step per video
                    out = rescore_log_prob(self.policy, rollout, j, mb)
                    old = rollout.log_probs[mb, j].to(out.log_prob.device)
                    adv = advantages[mb].to(out.log_prob.device)
                    loss, s = clipped_policy_loss(out.log_prob, old, adv, t.clip_range, weights=weights)
                    loss = loss + self._regularisers(rollout, j, mb, out, s)
                    s["loss"] = loss.detach()
                    n += 1
                    boundary = n % window == 0 or n == total
                    with gradient_sync(acc, self.model, sync=boundary):
                        acc.backward(loss / window)
                    if boundary:
                        s["grad_norm"] = self._optimizer_step()
                    for key, v in s.items():
                        stats.setdefault(key, []).append(float(v))
        return {f"train/{k}": sum(v) / len(v) for k, v in stats.items()}

    # ------------------------------------------------------------------ regularisers
    def _regularisers(self, rollout, j, mb, out, stats) -> torch.Tensor:
        """β·KL(π‖π_ref) and the consistency-distillation term, both against the LoRA-disabled model."""
        t = self.config.train
        extra = torch.zeros((), device=out.log_prob.device)
        if t.kl_beta <= 0 and t.cd_weight <= 0:
            return extra
        with torch.no_grad(), self.policy.lora_disabled():
            ref = rescore_log_prob(self.policy, rollout, j, mb)
        if t.kl_beta > 0:
            kl = gaussian_kl(out.mean, ref.mean, out.std).mean()
            stats["kl"] = kl.detach()
            extra = extra + t.kl_beta * kl
        if t.cd_weight > 0:
            cd = pseudo_huber(out.mean, ref.mean).mean()
            stats["cd_loss"] = cd.detach()
            extra = extra + t.cd_weight * cd
        return extra
