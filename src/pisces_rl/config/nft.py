"""DiffusionNFT options (``nft:`` section of :class:`~pisces_rl.config.GRPOConfig`, used when
``train.algorithm: nft``) and its batch arithmetic.

NFT shares the GRPO run config -- model, sampling (video size, steps, scheduler shift), rewards, data, the
group sampler's ``train.prompts_per_step`` / ``num_generations``, batch sizes, optimiser, logging, checkpoints --
and adds the knobs of the negative-aware flow-matching update. Defaults are those of the reference code,
NVlabs/DiffusionNFT@24af555 (``config/nft.py`` = C, ``config/base.py`` = B, ``scripts/train_nft_sd3.py`` = T)::

    cfg = load_config(GRPOConfig, "recipes/configs/nft_tiny_cpu.yaml", ["nft.beta=0.1"])

Fields of ``train`` that only GRPO reads (``epsilon``, ``advantage_mode=per_reward``, ``beta``,
``cd_weight``, ``shared_group_noise`` with an ODE sampler) are rejected by :func:`check_nft_config` when they
would change nothing, so a config never looks like it does something it does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import ConfigBase, ConfigError, option, require

__all__ = ["NFTConfig", "check_nft_config", "nft_train_timesteps", "nft_batch_arithmetic"]


@dataclass
class NFTConfig(ConfigBase):
    """DiffusionNFT: sample clean videos with the old policy, regress on them with the negative-aware loss."""

    beta: float = option(1.0, "NFT beta: v+ = (1 - beta) v_old + beta v, v- = (1 + beta) v_old - beta v, loss / beta "
                              "(reference 1.0; 0.1 for OCR and multi-reward: faster, less stable)")
    kl_weight: float = option(1e-4, "weight of mean((v - v_ref)^2) to the LoRA-disabled model (reference 1e-4; "
                                    "0 = off and one denoiser forward fewer per timestep)")
    adaptive_weight: bool = option(True, "x0-space self-normalised loss: mean((x0_hat - x0)^2) / sg(mean|x0_hat - x0|)"
                                         "; false = plain mean((x0_hat - x0)^2) (= t^2 times the velocity MSE)")
    timestep_fraction: float = option(0.99, "fraction of the sampler's grid trained per video: int(fraction * "
                                            "num_inference_steps) grid levels, a random subset per video")
    reward_std: str = option("global", "std of the advantage (R - group mean) / (std + 1e-4): global = over every "
                                       "reward of the iteration, all processes (reference); group = within the group",
                             choices=("global", "group"))
    old_decay_start: int = option(0, "optimiser steps before the old policy starts to lag: eta = 0 until then")
    old_decay_rate: float = option(1e-3, "old-policy decay eta = min(rate * (step - start), max) after each "
                                         "iteration; old <- eta * old + (1 - eta) * theta (reference type 1)")
    old_decay_max: float = option(0.5, "cap of the old-policy decay eta (type 1: 0.5; type 2 for OCR: 0.999 "
                                       "with start 75, rate 0.0075)")
    eta: float = option(0.0, "noise level of the rollout sampler: 0 = deterministic ODE (reference); > 0 = SDE")
    guidance_scale: float = option(1.0, "CFG scale of rollouts and of the training velocities: 1 = CFG-free "
                                        "(reference); sampling.guidance_scale stays the evaluation's")

    def _check(self) -> None:
        require(math.isfinite(self.beta) and self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        require(math.isfinite(self.kl_weight) and self.kl_weight >= 0, "kl_weight",
                f"must be >= 0, got {self.kl_weight}")
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        require(self.old_decay_start >= 0, "old_decay_start", f"must be >= 0, got {self.old_decay_start}")
        require(math.isfinite(self.old_decay_rate) and self.old_decay_rate >= 0, "old_decay_rate",
                f"must be >= 0, got {self.old_decay_rate}")
        require(0 <= self.old_decay_max < 1, "old_decay_max",
                f"must be in [0, 1) (1 would freeze the old policy forever), got {self.old_decay_max}")
        require(math.isfinite(self.eta) and self.eta >= 0, "eta", f"must be >= 0 (0 = ODE sampler), got {self.eta}")
        require(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale",
                f"must be >= 0 (1 = CFG-free), got {self.guidance_scale}")


def nft_train_timesteps(cfg) -> int:
    """``K_t = int(nft.timestep_fraction * sampling.num_inference_steps)`` grid levels trained per video (T:569)."""
    return int(cfg.nft.timestep_fraction * cfg.sampling.num_inference_steps)


def check_nft_config(cfg) -> None:
    """Cross-section checks of an NFT run (``cfg`` a GRPOConfig with ``train.algorithm == "nft"``)."""
    t, n = cfg.train, cfg.nft
    k = nft_train_timesteps(cfg)
    if k < 1:
        raise ConfigError(f"int({n.timestep_fraction} x {cfg.sampling.num_inference_steps} steps) = 0 timesteps "
                          "would be trained; raise nft.timestep_fraction", "nft.timestep_fraction")
    if t.advantage_mode != "sum":
        raise ConfigError("per_reward is GRPO's (one clipped surrogate per reward); NFT turns the weighted reward "
                          "total into one optimality weight r: set train.advantage_mode=sum", "train.advantage_mode")
    for key, replacement in (("beta", "nft.kl_weight"), ("cd_weight", "nft.kl_weight"), ("base_anchor_weight", "nft.kl_weight")):
        if getattr(t, key) > 0:
            raise ConfigError(f"is a GRPO regulariser and NFT ignores it; set train.{key}=0 and use {replacement} "
                              "(flow-matching distance to the LoRA-disabled model)", f"train.{key}")
    if t.shared_group_noise and n.eta == 0:
        raise ConfigError("with the ODE sampler (nft.eta=0) a group sharing its initial noise gives G identical "
                          "videos and zero advantages; set train.shared_group_noise=false", "train.shared_group_noise")


def nft_batch_arithmetic(cfg, num_processes: int = 1) -> dict[str, int]:
    """GRPO's :func:`~pisces_rl.config.grpo.batch_arithmetic` (groups, rollout forwards, micro-batches,
    optimiser steps) with NFT's trained timesteps; runs :func:`check_nft_config` first.

    One optimiser step accumulates ``train_batch_size x gradient_accumulation_steps`` videos x ``K_t``
    timesteps backward passes (T:801).
    """
    from .grpo import batch_arithmetic

    check_nft_config(cfg)
    out = batch_arithmetic(cfg, num_processes)
    k = nft_train_timesteps(cfg)
    out["train_timesteps_per_video"] = k
    out["backward_passes_per_optimizer_step"] = cfg.train.gradient_accumulation_steps * k
    return out
