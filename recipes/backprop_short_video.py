#!/usr/bin/env python
"""Direct reward backpropagation with consistency distillation — short-video setting (PISCES §1(d)).

Each step noises clean latents (``train.video_dataset``: videos encoded by the VAE once, or stored latents; or,
with ``train.latent_source=generated``, samples of the current policy), lets the LoRA student jump to a clean
prediction in one Euler step, decodes it through the VAE and back-propagates
``w_cd * L_CD - sum_r w_r * R_r``: the PISCES rewards plus a consistency-distillation term against a frozen
teacher's Euler step and a stop-gradient/EMA target. Details: docs/backprop.md.

Launch (one process; see recipes/accelerate/ for DDP and DeepSpeed ZeRO-2)::

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/backprop_short_video.py \\
        --config recipes/configs/backprop_tiny_cpu.yaml train.max_steps=2 output_dir=runs/try

Everything the run does is in the config; ``--help`` lists every field with its meaning. Bad input
(an unknown key, a missing prompt file, model or OT map) stops the run before anything is built, with one line
``error: <key>: <message>`` and exit status 2; ``--debug`` also prints the traceback.
"""
from __future__ import annotations

import logging
import sys

from pisces_rl.config import BackpropConfig, parse_cli
from pisces_rl.config.inputs import check_inputs, exit_on_config_error, pop_debug

log = logging.getLogger("pisces_rl.recipes.backprop_short_video")


def main(argv: list[str] | None = None) -> dict:
    argv, debug = pop_debug(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error(debug):  # a bad config or input: one line `error: <key>: <fix>`, exit 2
        config = parse_cli(BackpropConfig, argv)
        check_inputs(config)            # prompt files, model / encoder / OT map / LoRA paths, world
        from pisces_rl.trainer import BackpropTrainer, setup_logging  # (heavy: after the checks)

        setup_logging()
        t = config.train
        log.info("direct backprop: latents from %s; loss = %g * L_CD(target=%s) - sum_r w_r R_r with %s; "
                 "guidance %s (teacher %s); adaptive fusion %s",
                 t.video_dataset if t.latent_source == "dataset" else "the policy's samples", t.cd_weight,
                 t.cd_target, config.rewards.weights, t.guidance_scale, t.teacher_guidance_scale,
                 "on" if t.adaptive_fusion else "off")
        trainer = BackpropTrainer(config)
        return trainer.train()


if __name__ == "__main__":
    main()
