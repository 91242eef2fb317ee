#!/usr/bin/env python
"""GRPO post-training with the PISCES rewards — short-video setting (VideoCrafter2-like: 2 s clips).

Launch (one process; see recipes/accelerate/ for DDP and DeepSpeed ZeRO-2/3)::

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo_short_video.py \\
        --config recipes/configs/grpo_tiny_cpu.yaml train.max_steps=2 output_dir=runs/try

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
        from pisces_rl.trainer import GRPOTrainer, setup_logging  # (heavy: after the checks)

        setup_logging()
        trainer = GRPOTrainer(config)
        return trainer.train()


if __name__ == "__main__":
    main()
