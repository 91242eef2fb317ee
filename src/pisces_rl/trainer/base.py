"""What every pisces_rl trainer shares: set-up, the outer loop, logging, evaluation, checkpoints, the ending.

A trainer subclasses :class:`TrainerBase` and implements :meth:`TrainerBase.train_step` (one iteration,
returning its metrics). The base class owns the run around it::

    resume? ─► save config, start trackers ─► evaluate "before" (base model, LoRA disabled)
        ─► for step in range(start, max_steps): train_step ─► log ─► sample videos ─► checkpoint
        ─► final checkpoint, evaluate "after", before/after grid, curves, LoRA weights, summary.json

Everything random is a pure function of ``(seed, step, process)``, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping, Optional, Union

import torch

from ..config import save_yaml
from ..config.inputs import check_inputs
from ..data import GroupSampler, load_prompts
from ..models import build_policy
from ..rewards import RewardServer, build_reward_server
from .accel import build_accelerator, gather_lora_state_dict, zero_stage
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .evaluation import EvalResult, evaluate_policy, resolve_judge
from .run_dir import check_output_dir, clear_previous_run
from .tracking import format_summary, init_trackers, plot_curve, save_video_grid

logger = logging.getLogger("pisces_rl.trainer")

RewardsArg = Union[None, RewardServer, Mapping[str, Any]]


class TrainerBase:
    """Shared machinery; see the module docstring. Subclasses set up their own pieces in ``__init__``."""

    name = "train"

    # ------------------------------------------------------------------ set-up helpers
    def _setup(self, config, rewards: RewardsArg, policy, batch_arithmetic) -> None:
        """Validate the config; build accelerator, batch arithmetic, policy and reward server."""
        self.config = cfg = config
        cfg.validate()
        check_inputs(cfg, model=policy is None, rewards=rewards is None, data=False)  # before anything is built
        overwrite = check_output_dir(cfg)
        t = cfg.train
        self.accelerator = acc = build_accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=1,  # trainers accumulate by hand (gradient_sync)
            max_grad_norm=t.max_grad_norm,
            log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
            project_dir=cfg.output_dir,
            train_micro_batch_size=t.train_batch_size,
        )
        if overwrite and acc.is_main_process:
            logger.info("overwrite_output_dir: removed the previous run's %s", clear_previous_run(cfg.output_dir))
        acc.wait_for_everyone()
        self.batch = batch_arithmetic(cfg, acc.num_processes)
        torch.manual_seed(t.seed)
        self.policy = policy if policy is not None else build_policy(cfg.model, device=acc.device)
        self.rewards = self._build_rewards(rewards)
        self.judge = resolve_judge(cfg.logging.judge)
        self.step = 0
        self.history: dict[str, list[float]] = {}
        self.before: Optional[EvalResult] = None

    def _setup_prompts(self, prompts: Optional[list]) -> None:
        """Training prompts, the group-keeping sampler, and the fixed evaluation prompts."""
        cfg, acc = self.config, self.accelerator
        d = cfg.data
        self.prompts = list(prompts) if prompts is not None else load_prompts(d.prompts, d.prompt_column)
        self.sampler = GroupSampler(self.prompts, group_size=cfg.train.group_size,
                                    prompts_per_iteration=cfg.train.prompts_per_step,
                                    num_processes=acc.num_processes, process_index=acc.process_index,
                                    seed=cfg.train.seed)
        if d.eval_prompts:
            self.eval_prompts = list(d.eval_prompts)
        elif d.eval_source:
            self.eval_prompts = load_prompts(d.eval_source, d.prompt_column)[: d.num_eval_prompts]
        else:
            self.eval_prompts = self.prompts[: d.num_eval_prompts]

    def _setup_optimizer(self, total_optimizer_steps: int) -> None:
        """AdamW over the LoRA parameters, the LR schedule, and ``accelerate.prepare``."""
        t, acc = self.config.train, self.accelerator
        optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=t.learning_rate,
                                      betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.scheduler = lr_scheduler(optimizer, t, total=total_optimizer_steps)
        self.model, self.optimizer = acc.prepare(self.policy.transformer, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.policy.set_training_module(self.model)

    def _build_rewards(self, rewards: RewardsArg) -> RewardServer:
        """``None`` -> from ``config.rewards``; a RewardServer as is; ``{name: fn | (fn, weight)}`` -> a server."""
        rc = self.config.rewards
        if isinstance(rewards, RewardServer):
            return rewards
        if rewards is None:
            return build_reward_server(rc, device=self.accelerator.device)
        spec = {name: (r if isinstance(r, tuple) else (r, rc.weights.get(name, 1.0))) for name, r in rewards.items()}
        return RewardServer(spec, max_batch_size=rc.max_batch_size, on_error=rc.on_error,
                            num_frames=rc.num_frames, temporal_windows=rc.temporal_windows,
                            max_frames_per_call=rc.max_frames_per_call)

    # ------------------------------------------------------------------ the run
    def train_step(self, step: int) -> dict[str, float]:
        """One iteration of the algorithm; returns its metrics. Implemented by each trainer."""
        raise NotImplementedError

    def train(self) -> dict[str, float]:
        """Run ``config.train.max_steps`` steps (resuming if asked); returns the last step's metrics."""
        cfg, acc = self.config, self.accelerator
        self._maybe_resume()
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            logger.info("batch arithmetic: %s", self.batch)
        init_trackers(acc, cfg.logging.project_name, cfg.to_dict(), cfg.logging.report_to)
        if self.step == 0:
            self.before = self.evaluate(base_model=True)
            self._announce("before (base model)", self.before.metrics)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=self.name,
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        metrics: dict[str, float] = {}
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            metrics = self.train_step(self.step)
            metrics.update(self._timing(t0))
            self.step += 1
            self._log(metrics, bar)
            self._maybe_save_samples()
            self._maybe_checkpoint()
        bar.close()
        self._finish(metrics)
        return metrics

    # ------------------------------------------------------------------ shared pieces
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

    def _reward_metrics(self, scores) -> dict[str, float]:
        """Every reward component's mean/std over all processes (NaN = not applicable, left out)."""
        acc = self.accelerator
        allscores = acc.gather(scores.scores.float().to(acc.device).contiguous()).cpu()  # [B*np, R]
        total = acc.gather(scores.total.float().to(acc.device).contiguous()).cpu()       # [B*np]
        out = {}
        for name, col in [*zip(scores.names, allscores.T), ("total", total)]:
            col = col[~torch.isnan(col)]
            out[f"reward/{name}/mean"] = col.mean().item() if len(col) else float("nan")
            out[f"reward/{name}/std"] = col.std(unbiased=False).item() if len(col) else float("nan")
        out["reward/nan_samples"] = float(torch.isnan(total).sum())
        return out

    def _timing(self, t0: float) -> dict[str, float]:
        dt = time.perf_counter() - t0
        t = self.config.train
        return {"time/step_s": dt, "time/samples_per_s": t.prompts_per_step * t.group_size / dt,
                "train/lr": self.scheduler.get_last_lr()[0]}

    def _log(self, metrics: dict[str, float], bar) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)
        if self.step % max(1, self.config.logging.log_every) == 0 or self.step == self.config.train.max_steps:
            self.accelerator.log(metrics, step=self.step)
        bar.update(1)
        bar.set_postfix({"reward": f"{metrics.get('reward/total/mean', float('nan')):.4f}",
                         "loss": f"{metrics.get('train/loss', float('nan')):.3g}"})

    def evaluate(self, base_model: bool = False) -> EvalResult:
        """The eval prompts sampled deterministically (η = 0, same noise every time) and scored by the rewards
        and the judge; ``base_model=True`` disables the LoRA (the "before" of the run)."""
        cfg = self.config
        self.policy.transformer.eval()
        run = lambda: evaluate_policy(self.policy, self.rewards, self.eval_prompts, cfg.sampling,  # noqa: E731
                                      seed=cfg.train.seed, judge=self.judge,
                                      batch_size=cfg.train.sample_batch_size)
        if base_model:
            with self.policy.lora_disabled():
                return run()
        return run()

    def save_samples(self, tag: str, videos: Optional[torch.Tensor] = None) -> Optional[str]:
        """A grid of the eval prompts' videos under ``output_dir/samples/<tag>.<format>`` (main process)."""
        if not self.eval_prompts:
            return None
        videos = self.evaluate().videos if videos is None else videos
        if not self.accelerator.is_main_process:
            return None
        path = os.path.join(self.config.output_dir, "samples", f"{tag}.{self.config.logging.video_format}")
        return save_video_grid(videos, path, nrow=len(self.eval_prompts))

    def _maybe_save_samples(self) -> None:
        every = self.config.logging.sample_every
        if every and self.step % every == 0 and self.step < self.config.train.max_steps:
            self.save_samples(f"step-{self.step:06d}")

    def _maybe_checkpoint(self, force: bool = False) -> None:
        c = self.config.checkpoint
        if force or (c.save_every and self.step % c.save_every == 0):
            save_checkpoint(self.accelerator, self.config.output_dir, self.step, models=[self.model],
                            extra_state={"step": self.step, "history": self.history,
                                         "config": self.config.to_dict()},  # what resume compares (run_dir.py)
                            lora_saver=self.save_lora, keep_last=c.keep_last)

    def save_lora(self, directory: str, state_dict=None) -> None:
        """LoRA weights in diffusers format (``pipe.load_lora_weights(directory)``), complete under ZeRO-3.
        Call on every process (ZeRO-3 gathers shards); only the main process writes."""
        state = gather_lora_state_dict(self.accelerator, self.model) if state_dict is None else state_dict
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
        logger.info("resumed from %s at step %d", path, self.step)

    def _announce(self, what: str, metrics: Mapping[str, float]) -> None:
        if self.accelerator.is_main_process and (self.judge is not None or self.step == 0):
            shown = {k: v for k, v in metrics.items() if k.startswith("judge/") or k == "reward/total"}
            logger.info("%s: %s", what, ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))

    def _finish(self, metrics: dict[str, float]) -> None:
        """Final checkpoint (unless just written), before/after evaluation and grid, curves, LoRA, summary."""
        acc, c, out = self.accelerator, self.config.checkpoint, self.config.output_dir
        if not (c.save_every and self.step % c.save_every == 0):
            self._maybe_checkpoint(force=True)
        before = self.before if self.before is not None else self.evaluate(base_model=True)
        after = self.evaluate()
        self.save_lora(os.path.join(out, "lora"))
        acc.wait_for_everyone()
        if not acc.is_main_process:
            acc.end_training()
            return
        fmt = self.config.logging.video_format
        save_video_grid(after.videos, os.path.join(out, "samples", f"final.{fmt}"), nrow=len(self.eval_prompts))
        grid = save_video_grid(torch.cat([before.videos, after.videos]), os.path.join(out, f"before_after.{fmt}"),
                               nrow=len(self.eval_prompts))
        curves = {k: v for k, v in self.history.items()
                  if k in ("reward/total/mean", "train/loss") or (k.startswith("reward/") and k.endswith("/mean"))}
        curve = plot_curve(curves, os.path.join(out, "reward_curve.png"), title=f"{self.name}: rewards") if any(
            curves.values()) else None
        comparison = {k: {"before": before.metrics[k], "after": after.metrics[k]} for k in after.metrics}
        summary = {"steps": self.step, "num_processes": acc.num_processes,
                   "distributed_type": str(acc.distributed_type), "zero_stage": zero_stage(acc),
                   "batch": self.batch, "metrics": metrics, "eval": comparison, "eval_prompts": self.eval_prompts,
                   "history": self.history}
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
        print(format_summary(metrics))
        print(format_summary(comparison, title=f"Evaluation on {len(self.eval_prompts)} fixed prompts "
                                              "(before = base model, after = trained LoRA)"))
        print(f"run directory: {out}\n  before/after videos: {grid}\n  reward curve: {curve}\n"
              f"  LoRA: {os.path.join(out, 'lora')}  (pipe.load_lora_weights)\n  tensorboard --logdir {out}")
        acc.end_training()


def seed_for(seed: int, step: int, process: int) -> int:
    """The seed of everything random in ``step`` on ``process`` (pure, so resume is exact)."""
    return (seed * 1_000_003 + step * 7919 + process) % (2**63 - 1)


def lr_scheduler(optimizer, t, total: int):
    """constant | linear | cosine decay after ``t.warmup_steps`` optimizer steps, over ``total`` steps."""
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
