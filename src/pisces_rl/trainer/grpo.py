"""GRPO post-training of a LoRA-wrapped text-to-video diffusion model.

One iteration (PISCES §1(d); the ddpo/flow_grpo loop)::

    prompts ─► G rollouts per prompt (SDE sampling, per-step log-probs)      # [B] videos, B = groups * G
            ─► RewardServer scores [B, R] and total [B]
            ─► group-normalised advantages ([B] or [B, R])
            ─► inner epochs: for each micro-batch and each trained timestep,
               clipped surrogate (+ β·KL to the LoRA-disabled model, + CD term) ─► accelerate.backward
            ─► optimizer step per (micro-batches × timesteps) accumulation window
            ─► logs, sample videos, atomic checkpoints

Everything random is a pure function of ``(seed, iteration, process)``, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Union

import torch

from ..config import GRPOConfig, batch_arithmetic, save_yaml
from ..data import GroupSampler, load_prompts
from ..models import build_policy
from ..rewards import RewardServer, build_reward_server
from ..rollout import Rollout, rescore_log_prob, sample_rollout
from .accel import build_accelerator, gather_lora_state_dict, gradient_sync, zero_stage
from .advantages import group_advantages
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .losses import clipped_policy_loss, gaussian_kl, pseudo_huber
from .tracking import format_summary, init_trackers, save_video_grid

logger = logging.getLogger(__name__)

RewardsArg = Union[None, RewardServer, Mapping[str, Any]]


class GRPOTrainer:
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

    def __init__(self, config: GRPOConfig, rewards: RewardsArg = None, policy=None, prompts: Optional[list] = None):
        self.config = cfg = config
        cfg.validate()
        self.accelerator = build_accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=1,  # accumulation by hand over micro-batches x timesteps
            max_grad_norm=cfg.train.max_grad_norm,
            log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
            project_dir=cfg.output_dir,
            train_micro_batch_size=cfg.train.train_batch_size,
        )
        acc = self.accelerator
        self.batch = batch_arithmetic(cfg, acc.num_processes)
        torch.manual_seed(cfg.train.seed)

        self.policy = policy if policy is not None else build_policy(cfg.model, device=acc.device)
        self.rewards = self._build_rewards(rewards)
        self.prompts = list(prompts) if prompts is not None else load_prompts(cfg.data.prompts, cfg.data.prompt_column)
        self.sampler = GroupSampler(self.prompts, group_size=cfg.train.group_size,
                                    prompts_per_iteration=cfg.train.prompts_per_step,
                                    num_processes=acc.num_processes, process_index=acc.process_index,
                                    seed=cfg.train.seed)
        self.eval_prompts = list(cfg.data.eval_prompts) or self.prompts[: cfg.data.num_eval_prompts]

        params = self.policy.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, betas=tuple(cfg.train.adam_betas),
                                      weight_decay=cfg.train.weight_decay)
        self.scheduler = _lr_scheduler(optimizer, cfg.train, total=self.batch["optimizer_steps_per_iteration"]
                                       * cfg.train.max_steps)
        self.model, self.optimizer = acc.prepare(self.policy.transformer, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.policy.set_training_module(self.model)
        self.step = 0
        self.history: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ public API
    def train(self) -> dict[str, float]:
        """Run ``config.train.max_steps`` GRPO iterations (resuming if asked); returns the last metrics."""
        cfg, acc = self.config, self.accelerator
        self._maybe_resume()
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            logger.info("batch arithmetic: %s", self.batch)
        init_trackers(acc, cfg.logging.project_name, cfg.to_dict(), cfg.logging.report_to)
        bar = _progress(acc, cfg.train.max_steps, self.step)
        metrics: dict[str, float] = {}
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            rollout, group_ids = self.sample(self.step)                       # [B] videos
            scores = self.rewards(rollout.videos, rollout.prompts)            # [B, R], [B]
            advantages = self.advantages(scores, group_ids)                   # [B] or [B, R]
            metrics = self.update(rollout, advantages)
            metrics.update(self._reward_metrics(scores))
            metrics.update(self._timing(t0, len(rollout)))
            self.step += 1
            self._log(metrics, bar)
            self._maybe_save_samples()
            self._maybe_checkpoint()
        bar.close()
        self._finish(metrics)
        return metrics

    def sample(self, iteration: int) -> tuple[Rollout, torch.Tensor]:
        """This process's rollouts for ``iteration``: whole groups, G videos per prompt."""
        prompts, group_ids = self.sampler.prompts_for_iteration(iteration)
        sbs = self.config.train.sample_batch_size
        gen = torch.Generator(device="cpu").manual_seed(_seed(self.config.train.seed, iteration,
                                                              self.accelerator.process_index))
        self.policy.transformer.eval()
        chunks = [sample_rollout(self.policy, prompts[i:i + sbs], self.config.sampling, generator=gen)
                  for i in range(0, len(prompts), sbs)]
        return Rollout.cat(chunks), torch.as_tensor(group_ids)

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
        gen = torch.Generator().manual_seed(_seed(t.seed + 1, self.step, acc.process_index))
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

    # ------------------------------------------------------------------ pieces of the loop
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

    def _optimizer_step(self) -> float:
        """At a window boundary: clip, step optimizer and LR schedule; returns the gradient norm (NaN if
        unknown: under DeepSpeed the engine clipped and stepped inside ``backward``)."""
        acc, t = self.accelerator, self.config.train
        norm = None
        if t.max_grad_norm and t.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.policy.trainable_parameters(), t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

    def _build_rewards(self, rewards: RewardsArg) -> RewardServer:
        rc = self.config.rewards
        if isinstance(rewards, RewardServer):
            return rewards
        if rewards is None:
            return build_reward_server(rc, device=self.accelerator.device)
        spec = {name: (r if isinstance(r, tuple) else (r, rc.weights.get(name, 1.0))) for name, r in rewards.items()}
        return RewardServer(spec, max_batch_size=rc.max_batch_size, on_error=rc.on_error,
                            num_frames=rc.num_frames, temporal_windows=rc.temporal_windows)

    def _reward_metrics(self, scores) -> dict[str, float]:
        """Every reward component's mean/std over all processes."""
        acc = self.accelerator
        allscores = acc.gather(scores.scores.float().to(acc.device).contiguous()).cpu()  # [B*np, R]
        total = acc.gather(scores.total.float().to(acc.device).contiguous()).cpu()
        out = {}
        for r, name in enumerate(scores.names):
            col = allscores[:, r]
            col = col[~torch.isnan(col)]
            out[f"reward/{name}/mean"] = col.mean().item() if len(col) else float("nan")
            out[f"reward/{name}/std"] = col.std(unbiased=False).item() if len(col) else float("nan")
        ok = total[~torch.isnan(total)]
        out["reward/total/mean"] = ok.mean().item() if len(ok) else float("nan")
        out["reward/total/std"] = ok.std(unbiased=False).item() if len(ok) else float("nan")
        out["reward/nan_samples"] = float(torch.isnan(total).sum())
        return out

    def _timing(self, t0: float, n_local: int) -> dict[str, float]:
        dt = time.perf_counter() - t0
        return {"time/step_s": dt, "time/samples_per_s": n_local * self.accelerator.num_processes / dt,
                "train/lr": self.scheduler.get_last_lr()[0]}

    def _log(self, metrics: dict[str, float], bar) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)
        if self.step % max(1, self.config.logging.log_every) == 0 or self.step == self.config.train.max_steps:
            self.accelerator.log(metrics, step=self.step)
        bar.update(1)
        bar.set_postfix({"reward": f"{metrics.get('reward/total/mean', float('nan')):.4f}",
                         "loss": f"{metrics.get('train/loss', float('nan')):.3g}"})

    def save_samples(self, tag: str) -> Optional[str]:
        """Deterministic (η = 0) videos of the eval prompts, saved as a grid under ``output_dir/samples``."""
        if not self.eval_prompts:
            return None
        sampling = _replace(self.config.sampling, eta=0.0)
        gen = torch.Generator().manual_seed(self.config.train.seed)
        self.policy.transformer.eval()
        videos = sample_rollout(self.policy, self.eval_prompts, sampling, generator=gen).videos
        if not self.accelerator.is_main_process:
            return None
        path = os.path.join(self.config.output_dir, "samples", f"{tag}.{self.config.logging.video_format}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_video_grid(videos.float().cpu(), path, nrow=len(self.eval_prompts))
        return path

    def _maybe_save_samples(self) -> None:
        every = self.config.logging.sample_every
        if every and self.step % every == 0 and self.step < self.config.train.max_steps:
            self.save_samples(f"step-{self.step:06d}")

    def _maybe_checkpoint(self, force: bool = False) -> None:
        c = self.config.checkpoint
        if force or (c.save_every and self.step % c.save_every == 0):
            save_checkpoint(self.accelerator, self.config.output_dir, self.step, models=[self.model],
                            extra_state={"step": self.step, "history": self.history},
                            lora_saver=self.save_lora, keep_last=c.keep_last)

    def save_lora(self, directory: str, state_dict=None) -> None:
        """LoRA weights in diffusers format (``pipe.load_lora_weights(directory)``), complete under ZeRO-3."""
        state = gather_lora_state_dict(self.accelerator, self.model)
        if self.accelerator.is_main_process:
            self.policy.save_lora(directory, state_dict=state)

    def _maybe_resume(self) -> None:
        c = self.config.checkpoint
        if not c.resume_from:
            return
        path = find_checkpoint(self.config.output_dir, c.resume_from)
        if path is None:
            return
        state = load_checkpoint(self.accelerator, path)
        self.step = int(state["step"])
        self.history = state.get("history", {})
        logger.info("resumed from %s at iteration %d", path, self.step)

    def _finish(self, metrics: dict[str, float]) -> None:
        """Final checkpoint (unless just written), sample grid, LoRA weights and a summary."""
        acc, c = self.accelerator, self.config.checkpoint
        if not (c.save_every and self.step % c.save_every == 0):
            self._maybe_checkpoint(force=True)
        self.save_samples("final")
        self.save_lora(os.path.join(self.config.output_dir, "lora"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            summary = {"steps": self.step, "num_processes": acc.num_processes,
                       "distributed_type": str(acc.distributed_type), "zero_stage": zero_stage(acc),
                       "batch": self.batch, "metrics": metrics}
            with open(os.path.join(self.config.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=float)
            print(format_summary(metrics))
            print(f"run directory: {self.config.output_dir}  (samples/, lora/, checkpoints/, summary.json; "
                  f"tensorboard --logdir {self.config.output_dir})")
        acc.end_training()


# ---------------------------------------------------------------------- helpers
def _seed(seed: int, iteration: int, process: int) -> int:
    return (seed * 1_000_003 + iteration * 7919 + process) % (2**63 - 1)


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes) if dataclasses.is_dataclass(obj) else obj


def _lr_scheduler(optimizer, t, total: int):
    """constant | linear | cosine decay after ``warmup_steps`` optimizer steps."""
    total = max(1, total)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / max(1, t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
        if t.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if t.lr_scheduler == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(acc, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="GRPO", disable=not acc.is_local_main_process, dynamic_ncols=True)
