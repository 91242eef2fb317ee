"""Direct reward backpropagation with consistency distillation (PISCES §1(d), second paradigm).

One optimiser step, per process (B videos = its prompt groups; N-step flow grid ``sigmas[0..N]``,
``σ_min = sigmas[N]`` = 0)::

    x0 [B, C, F, h, w]      dataset latents (videos encoded by the VAE once, or stored latents), or generated
                            by the current policy (no grad, train.latent_source=generated)
    j ~ U{grid levels in train.sigma_range},  σ = sigmas[j],  σ' = sigmas[j+1],  ε ~ N(0, I)
    x_σ  = (1 − σ)·x0 + σ·ε
    x̂0   = x_σ + (σ_min − σ)·v_θ(x_σ, σ)                       student: one Euler jump (LoRA, with grad)
    x_σ' = x_σ + (σ' − σ)·v_φ(x_σ, σ)                          teacher: one Euler step (LoRA disabled, no grad)
    x̃0   = x_σ' + (σ_min − σ')·v_ψ(x_σ', σ')                  target: ψ = sg(θ) ("stopgrad") or EMA(θ) ("ema")
    L_CD = pseudo_huber(x̂0, x̃0, c)                             [B], c = train.huber_c
    R    = RewardServer.differentiable(decode(x̂0), prompts)   [B, R] (decode gradient-checkpointed)
    R̃_ir = (R_ir − sg μ_g(i),r) / (sg σ_g(i),r + ε)           adaptive fusion only (per prompt group g)
    loss = w_cd · mean_i L_CD,i − Σ_r w_r · mean_i R̃_ir       w_r = rewards.weights, w_cd = train.cd_weight

``v`` is one conditional pass by default (``train.guidance_scale=1``, the released code's ``--not_apply_cfg_solver``);
a CFG scale applies to the student and the target, ``train.teacher_guidance_scale`` to the teacher. The
consistency pieces are :mod:`pisces_rl.trainer.consistency` (shared with GRPO's ``cd_weight`` term).
``train_batch_size`` videos go through forward and backward at a time; the micro-batch gradients of a step
accumulate into one optimiser step, after which the EMA is updated: ``ema ← λ·ema + (1 − λ)·θ``.
Gradients reach only the LoRA parameters (the base denoiser, VAE, text and reward encoders are frozen).
Everything random is a pure function of ``(seed, step, process)``, so a resumed run continues exactly.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..config import BackpropConfig, backprop_batch_arithmetic
from ..data.videos import check_video_dataset, open_video_dataset, videos_to_model
from ..rewards import RewardOutput, RewardServer
from ..rollout import sample_rollout
from .accel import gradient_sync, zero_stage
from .advantages import group_index
from .base import RewardsArg, TrainerBase, seed_for
from .consistency import LoraEMA, consistency_target, euler_jump, lora_ema_for, noise_latents
from .losses import pseudo_huber

__all__ = ["BackpropTrainer", "BackpropBatch", "LoraEMA", "noise_latents", "euler_jump", "fuse_rewards"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the maths, as plain functions
def fuse_rewards(scores: Tensor, group_ids, eps: float = 1e-4) -> Tensor:
    """Adaptive fusion: each reward normalised within its prompt group, statistics detached.

    ``R̃_ir = (R_ir − sg μ_gr) / (sg σ_gr + eps)`` with the population mean/std over the group's non-NaN
    scores. The value is the group-normalised reward; the gradient is ``∇R_ir / (σ_gr + eps)``, so rewards
    of different scales pull with comparable strength. Groups with fewer than two valid scores or zero
    spread give 0 (no gradient); NaN scores stay NaN.

    Args:
        scores: ``[B, R]`` rewards (with autograd).
        group_ids: ``[B]`` group label per sample (int tensor or hashable labels).
    Returns:
        ``[B, R]`` fused rewards.
    """
    inv, n = group_index(group_ids)
    inv = inv.to(scores.device)
    d = scores.detach().double()
    valid = ~torch.isnan(d)
    zeros = d.new_zeros(n, d.shape[1])
    count = zeros.index_add(0, inv, valid.double())                                        # [G, R]
    mean = zeros.index_add(0, inv, torch.where(valid, d, 0.0)) / count.clamp(min=1)
    dev = torch.where(valid, d - mean[inv], 0.0)
    std = (zeros.index_add(0, inv, dev * dev) / count.clamp(min=1)).sqrt()               # population std
    usable = (count[inv] >= 2) & (std[inv] > 0)
    scale = torch.where(usable, 1.0 / (std[inv] + eps), 0.0).to(scores.dtype)
    return (scores - mean[inv].to(scores.dtype)) * scale


@dataclass
class BackpropBatch:
    """One process's training data for one step (B videos, groups of G contiguous)."""

    latents: Tensor                            # [B, C, F, h, w] clean latents x0, float32, no grad
    prompts: list[str]                         # B
    group_ids: Tensor                          # [B] long, prompt group of each video
    prompt_embeds: Tensor                      # [B, L, D]
    negative_prompt_embeds: Optional[Tensor]   # [B, L, D] when the student/target or the teacher use CFG, else None
    noise: Tensor                              # [B, C, F, h, w] ε
    step_index: Tensor                         # [B] long, grid index j: σ = sigmas[j], σ' = sigmas[j + 1]


# ---------------------------------------------------------------------- the trainer
class BackpropTrainer(TrainerBase):
    """Direct reward backprop + consistency distillation, usable from Python or through a recipe.

    Args:
        config: a :class:`~pisces_rl.config.BackpropConfig`.
        rewards: ``None`` (build from ``config.rewards``), a :class:`RewardServer`, or ``{name: reward}`` /
            ``{name: (reward, weight)}``. At least one weighted reward must declare ``differentiable=True``.
        policy: an already built :class:`~pisces_rl.models.VideoPolicy` (default: from ``config.model``).
        prompts: prompts overriding ``config.data.prompts`` (``latent_source=generated``).
        dataset: a ``datasets.Dataset`` overriding ``train.video_dataset`` (``latent_source=dataset``): a caption
            column and a ``video`` (uint8 ``[F, H, W, 3]``) or ``latents`` (``[C, F, h, w]``) column.

    Example::

        trainer = BackpropTrainer(load_config(BackpropConfig, overrides=["train.max_steps=2"]))
        trainer.train()
    """

    name = "backprop"

    def __init__(self, config: BackpropConfig, rewards: RewardsArg = None, policy=None,
                 prompts: Optional[list] = None, dataset=None):
        t, s = config.train, config.sampling
        if t.latent_source == "dataset" and dataset is None:  # opened (or rejected) before any model is built
            config.validate()
            dataset = open_video_dataset(t.video_dataset, num_videos=t.dataset_size, num_frames=s.num_frames,
                                         height=s.height, width=s.width)
        self._setup(config, rewards, policy, backprop_batch_arithmetic)
        acc = self.accelerator
        if t.cd_target == "ema" and zero_stage(acc) == 3:
            raise ValueError("train.cd_target=ema needs whole LoRA weights on every process; ZeRO-3 shards them. "
                             "Use a ZeRO-2 / DDP launch config or train.cd_target=stopgrad")
        self.guidance = s.guidance_scale if t.guidance_scale is None else t.guidance_scale
        self.teacher_guidance = self.guidance if t.teacher_guidance_scale is None else t.teacher_guidance_scale
        timesteps, self.sigmas = self.policy.flow_schedule(t.teacher_steps,                  # [N], [N+1]
                                                           (s.num_frames, s.height, s.width))
        self.timesteps = torch.cat([timesteps, timesteps.new_zeros(1)])                  # [N+1], t(σ_min) = 0
        lo, hi = t.sigma_range
        self.levels = torch.nonzero((self.sigmas[:-1] >= lo) & (self.sigmas[:-1] <= hi)).flatten().cpu()
        if not len(self.levels):
            raise ValueError(f"no noise level of the {t.teacher_steps}-step grid {self.sigmas.tolist()} lies in "
                             f"train.sigma_range={list(t.sigma_range)}; widen the range or raise train.teacher_steps")
        self.dataset, self._column, self._encoded = None, None, {}                       # row -> [C, F, h, w]
        if t.latent_source == "dataset":
            self.dataset = dataset
            self._column = check_video_dataset(dataset, t.caption_column, s.num_frames, s.height, s.width,
                                               self.policy.latent_shape(1, s.num_frames, s.height, s.width)[1:])
            prompts = list(dataset[t.caption_column])
        self._setup_prompts(prompts)
        self._setup_optimizer(t.max_steps)
        self.ema = None
        if t.cd_target == "ema":
            self.ema = lora_ema_for(self.policy, t.ema_decay)
            acc.register_for_checkpointing(self.ema)

    # ------------------------------------------------------------------ public API
    def train_step(self, step: int) -> dict[str, float]:
        """Clean latents -> noised -> student jump -> decode -> differentiable rewards (+ CD) -> one step."""
        batch = self.make_batch(step)                                         # x0 [B, C, F, h, w]
        return self.update(batch)

    def make_batch(self, step: int) -> BackpropBatch:
        """This process's clean latents, prompts, noise and noise levels for ``step``."""
        cfg, t, acc = self.config, self.config.train, self.accelerator
        prompts, group_ids = self.sampler.prompts_for_iteration(step)
        with torch.no_grad():
            if self.dataset is None:                                          # generated by the current policy
                gen = torch.Generator().manual_seed(seed_for(t.seed, step, acc.process_index))
                self.policy.transformer.eval()
                sbs = t.sample_batch_size
                x0 = torch.cat([sample_rollout(self.policy, prompts[i:i + sbs], cfg.sampling, generator=gen,
                                               decode=False).latents[:, -1] for i in range(0, len(prompts), sbs)])
            else:                                                             # the rows' clean latents
                first = acc.process_index * self.sampler.prompts_per_process
                rows = self.sampler.iteration_indices(step)[first:first + self.sampler.prompts_per_process]
                x0 = self.dataset_latents(rows).repeat_interleave(t.num_generations, dim=0)
            embeds, negative = self.policy.encode_prompts(prompts, cfg.sampling.negative_prompt,
                                                          max(self.guidance, self.teacher_guidance) > 1,
                                                          cfg.sampling.max_sequence_length)
        gen = torch.Generator().manual_seed(seed_for(t.seed + 1, step, acc.process_index))
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        level = self.levels[torch.randint(len(self.levels), (len(prompts),), generator=gen)]
        return BackpropBatch(x0.float(), list(prompts), torch.as_tensor(group_ids), embeds, negative, noise,
                             level.to(x0.device))

    def update(self, batch: BackpropBatch) -> dict[str, float]:
        """Forward/backward over micro-batches of ``train_batch_size``, then one optimiser step (+ EMA)."""
        t, acc = self.config.train, self.accelerator
        micro = torch.arange(len(batch.prompts)).split(t.train_batch_size)
        stats: dict[str, list[float]] = {}
        outputs = []
        self.model.train()
        for n, rows in enumerate(micro, 1):
            loss, s, out = self.loss(batch, rows)
            with gradient_sync(acc, self.model, sync=n == len(micro)):
                acc.backward(loss / len(micro))
            outputs.append(out)
            for key, v in s.items():
                stats.setdefault(key, []).append(float(v))
        grad_norm = self._optimizer_step()
        if self.ema is not None:
            self.ema.update()
        metrics = {f"train/{k}": sum(v) / len(v) for k, v in stats.items()}
        metrics["train/grad_norm"] = grad_norm
        names = outputs[0].names
        scores = RewardOutput(torch.cat([o.scores for o in outputs]).detach(),
                              torch.cat([o.total for o in outputs]).detach(), names, outputs[0].weights,
                              skipped={n: sum(o.skipped.get(n, 0) for o in outputs) for n in names},
                              not_applicable={n: sum(o.not_applicable.get(n, 0) for o in outputs) for n in names})
        metrics.update(self._reward_metrics(scores))
        return metrics

    def loss(self, batch: BackpropBatch, rows: Tensor) -> tuple[Tensor, dict[str, Tensor], RewardOutput]:
        """``w_cd·mean L_CD − Σ_r w_r·mean R̃_r`` for the videos ``rows`` of ``batch`` (module docstring)."""
        t = self.config.train
        x0, j = batch.latents[rows], batch.step_index[rows]
        sigma, sigma_min = self.sigmas[j], self.sigmas[-1].expand(len(rows))
        cond = self._cond(batch, rows)
        x_sigma = noise_latents(x0, batch.noise[rows], sigma)
        # the target first: the EMA swap writes into the LoRA weights, which the student's graph must not see
        target = self.consistency_target(x_sigma, j, cond) if t.cd_weight > 0 else None
        velocity = self.policy.predict_velocity(x_sigma, self.timesteps[j], *cond)
        x0_hat = euler_jump(x_sigma, velocity, sigma, sigma_min)                 # student jump, with grad
        stats = {"sigma": sigma.mean()}
        if target is not None:
            cd = pseudo_huber(x0_hat, target, t.huber_c).mean()
            stats["cd_loss"] = cd.detach()
        else:  # keeps a graph (and DeepSpeed's collective backward) even if every reward is NaN
            cd = 0.0 * x0_hat.mean()
        videos = self.policy.decode(x0_hat, self.config.sampling.decode_chunk_size, checkpoint=t.decode_checkpointing)
        out = self.rewards.differentiable(videos, [batch.prompts[i] for i in rows.tolist()])
        values = fuse_rewards(out.scores, batch.group_ids[rows]) if t.adaptive_fusion else out.scores  # [b, R]
        valid = ~torch.isnan(values)
        means = torch.where(valid, values, 0.0).sum(0) / valid.sum(0).clamp(min=1)          # [R]
        reward = (means * out.weights.to(means.device)).sum()
        loss = t.cd_weight * cd - reward
        stats.update(reward_term=reward.detach(), loss=loss.detach())
        return loss, stats, out

    def consistency_target(self, x_sigma: Tensor, j: Tensor, cond: tuple) -> Tensor:
        """``x̃0``: teacher Euler step ``σ → σ'`` (LoRA disabled), then the target network's jump ``σ' → σ_min``
        (:func:`pisces_rl.trainer.consistency.consistency_target`). The target network is the current LoRA
        (``cd_target=stopgrad``) or its EMA; the teacher uses ``train.teacher_guidance_scale``. No gradient flows.
        """
        sigma, sigma_next, sigma_min = self.sigmas[j], self.sigmas[j + 1], self.sigmas[-1].expand(len(j))
        return consistency_target(self.policy, x_sigma, sigma, sigma_next, sigma_min, self.timesteps[j],
                                  self.timesteps[j + 1], cond, (*cond[:2], self.teacher_guidance), self.ema)

    def dataset_latents(self, rows) -> Tensor:
        """``[len(rows), C, F, h, w]`` float32 clean latents of dataset rows: the stored ``latents``, or the
        ``video`` encoded by the policy's VAE (posterior mean) the first time a row is used, then cached."""
        rows = [int(r) for r in rows]
        if self._column == "latents":
            stored = self.dataset.with_format("numpy")[rows]["latents"]
            return torch.as_tensor(np.asarray(stored), dtype=torch.float32).to(self.policy.device)
        missing = sorted(set(rows) - set(self._encoded))
        if missing:
            videos = videos_to_model(self.dataset.with_format("numpy")[missing]["video"]).to(self.policy.device)
            with torch.no_grad():
                latents = self.policy.encode(videos, self.config.sampling.decode_chunk_size).float().cpu()
            self._encoded.update(zip(missing, latents))
        return torch.stack([self._encoded[r] for r in rows]).to(self.policy.device)

    # ------------------------------------------------------------------ pieces of the loop
    def _cond(self, batch: BackpropBatch, rows: Tensor) -> tuple:
        negative = None if batch.negative_prompt_embeds is None else batch.negative_prompt_embeds[rows]
        return batch.prompt_embeds[rows], negative, self.guidance

    def _build_rewards(self, rewards: RewardsArg) -> RewardServer:
        """The shared reward server, checked to give the model a gradient."""
        server = super()._build_rewards(rewards)
        weights = dict(zip(server.names, server.weights.tolist()))
        live = [n for n in server.differentiable_names if weights[n] != 0]
        if not live:
            raise ValueError(f"none of the rewards {server.names} is differentiable with a non-zero weight, so no "
                             "reward gradient reaches the model; give a reward whose score is computed from the "
                             "videos with autograd and mark it (`my_reward.differentiable = True`), or train "
                             "black-box rewards with GRPOTrainer")
        frozen = sorted(set(server.names) - set(live))
        if frozen:
            logger.warning("rewards %s give no gradient (not differentiable or weight 0): logged only", frozen)
        return server

    def _finish(self, metrics: dict[str, float]) -> None:
        """The EMA LoRA (``output_dir/lora_ema``), then the shared ending (checkpoint, evaluation, LoRA, summary)."""
        if self.ema is not None and self.accelerator.is_main_process:
            self.policy.save_lora(os.path.join(self.config.output_dir, "lora_ema"), state_dict=self.ema.shadow)
        super()._finish(metrics)
