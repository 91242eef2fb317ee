"""Trainer building blocks: advantages, losses, checkpoints, accelerate set-up, tracking.

The GRPO loop (``GRPOTrainer``, ``pisces_rl.trainer.grpo``), DiffusionNFT (``NFTTrainer``,
``pisces_rl.trainer.nft``) and direct reward backprop (``BackpropTrainer``, ``pisces_rl.trainer.backprop``) are
built from these pieces; ``online_trainer(config)`` picks GRPO or NFT by ``config.train.algorithm``.
"""
from .accel import (build_accelerator, gather_full_state_dict, gather_lora_state_dict, gradient_sync, is_deepspeed,
                    zero_stage)
from .advantages import group_advantages, group_index
from .checkpoint import config_hash, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .losses import clipped_policy_loss, gaussian_kl, pseudo_huber
from .tracking import (flatten_config, format_summary, init_trackers, plot_curve, save_video, save_video_grid,
                       setup_logging)

from .grpo import GRPOTrainer
from .backprop import BackpropTrainer
from .nft import NFTTrainer

ONLINE_TRAINERS = {"grpo": GRPOTrainer, "nft": NFTTrainer}  # train.algorithm -> trainer class


def online_trainer(config, **kwargs):
    """The trainer that ``config.train.algorithm`` names (``grpo`` | ``nft``), built with ``kwargs``."""
    return ONLINE_TRAINERS[config.train.algorithm](config, **kwargs)

__all__ = [
    "group_advantages", "group_index",
    "clipped_policy_loss", "gaussian_kl", "pseudo_huber",
    "save_checkpoint", "find_checkpoint", "load_checkpoint", "list_checkpoints", "config_hash",
    "build_accelerator", "is_deepspeed", "zero_stage", "gather_lora_state_dict", "gather_full_state_dict",
    "gradient_sync",
    "GRPOTrainer", "BackpropTrainer", "NFTTrainer", "ONLINE_TRAINERS", "online_trainer",
    "init_trackers", "setup_logging", "save_video", "save_video_grid", "plot_curve", "format_summary", "flatten_config",
]
