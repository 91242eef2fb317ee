#!/usr/bin/env python
"""GRPO post-training with the PISCES rewards — long-video setting (HunyuanVideo-like: 5 s clips).

Long videos differ from short ones in memory, not in the algorithm (``train.algorithm``: grpo | nft). The
config turns on:
  * ``model.gradient_checkpointing`` in the denoiser,
  * ``sampling.decode_chunk_size``: videos decoded by the VAE a few at a time,
  * ``rewards.num_frames`` / ``rewards.temporal_windows``: the reward encoder sees a fixed number of frames,
    or that many frames in each of several temporal windows whose scores are averaged.

Launch on 8 GPUs with DeepSpeed ZeRO-2::

    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/grpo_long_video.py \\
        --config recipes/configs/grpo_long_video_wan.yaml output_dir=runs/long

On a CPU machine (2 processes; the gloo backend is chosen for you)::

    accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 2 \\
        recipes/grpo_long_video.py --config recipes/configs/grpo_long_video_tiny_cpu.yaml
"""
from __future__ import annotations

import logging
import sys

from pisces_rl.config import GRPOConfig, parse_cli
from pisces_rl.config.inputs import check_inputs, exit_on_config_error, pop_debug

log = logging.getLogger("pisces_rl.recipes.grpo_long_video")


def main(argv: list[str] | None = None) -> dict:
    argv, debug = pop_debug(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error(debug):  # a bad config or input: one line `error: <key>: <fix>`, exit 2
        config = parse_cli(GRPOConfig, argv)
        check_inputs(config)            # prompt files, model / encoder / OT map / LoRA paths, world
        from pisces_rl.trainer import online_trainer, setup_logging  # (heavy: after the checks)

        setup_logging()
        r = config.rewards
        log.info("long video: %d frames; reward sees %s frames x %d window(s); checkpointing=%s; decode chunk=%d",
                 config.sampling.num_frames, r.num_frames or "all", r.temporal_windows,
                 config.model.gradient_checkpointing, config.sampling.decode_chunk_size)
        trainer = online_trainer(config)  # GRPOTrainer or NFTTrainer, by train.algorithm
        return trainer.train()


if __name__ == "__main__":
    main()
