#!/usr/bin/env python
"""Online RL post-training with the PISCES rewards — short-video setting (VideoCrafter2-like: 2 s clips).

``train.algorithm`` picks the update: ``grpo`` (clipped policy gradient on SDE rollouts, the default) or ``nft``
(DiffusionNFT: negative-aware flow matching on ODE samples, options under ``nft:``).

Launch (one process; see recipes/accelerate/ for DDP and DeepSpeed ZeRO-2/3)::

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo_short_video.py \\
        --config recipes/configs/grpo_tiny_cpu.yaml train.max_steps=2 output_dir=runs/try
    accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo_short_video.py \\
        --config recipes/configs/nft_tiny_cpu.yaml train.max_steps=2 output_dir=runs/try_nft

Everything the run does is in the config; ``--help`` lists every field with its meaning. Bad input
(an unknown key, a missing prompt file, model or OT map) stops the run before anything is built, with one line
``error: <key>: <message>`` and exit status 2; ``--debug`` also prints the traceback.
"""
from __future__ import annotations

import sys

from pisces_rl.config import GRPOConfig, parse_cli
from pisces_rl.config.inputs import check_inputs, exit_on_config_error, pop_debug


def main(argv: list[str] | None = None) -> dict:
    argv, debug = pop_debug(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error(debug):  # a bad config or input: one line `error: <key>: <fix>`, exit 2
        config = parse_cli(GRPOConfig, argv)
        check_inputs(config)            # prompt files, model / encoder / OT map / LoRA paths, world
        from pisces_rl.trainer import online_trainer, setup_logging  # (heavy: after the checks)

        setup_logging()
        trainer = online_trainer(config)  # GRPOTrainer or NFTTrainer, by train.algorithm
        return trainer.train()


if __name__ == "__main__":
    main()
