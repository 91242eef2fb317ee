#!/usr/bin/env python
"""GRPO post-training with the PISCES rewards — short-video setting (VideoCrafter2-like: 2 s clips).

Launch (one process; see recipes/accelerate/ for DDP and DeepSpeed ZeRO-2/3)::

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo_short_video.py \\
        --config recipes/configs/grpo_tiny_cpu.yaml train.max_steps=2 output_dir=runs/try

Everything the run does is in the config; ``--help`` lists every field with its meaning.
"""
from __future__ import annotations

import sys

from pisces_rl.config import GRPOConfig, parse_cli
from pisces_rl.trainer import GRPOTrainer, setup_logging


def main(argv: list[str] | None = None) -> dict:
    config = parse_cli(GRPOConfig, sys.argv[1:] if argv is None else argv)
    setup_logging()
    trainer = GRPOTrainer(config)
    return trainer.train()


if __name__ == "__main__":
    main()
