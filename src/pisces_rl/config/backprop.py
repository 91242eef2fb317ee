"""The direct-backprop run config (PISCES §1(d), second paradigm) and its batch arithmetic.

The model, sampling, rewards, data, logging and checkpoint sections are the GRPO ones
(:mod:`pisces_rl.config.grpo`); only ``train`` differs. Reward weights ``w_r`` (``w_q``, ``w_s`` of the
paper) are ``rewards.weights``; the consistency-distillation weight ``w_cd`` is ``train.cd_weight``::

    loss = w_cd * L_CD  -  sum_r w_r * R_r

The ``train`` defaults are the paper's preset (Algorithm 1 and the released scripts, roar-ai/pisces
``scripts/distill/distill_hunyuan.sh`` + ``fastvideo/distill.py``): clean latents from data
(``latent_source=dataset``; the scripts train on precomputed video latents), one conditional pass for the
student, the teacher and the target (``guidance_scale=1``; ``--not_apply_cfg_solver``), a 50-level grid
(``--num_euler_timesteps 50``), a stop-gradient target (no ``--use_ema``; ``--ema_decay`` 0.95 when on) and
``c = 0.001``. ``latent_source=generated`` and ``guidance_scale=null`` (CFG everywhere) remain as options::

    cfg = load_config(BackpropConfig, "recipes/configs/backprop_tiny_cpu.yaml", ["train.max_steps=2"])
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .base import ConfigBase, ConfigError, option, require, section
from .grpo import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, RewardsConfig, SamplingConfig,
                   _divisors, _positive, check_video_shape, videos_per_process)

__all__ = ["BackpropTrainConfig", "BackpropConfig", "backprop_batch_arithmetic"]


@dataclass
class BackpropTrainConfig(ConfigBase):
    """Direct reward backprop with consistency distillation: data, loss and optimisation."""

    _renamed = {"group_size": "num_generations"}  # trl's name, as in the GRPO TrainConfig

    max_steps: int = option(2, "optimiser steps (one per batch of prompts_per_step x num_generations videos)")
    prompts_per_step: int = option(2, "distinct prompts (or dataset videos) per step, all processes together")
    num_generations: int = option(2, "samples per prompt (was group_size), each with its own noise and noise "
                                     "level; adaptive fusion normalises rewards within these groups")
    sample_batch_size: int = option(4, "videos per rollout forward when latent_source=generated, per process")
    train_batch_size: int = option(2, "videos per forward/backward micro-batch, per process (the memory knob)")
    latent_source: str = option("dataset", "where clean latents x0 come from: dataset = videos (or latents) of "
                                           "train.video_dataset, as PISCES Algorithm 1; generated = sampled by the "
                                           "current policy (no grad)", choices=("generated", "dataset"))
    video_dataset: str = option("shapes", "latent_source=dataset: a registered video source ('shapes' = the "
                                          "ShapesWorld corpus clips), an import path 'package.module:function', or a "
                                          "datasets.save_to_disk directory / parquet file with a caption column and "
                                          "a uint8 'video' column [F, H, W, 3] or a float 'latents' column "
                                          "[C, F, h, w] (see docs/backprop.md)")
    caption_column: str = option("caption", "column of train.video_dataset holding the prompt of each video")
    dataset_size: int = option(64, "videos a named source (e.g. 'shapes') or an import-path source provides")
    cd_weight: float = option(1.0, "w_cd, weight of the consistency-distillation loss L_CD (0 = reward only)")
    huber_c: float = option(0.001, "c of the pseudo-Huber distance mean(sqrt((x - y)^2 + c^2) - c)")
    cd_target: str = option("stopgrad", "network of the target's jump from sigma' to sigma_min: stopgrad = the "
                                        "current LoRA without gradient; ema = an exponential moving average of "
                                        "the LoRA weights", choices=("stopgrad", "ema"))
    ema_decay: float = option(0.95, "lambda of the EMA target: ema <- lambda * ema + (1 - lambda) * theta")
    teacher_steps: int = option(50, "N of the noise-level grid: sigma and the teacher's sigma' are consecutive "
                                    "levels of the N-step flow schedule (scheduler shift included)")
    sigma_range: tuple[float, float] = option((0.0, 1.0), "noise levels sigma are drawn uniformly from the grid "
                                                          "levels inside [low, high]")
    guidance_scale: Optional[float] = option(1.0, "CFG scale of the student and target velocities in the loss: 1 = "
                                                  "one conditional pass, as PISCES (null = sampling.guidance_scale)")
    teacher_guidance_scale: Optional[float] = option(None, "CFG scale of the teacher's step (null = "
                                                           "train.guidance_scale); > 1 distils a guided teacher "
                                                           "into the student")
    adaptive_fusion: bool = option(False, "normalise each reward within its group, (R - mean) / std with the "
                                          "statistics detached, before weighting")
    decode_checkpointing: bool = option(True, "recompute the VAE decode in backward instead of storing its "
                                              "activations (memory grows with one decode chunk, not the batch)")
    learning_rate: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    lr_scheduler: str = option("constant", "learning-rate schedule over the optimiser steps",
                               choices=("constant", "cosine", "linear"))
    warmup_steps: int = option(0, "linear warm-up optimiser steps")
    max_grad_norm: float = option(1.0, "gradient-norm clipping threshold")
    mixed_precision: str = option("no", "autocast dtype of forward passes", choices=("no", "bf16", "fp16"))
    seed: int = option(42, "seed of prompt order, sampling noise, training noise and noise levels")

    def _check(self) -> None:
        _positive(self, "max_steps", "prompts_per_step", "num_generations", "sample_batch_size", "train_batch_size",
                  "dataset_size", "huber_c", "teacher_steps", "learning_rate", "max_grad_norm")
        _positive(self, "cd_weight", "weight_decay", "warmup_steps", "seed", zero_ok=True)
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        lo, hi = self.sigma_range
        require(0 <= lo <= hi <= 1, "sigma_range", f"must satisfy 0 <= low <= high <= 1, got [{lo}, {hi}]")
        for key in ("guidance_scale", "teacher_guidance_scale"):
            g = getattr(self, key)
            require(g is None or (math.isfinite(g) and g >= 0), key, f"must be >= 0 or null, got {g}")
        require(not self.adaptive_fusion or self.num_generations >= 2, "num_generations",
                f"adaptive_fusion normalises rewards within a group and needs num_generations >= 2, got "
                f"{self.num_generations}")
        require(self.caption_column.strip() != "", "caption_column", "is empty")
        # train.video_dataset is opened (and checked, one ConfigError naming the fix) by BackpropTrainer before
        # any model is built: a shipped config may name a directory that exists only on the machine it runs on
        require(self.video_dataset.strip() != "", "video_dataset", "is empty; use 'shapes' or a dataset directory")
        for i, beta in enumerate(self.adam_betas):
            require(0 <= beta < 1, f"adam_betas[{i}]", f"must be in [0, 1), got {beta}")


@dataclass
class BackpropConfig(ConfigBase):
    """A direct reward-backprop post-training run."""

    model: ModelConfig = section(ModelConfig, "the policy model and its LoRA adapters")
    sampling: SamplingConfig = section(SamplingConfig, "video size, and rollout sampling for generated latents "
                                                       "and sample videos")
    rewards: RewardsConfig = section(RewardsConfig, "rewards and weights w_r (YAML may give {name: weight} directly)")
    train: BackpropTrainConfig = section(BackpropTrainConfig, "loss and optimisation")
    data: DataConfig = section(DataConfig, "prompts (latent_source=generated) and sample-video prompts")
    logging: LoggingConfig = section(LoggingConfig, "metrics and sample videos")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints")
    output_dir: str = option("runs/backprop", "run directory: resolved config, logs, samples, checkpoints, LoRA")
    overwrite_output_dir: bool = option(False, "start over in an output_dir that holds a previous run, removing "
                                               "that run's files (otherwise such a run stops with an error, unless "
                                               "checkpoint.resume_from continues it)")

    def _check(self) -> None:
        require(self.output_dir.strip() != "", "output_dir", "is empty; use e.g. runs/backprop")
        check_video_shape(self)
        backprop_batch_arithmetic(self, 1)


def backprop_batch_arithmetic(cfg: BackpropConfig, num_processes: int = 1) -> dict[str, int]:
    """Derived per-step counts for ``num_processes`` processes; :class:`ConfigError` if they do not divide.

    Each process gets ``prompts_per_step / num_processes`` whole groups of ``num_generations`` videos, generates
    them ``sample_batch_size`` at a time (``latent_source=generated``) and back-propagates
    ``train_batch_size`` at a time; all micro-batches of a step accumulate into one optimiser step. Adaptive
    fusion needs whole groups in a micro-batch (its statistics are per group).
    """
    t = cfg.train
    P, G = t.prompts_per_step, t.num_generations
    per_process = videos_per_process(t, num_processes, unit="step",
                                     sampled="generates" if t.latent_source == "generated" else None)
    if per_process % t.train_batch_size:
        raise ConfigError(f"each process trains on {per_process} videos per step, not divisible by train_batch_size="
                          f"{t.train_batch_size}; use a divisor of {per_process}: {_divisors(per_process)}",
                          "train.train_batch_size")
    if t.adaptive_fusion and t.train_batch_size % G:
        raise ConfigError(f"adaptive_fusion normalises rewards within groups of {G}, so a micro-batch must hold "
                          f"whole groups: set train.train_batch_size to a multiple of {G} (dividing {per_process}), "
                          "or turn adaptive_fusion off", "train.train_batch_size")
    micro = per_process // t.train_batch_size
    return {
        "num_processes": num_processes,
        "prompts_per_step": P,
        "prompts_per_process": P // num_processes,
        "num_generations": G,
        "videos_per_step": P * G,
        "videos_per_process": per_process,
        "micro_batches_per_step": micro,
        "total_optimizer_steps": t.max_steps,
    }
