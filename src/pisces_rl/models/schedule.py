"""Flow-matching sampling grids from a pipeline's scheduler: ``flow_match_schedule`` and ``with_shift``."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

__all__ = ["flow_match_schedule", "with_shift"]


def flow_match_schedule(scheduler: Any, num_steps: int, device: torch.device,
                        sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching ``(timesteps [T], sigmas [T+1])`` from a pipeline's scheduler, respecting its shift.

    ``sigmas`` (``[T]``, unshifted) is passed to ``set_timesteps(sigmas=...)`` as pipelines that choose their
    own grid do (e.g. ``HunyuanVideoPipeline``: ``np.linspace(1, 0, T + 1)[:-1]``); the scheduler shifts them
    and appends the terminal 0. ``None``: the scheduler's default grid for ``num_steps``.

    ``mu``: the exponent of a scheduler configured with ``use_dynamic_shifting`` (resolution-dependent shift,
    ``set_timesteps(mu=...)``; e.g. ``LTXPipeline`` computes it with ``calculate_shift`` from the video's token
    count); required by such a scheduler, ignored by others.

    A ``FlowMatchEulerDiscreteScheduler`` is used as configured. A multistep scheduler configured for
    flow sigmas (e.g. Wan checkpoints' ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)``) is
    replaced by ``FlowMatchEulerDiscreteScheduler(shift=s)``: the SDE sampler is an Euler-type method.
    The pipeline's own scheduler object is not modified.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sampling.num_inference_steps must be a positive integer, got {num_steps!r}")
    cfg = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    elif cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") == "flow_prediction":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                                shift=cfg.get("flow_shift", 1.0) or 1.0)
    else:
        raise ValueError(f"{type(scheduler).__name__} is not a flow-matching scheduler; the SDE sampler needs "
                         "FlowMatchEulerDiscreteScheduler (or a scheduler with use_flow_sigmas=True)")
    dynamic = bool(sched.config.get("use_dynamic_shifting", False))
    if sched.config.get("invert_sigmas", False) or (dynamic and mu is None):
        raise ValueError("schedulers with invert_sigmas, or with use_dynamic_shifting but no `mu` (the family must "
                         "compute it from the video size), are not supported; set a fixed `shift` in the scheduler "
                         "config")
    extra = {"mu": float(mu)} if dynamic else {}
    if sigmas is None:
        sched.set_timesteps(num_steps, device=device, **extra)
    else:
        sched.set_timesteps(sigmas=list(sigmas), device=device, **extra)
    return sched.timesteps.to(device, torch.float32), sched.sigmas.to(device, torch.float32)


def with_shift(scheduler: Any, shift: float) -> Any:
    """A copy of a flow-matching ``scheduler`` with its timestep shift set to ``shift`` (``shift`` of
    ``FlowMatchEulerDiscreteScheduler``, ``flow_shift`` of a scheduler configured with ``use_flow_sigmas``)."""
    cfg = scheduler.config
    key = "shift" if "shift" in cfg else "flow_shift" if "flow_shift" in cfg else None
    if key is None or not (shift > 0):
        raise ValueError(f"model.scheduler_shift={shift!r}: {type(scheduler).__name__} has no flow-matching shift "
                         "to set (or the value is not > 0); set model.scheduler_shift=null")
    return type(scheduler).from_config(cfg, **{key: float(shift)})
