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
from ..models import UpdateRatio, build_policy
from ..rewards import RewardOutput, RewardServer, build_reward_server
from .accel import build_accelerator, gather_full_state_dict, gather_lora_state_dict, zero_stage
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .evaluation import EvalResult, eval_series, evaluate_policy, resolve_judge
from .figures import plot_reward_curves, save_captioned_grid
from .model_card import create_hub_repo, hub_repo_name, upload_to_hub, write_model_card
from .run_dir import check_output_dir, clear_previous_run
from .tracking import format_summary, init_trackers, progress_postfix, save_video_grid

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
        self.sampler = GroupSampler(self.prompts, group_size=cfg.train.num_generations,
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
        self.update_tracker = UpdateRatio(self.policy.transformer)   # train/update_ratio (collective under ZeRO-3)
        self.update_ratios: list[float] = []                           # this iteration's optimiser steps

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
            if self.update_ratios:
                metrics["train/update_ratio"] = sum(self.update_ratios) / len(self.update_ratios)
                self.update_ratios.clear()
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
        unknown: under DeepSpeed the engine clipped and stepped inside ``backward``).

        Also records ``‖ΔW‖ / ‖W‖`` of the step in :attr:`update_ratios` (logged as ``train/update_ratio``, the
        mean over the iteration): the merged LoRA update's change over the base weights, or the parameters'
        change over their norm with ``model.finetune=full`` (:class:`~pisces_rl.models.UpdateRatio`; measured
        against the weights after the previous step, so it also covers DeepSpeed's step inside ``backward``).
        """
        acc, t = self.accelerator, self.config.train
        norm = None
        if t.max_grad_norm and t.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.policy.trainable_parameters(), t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ratios.append(self.update_tracker.step())
        return float(norm) if norm is not None else float("nan")

    def _reward_metrics(self, scores: RewardOutput) -> dict[str, float]:
        """Every number of ``RewardOutput.metrics()`` over all processes: per reward and for the total the
        mean/std of the available samples (NaN = not applicable or skipped, left out); per reward the
        ``skipped`` and ``not_applicable`` counts, and ``reward/total/nan`` (also as ``reward/nan_samples``)."""
        acc = self.accelerator
        allscores = acc.gather(scores.scores.float().to(acc.device).contiguous()).cpu()  # [B*np, R]
        total = acc.gather(scores.total.float().to(acc.device).contiguous()).cpu()       # [B*np]
        counts = torch.tensor([[scores.skipped.get(n, 0), scores.not_applicable.get(n, 0)] for n in scores.names],
                              dtype=torch.float32).reshape(-1)                             # [R*2]
        counts = acc.gather(counts.to(acc.device)).cpu().view(-1, len(scores.names), 2).sum(0)  # [R, 2]
        gathered = RewardOutput(allscores, total, list(scores.names), scores.weights,
                                skipped={n: int(c[0]) for n, c in zip(scores.names, counts)},
                                not_applicable={n: int(c[1]) for n, c in zip(scores.names, counts)})
        out = {k: float(v) for k, v in gathered.metrics().items()}
        out["reward/nan_samples"] = out["reward/total/nan"]
        return out

    def _timing(self, t0: float) -> dict[str, float]:
        dt = time.perf_counter() - t0
        t = self.config.train
        return {"time/step_s": dt, "time/samples_per_s": t.prompts_per_step * t.num_generations / dt,
                "train/lr": self.scheduler.get_last_lr()[0]}

    def _log(self, metrics: dict[str, float], bar) -> None:
        """History, trackers (every ``logging.log_every``), held-out evaluation (every ``logging.eval_every``)
        and the progress bar: total reward, each component, KL/CD when on, loss, videos/s, skip counts."""
        lc, last = self.config.logging, self.config.train.max_steps
        if self.before is not None and not getattr(self, "_before_logged", False):  # first, so steps increase (wandb)
            self._log_eval(self.before.metrics, 0)
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)
        if self.step % max(1, lc.log_every) == 0 or self.step == last:
            self.accelerator.log(metrics, step=self.step)
        if lc.eval_every and self.step % lc.eval_every == 0 and self.step < last and self.eval_prompts:
            self._record_eval(self.evaluate().metrics, self.step)  # the last point is _finish's "after"
        bar.set_postfix(progress_postfix(metrics), refresh=False)
        bar.update(1)

    def _record_eval(self, metrics: Mapping[str, float], iteration: int) -> None:
        """Keep an evaluation during training in the history (``eval/iteration``, ``eval/<metric>``; saved in
        checkpoints) and log it as ``eval/<metric>`` at ``iteration``."""
        self.history.setdefault("eval/iteration", []).append(float(iteration))
        for k, v in metrics.items():
            self.history.setdefault(f"eval/{k}", []).append(float(v))
        self._log_eval(metrics, iteration)
        self._announce(f"evaluation at iteration {iteration}", metrics)

    def _log_eval(self, metrics: Mapping[str, float], iteration: int) -> None:
        """An evaluation to the trackers as ``eval/<metric>`` at ``iteration`` (0 = the base model)."""
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=iteration)
        if iteration == 0:
            self._before_logged = True

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
                            lora_saver=self.save_lora, keep_last=c.keep_last,
                            weights_dir=self.policy.weights_dirname)

    def save_lora(self, directory: str, state_dict=None) -> None:
        """The trained weights in diffusers format, complete under ZeRO-3: LoRA (``pipe.load_lora_weights``)
        or, with ``model.finetune=full``, the denoiser (``<Transformer>.from_pretrained``). Call on every
        process (ZeRO-3 gathers shards); only the main process writes."""
        if state_dict is None:
            full = self.policy.finetune == "full"
            state_dict = (gather_full_state_dict if full else gather_lora_state_dict)(self.accelerator, self.model)
        if self.accelerator.is_main_process:
            self.policy.save_weights(directory, state_dict=state_dict)

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
        self.update_tracker.snapshot()                                  # the restored weights
        logger.info("resumed from %s at step %d", path, self.step)

    def _announce(self, what: str, metrics: Mapping[str, float]) -> None:
        if self.accelerator.is_main_process and (self.judge is not None or self.step == 0):
            shown = {k: v for k, v in metrics.items() if k.startswith("judge/") or k == "reward/total"}
            logger.info("%s: %s", what, ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))

    def _finish(self, metrics: dict[str, float]) -> None:
        """Final checkpoint (unless just written), before/after evaluation, LoRA weights, then on the main
        process: the captioned before/after video, the reward curves, ``summary.json``, the model card
        ``lora/README.md`` and, with ``train.push_to_hub``, the upload of ``lora/``."""
        cfg, acc = self.config, self.accelerator
        c, lc, out = cfg.checkpoint, cfg.logging, cfg.output_dir
        if not (c.save_every and self.step % c.save_every == 0):
            self._maybe_checkpoint(force=True)
        before = self.before if self.before is not None else self.evaluate(base_model=True)
        after = self.evaluate()
        lora_dir = os.path.join(out, self.policy.weights_dirname)
        self.save_lora(lora_dir)
        acc.wait_for_everyone()
        if not getattr(self, "_before_logged", False):  # a resumed run evaluates its base model only now
            self._log_eval(before.metrics, 0)
        self._log_eval(after.metrics, self.step)
        if not acc.is_main_process:
            acc.end_training()
            return
        try:
            self._write_outputs(metrics, before, after, lora_dir)
        finally:
            acc.end_training()

    def _write_outputs(self, metrics: dict[str, float], before: EvalResult, after: EvalResult, lora_dir: str) -> None:
        """The main process's part of :meth:`_finish`."""
        cfg, acc = self.config, self.accelerator
        lc, out, fmt, n = cfg.logging, cfg.output_dir, cfg.logging.video_format, len(self.eval_prompts)
        save_video_grid(after.videos, os.path.join(out, "samples", f"final.{fmt}"), nrow=n)
        grid = save_captioned_grid([before.videos, after.videos], os.path.join(out, f"before_after.{fmt}"),
                                   column_labels=self.eval_prompts, row_labels=["base", "trained"],
                                   cell_size=lc.video_cell_size)
        evals = eval_series(self.history, before.metrics, after.metrics, self.step)
        curve = None
        if any(k.startswith("reward/") for k in [*self.history, *evals]):
            t = cfg.train
            curve = plot_reward_curves(
                self.history, os.path.join(out, "reward_curve.png"), evals=evals, smoothing=lc.curve_smoothing,
                title=f"{self.name}: rewards per iteration ({t.prompts_per_step} prompts x {t.num_generations} videos); "
                      f"held-out: {n} prompts")
        comparison = {k: {"before": before.metrics[k], "after": after.metrics[k]} for k in after.metrics}
        counts = {name: {kind: sum(self.history.get(f"reward/{name}/{kind}", [])) for kind in
                         ("skipped", "not_applicable")} for name in self.rewards.names}
        counts["total"] = {"nan": sum(self.history.get("reward/total/nan", []))}
        summary = {"steps": self.step, "num_processes": acc.num_processes,
                   "distributed_type": str(acc.distributed_type), "zero_stage": zero_stage(acc),
                   "batch": self.batch, "metrics": metrics, "eval": comparison, "eval_prompts": self.eval_prompts,
                   "eval_points": evals, "reward_counts": counts, "history": self.history}
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
        t = cfg.train
        push, repo, push_error = bool(getattr(t, "push_to_hub", False)), None, None
        name = hub_repo_name(out, getattr(t, "hub_model_id", None))
        if push:
            try:
                repo = create_hub_repo(name)
            except Exception as err:  # noqa: BLE001 - reported below, after every output is written
                push_error = err
        card = write_model_card(
            lora_dir, base_model=cfg.model.pretrained, pipeline_class=type(self.policy.pipeline).__name__,
            trainer=self.name, rewards=dict(zip(self.rewards.names, self.rewards.weights.tolist())),
            evaluation=comparison, config=cfg.to_dict(), steps=self.step, eval_prompts=self.eval_prompts,
            sample=grid, repo_id=repo, judge=lc.judge if self.judge is not None else None)
        print(format_summary(metrics))
        print(format_summary(comparison, title=f"Evaluation on {n} fixed prompts "
                                              "(before = base model, after = trained weights)"))
        print(f"run directory: {out}\n  before/after videos: {grid}\n  reward curve: {curve}\n"
              f"  weights: {lora_dir}  ("
              f"{'<Transformer>.from_pretrained' if self.policy.finetune == 'full' else 'pipe.load_lora_weights'}"
              f"; model card {card})\n"
              + (f"  generate: pisces-rl generate --lora {lora_dir} --prompt \"...\" --out video.gif\n"
                 if self.policy.finetune != "full" else "")
              + f"  tensorboard --logdir {out}")
        if push and push_error is None:
            try:
                upload_to_hub(lora_dir, repo, commit_message=f"pisces_rl {self.name}: {self.step} iterations")
                print(f"  pushed to https://huggingface.co/{repo}")
            except Exception as err:  # noqa: BLE001
                push_error = err
        if push_error is not None:
            raise RuntimeError(f"train.push_to_hub: the upload of {lora_dir} to the Hub repo {repo or name!r} failed "
                               f"({type(push_error).__name__}: {push_error}). Every output of the run is saved in "
                               f"{out}; log in (`huggingface-cli login` or HF_TOKEN) and upload later with "
                               f"`huggingface-cli upload {repo or name} {lora_dir}`") from push_error


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
