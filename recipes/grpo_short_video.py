#!/usr/bin/env python
"""Online RL post-training with the PISCES rewards — short-video setting (VideoCrafter2-like: 2 s clips).

``train.algorithm`` picks the update: ``grpo`` (clipped policy gradient on SDE rollouts, the default) or ``nft``
(DiffusionNFT: negative-aware flow matching on ODE samples, options under ``nft:``).

Launch (one process; see recipes/accelerate/ for DDP and DeepSpeed ZeRO-2/3)::

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo_short_video.py \\
        --config recipes/configs/grpo_tiny_cpu.yaml train.max_steps=2 output_dir=runs/try
    accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo_short_video.py \\
        --config recipes/configs/nft_tiny_cpu.yaml train.max_steps=2 output_dir=runs/try_nft

Everything the run does is in the config; ``--help`` lists every field with its meaning.
"""
from __future__ import annotations

import sys

from pisces_rl.config import GRPOConfig, parse_cli
from pisces_rl.trainer import online_trainer, setup_logging


def main(argv: list[str] | None = None) -> dict:
    config = parse_cli(GRPOConfig, sys.argv[1:] if argv is None else argv)
    setup_logging()
    trainer = online_trainer(config)  # GRPOTrainer or NFTTrainer, by train.algorithm
    return trainer.train()


if __name__ == "__main__":
    main()
