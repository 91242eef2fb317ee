"""Typed run configs: dataclass sections with documented fields, YAML + ``key=value`` loading.

    from pisces_rl.config import GRPOConfig, load_config
    cfg = load_config(GRPOConfig, "recipes/configs/grpo_tiny_cpu.yaml", ["train.max_steps=2"])

``base`` holds the generic machinery (errors, coercion, validation), ``loader`` reading/saving/CLI, and
``grpo`` the GRPO schema and its batch arithmetic.
"""
from .base import ConfigBase, ConfigError, config_keys, option, require, section, validate_config
from .grpo import (CheckpointConfig, DataConfig, GRPOConfig, LoggingConfig, ModelConfig, RewardsConfig,
                   SamplingConfig, TrainConfig, batch_arithmetic)
from .backprop import BackpropConfig, BackpropTrainConfig, backprop_batch_arithmetic
from .nft import NFTConfig, nft_batch_arithmetic
from .loader import apply_overrides, describe, load_config, load_yaml, parse_cli, save_yaml, to_dict

__all__ = [
    "ConfigError", "ConfigBase", "option", "section", "require", "config_keys", "validate_config",
    "load_config", "apply_overrides", "load_yaml", "parse_cli", "describe", "to_dict", "save_yaml",
    "GRPOConfig", "ModelConfig", "SamplingConfig", "RewardsConfig", "TrainConfig", "DataConfig",
    "LoggingConfig", "CheckpointConfig", "batch_arithmetic",
    "BackpropConfig", "BackpropTrainConfig", "backprop_batch_arithmetic",
    "NFTConfig", "nft_batch_arithmetic",
]
