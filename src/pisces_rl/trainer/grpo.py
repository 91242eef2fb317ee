"""GRPO post-training of a LoRA-wrapped text-to-video diffusion model.

One iteration (PISCES §1(d); the ddpo/flow_grpo loop)::

    prompts ─► G rollouts per prompt (SDE sampling, per-step log-probs)      # [B] videos, B = groups * G
            ─► RewardServer scores [B, R] and total [B]
            ─► group-baseline advantages ([B] or [B, R]), scaled per train.scale_rewards
            ─► num_iterations passes: for each micro-batch and each trained timestep,
               clipped surrogate (+ β·KL to the LoRA-disabled model, + w_cd·L_CD) ─► accelerate.backward
            ─► optimizer step per (micro-batches × timesteps) accumulation window

The run around it (logging, evaluation, checkpoints, resume) is :class:`~pisces_rl.trainer.base.TrainerBase`.
Everything random is a pure function of ``(seed, iteration, process)``, so a resumed run continues exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import ConfigError, GRPOConfig, batch_arithmetic
from ..rollout import Rollout, rescore_log_prob, resolve_sde_type, sample_rollout, sde_std_table
from .accel import gradient_sync, zero_stage
from .advantages import gather_scores, group_advantages
from .base import RewardsArg, TrainerBase, logger, seed_for
from .consistency import consistency_target, euler_jump, lora_ema_for
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
        sde_type = resolve_sde_type(s.sde_type, self.policy.family)   # "auto": the family's (sample_rollout too)
        sigmas = self.policy.flow_schedule(s.num_inference_steps, (s.num_frames, s.height, s.width))[1]
        std, var = sde_std_table(sigmas, s.eta, sde_type, s.sde_window)
        logger.info("SDE %s%s eta=%g: per-step std %s, total injected variance %.4g", sde_type,
                    " (sampling.sde_type=auto: the model family's)" if s.sde_type == "auto" else "", s.eta,
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
        """Group-baseline, scaled, clipped advantages (``train.advantage_mode``, ``train.scale_rewards``).

        With ``scale_rewards=batch`` the std is over every process's rewards (gathered), so all processes
        scale by the same number, as Flow-GRPO's ``global_std`` and trl's ``"batch"`` do.
        """
        t = self.config.train
        per_reward = t.advantage_mode == "per_reward"
        values = (scores.scores if per_reward else scores.total).float().cpu()     # [B, R] or [B]
        batch = gather_scores(values, self.accelerator) if t.scale_rewards == "batch" else None
        return group_advantages(values, group_ids, weights=scores.weights if per_reward else None,
                                mode=t.advantage_mode, clip=t.adv_clip_max, scale=t.scale_rewards,
                                batch_scores=batch)

    def update(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """``num_iterations`` passes of clipped-surrogate updates over micro-batches x trained timesteps.

        One optimizer step per window of ``gradient_accumulation_steps`` micro-batches x K timesteps;
        :func:`gradient_sync` marks the window's last backward (DDP all-reduce / DeepSpeed step).
        """
        t, acc = self.config.train, self.accelerator
        num_k = rollout.train_step_indices.shape[1]                           # K trained steps per video
        window = t.gradient_accumulation_steps * num_k
        total = t.num_iterations * math.ceil(len(rollout) / t.train_batch_size) * num_k
        gen = torch.Generator().manual_seed(seed_for(t.seed + 1, self.step, acc.process_index))
        weights = self.rewards.weights if t.advantage_mode == "per_reward" else None
        stats: dict[str, list[float]] = {}
        self.model.train()
        n = 0
        for _ in range(t.num_iterations):
            order = torch.randperm(len(rollout), generator=gen)
            for mb in order.split(t.train_batch_size):
                for k in range(num_k):
                    j = rollout.train_step_indices[mb, k]                      # [b] one step per video
                    out = rescore_log_prob(self.policy, rollout, j, mb)
                    old = rollout.log_probs[mb, j].to(out.log_prob.device)
                    adv = advantages[mb].to(out.log_prob.device)
                    loss, s = clipped_policy_loss(out.log_prob, old, adv, t.epsilon, weights=weights)
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
        """``w_cd·L_CD`` (PISCES Eq. 7, :meth:`consistency_loss`), and β·KL(π‖π_ref) and the base-model anchor
        ``pseudo_huber(mean_θ, mean_ref)``, both against the LoRA-disabled model.

        The KL is on Flow-GRPO's scale (divided by ``g² = std²/|dt|``, not by the step variance ``std²``), so
        published ``beta`` values transfer; with ``noise_block > 1`` only the block-averaged mean difference
        counts, as in the step's density (:func:`~pisces_rl.trainer.losses.gaussian_kl`).
        """
        t = self.config.train
        extra = torch.zeros((), device=out.log_prob.device)
        if t.cd_weight > 0:
            cd = self.consistency_loss(rollout, j, mb)
            stats["cd_loss"] = cd.detach()
            extra = extra + t.cd_weight * cd
        if t.beta <= 0 and t.base_anchor_weight <= 0:
            return extra
        with torch.no_grad(), self.policy.lora_disabled():
            ref = rescore_log_prob(self.policy, rollout, j, mb)
        if t.beta > 0:
            dt = (rollout.sigmas[j + 1] - rollout.sigmas[j]).to(out.mean.device)         # [b] sigma' - sigma
            kl = gaussian_kl(out.mean, ref.mean, out.std, dt=dt, noise_block=rollout.noise_block).mean()
            stats["kl"] = kl.detach()
            extra = extra + t.beta * kl
        if t.base_anchor_weight > 0:
            anchor = pseudo_huber(out.mean, ref.mean).mean()
            stats["base_anchor"] = anchor.detach()
            extra = extra + t.base_anchor_weight * anchor
        return extra

    def consistency_loss(self, rollout: Rollout, j: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        """Mean ``L_CD`` over the videos ``mb`` at their recorded states ``x = latents[mb, j]`` (released code:
        roar-ai/pisces ``fastvideo/distill_grpo.py``, the distill term beside the clipped surrogates)::

            x̂0   = x    + (σ_min − σ_j)    ·v_θ(x, σ_j)          student (LoRA, with grad)
            x'   = x    + (σ_j+1 − σ_j)    ·v_φ(x, σ_j)          teacher: one sampling step, LoRA disabled
            x̃0   = x'   + (σ_min − σ_j+1)  ·v_ψ(x', σ_j+1)       target: current LoRA (stopgrad) or its EMA
            L_CD = pseudo_huber(x̂0, x̃0)

        on the rollout's sampling grid, all three at ``train.cd_guidance_scale``. The student's velocity is its
        own forward pass (the log-prob step's guided velocity is not returned by ``rescore_log_prob``).
        """
        g = self.cd_guidance
        x = rollout.latents[mb, j]                                            # [b, C, F, h, w]
        sigmas = rollout.sigmas.to(x.device)
        timesteps = torch.cat([rollout.timesteps, rollout.timesteps.new_zeros(1)]).to(x.device)  # t(σ_min) = 0
        sigma, sigma_min = sigmas[j], sigmas[-1].expand(len(j))
        negative = None if g <= 1 or rollout.negative_prompt_embeds is None else rollout.negative_prompt_embeds[mb]
        cond = (rollout.prompt_embeds[mb], negative, g)
        target = consistency_target(self.policy, x, sigma, sigmas[j + 1], sigma_min, timesteps[j],
                                    timesteps[j + 1], cond, ema=self.ema)
        x0_hat = euler_jump(x, self.policy.predict_velocity(x, timesteps[j], *cond), sigma, sigma_min)
        return pseudo_huber(x0_hat, target).mean()

    def _setup_optimizer(self, total_optimizer_steps: int) -> None:
        """The shared optimiser set-up, then the CD term's EMA target (registered for checkpointing)."""
        super()._setup_optimizer(total_optimizer_steps)
        t = self.config.train
        self.cd_guidance = self.config.sampling.guidance_scale if t.cd_guidance_scale is None else t.cd_guidance_scale
        if (t.cd_weight > 0 and self.cd_guidance > 1 and self.config.sampling.guidance_scale <= 1
                and not self.policy.embedded_guidance):
            raise ConfigError(f"{self.cd_guidance} > 1 needs the negative prompt embeddings of CFG sampling, but "
                              "sampling.guidance_scale <= 1 records none; set it to 1 or null", "train.cd_guidance_scale")
        self.ema = None
        if t.cd_weight > 0 and t.cd_target == "ema":
            if zero_stage(self.accelerator) == 3:
                raise ValueError("train.cd_target=ema needs whole LoRA weights on every process; ZeRO-3 shards them. "
                                 "Use a ZeRO-2 / DDP launch config or train.cd_target=stopgrad")
            self.ema = lora_ema_for(self.policy, t.cd_ema_decay)
            self.accelerator.register_for_checkpointing(self.ema)

    def _optimizer_step(self) -> float:
        """The shared optimiser step, then the EMA target's update ``ema ← λ·ema + (1 − λ)·θ``."""
        norm = super()._optimizer_step()
        if self.ema is not None:
            self.ema.update()
        return norm
