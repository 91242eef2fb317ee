"""Sample videos with per-step log-probabilities, and re-score recorded steps under the current policy.

``sample_rollout`` is the SDE counterpart of ``pipe(prompts, ...)``: the same prompt encoding, the
same flow-matching schedule (scheduler shift included), the same initial noise for a given generator
and the same guided velocity; each Euler step is replaced by :func:`sde_step_with_logprob`. With
``eta = 0`` it reproduces the pipeline's output.

SDE window (``sampling.sde_window = [start, stop]``, Flow-GRPO-Fast / MixGRPO): only steps
``start <= i < stop`` inject noise; the others are deterministic Euler (ODE) steps. With a shared
initial noise per group, every difference between a group's videos then comes from the trained
steps, instead of from noise the policy gradient cannot credit. ``None`` makes every step stochastic.

Noise parametrisation (``sampling.sde_type``, recorded in ``Rollout.sde_type`` and used again when re-scoring):
``"flow_grpo"``, ``"dance_grpo"`` or ``"ddim"`` (DDPO's stochastic DDIM step), see :mod:`pisces_rl.rollout.sde`;
``"auto"`` (the config default) takes the model family's class attribute ``sde_type``.

Trained steps: only stochastic steps (``eta > 0``, inside the SDE window, and ``sigma_next > 0``, i.e.
not the last of the T steps) have a log-probability. Of those ``T_s`` steps each video trains on
``K = ceil(train_timestep_fraction * T_s)``: all of them when the fraction is 1, otherwise an
independent uniformly random subset per video (drawn from ``generator``), stored sorted in
``Rollout.train_step_indices [B, K]``.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from .sde import SDEStep, check_sde_type, resolve_sde_type, sde_step_with_logprob
from .types import Rollout, in_sde_window

__all__ = ["sample_rollout", "rescore_log_prob", "select_train_steps"]

Generator = Optional[Union[torch.Generator, List[torch.Generator]]]


def _check_sampling_cfg(cfg: Any) -> None:
    for name in ("num_frames", "height", "width", "num_inference_steps", "guidance_scale", "eta"):
        if not hasattr(cfg, name):
            raise ValueError(f"sampling config lacks `{name}`; pass a pisces_rl.config.SamplingConfig")
    if cfg.eta < 0:
        raise ValueError(f"sampling.eta must be >= 0, got {cfg.eta}")
    frac = getattr(cfg, "train_timestep_fraction", 1.0)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"sampling.train_timestep_fraction must lie in (0, 1], got {frac}")
    if getattr(cfg, "decode_chunk_size", 0) < 0:
        raise ValueError(f"sampling.decode_chunk_size must be >= 0, got {cfg.decode_chunk_size}")
    check_sde_type(getattr(cfg, "sde_type", "flow_grpo"), allow_auto=True)


def _window(cfg: Any, num_steps: int) -> Optional[Tuple[int, int]]:
    """``sampling.sde_window`` as a checked ``(start, stop)`` pair, or None (every step stochastic)."""
    window = getattr(cfg, "sde_window", None)
    if window is None:
        return None
    if len(window) != 2 or not 0 <= int(window[0]) < int(window[1]) <= num_steps:
        raise ValueError(f"sampling.sde_window must be [start, stop] with 0 <= start < stop <= "
                         f"num_inference_steps={num_steps}, got {list(window)}")
    return int(window[0]), int(window[1])


def select_train_steps(sigmas: torch.Tensor, eta: float, fraction: float, batch_size: int,
                       generator: Generator = None, sde_window: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``[B, K]`` sorted indices of the steps to train on (see the module docstring for the rule).

    ``K = 0`` (an empty ``[B, 0]`` tensor) when no step is stochastic (``eta = 0`` or ``T = 1``).
    """
    noisy = (sigmas[1:].cpu() > 0) & in_sde_window(torch.arange(sigmas.numel() - 1), sde_window)
    stochastic = torch.nonzero(noisy).flatten() if eta > 0 else torch.zeros(0, dtype=torch.long)
    n = stochastic.numel()
    k = min(n, math.ceil(fraction * n))
    if k == n:
        return stochastic.unsqueeze(0).expand(batch_size, n).clone()
    gens = generator if isinstance(generator, list) else [generator] * batch_size
    rows = []
    for g in gens:
        device = g.device if g is not None else torch.device("cpu")
        scores = torch.rand(n, generator=g, device=device).cpu()
        rows.append(stochastic[scores.argsort()[:k].sort().values])
    return torch.stack(rows)


@torch.no_grad()
def sample_rollout(policy: Any, prompts: Sequence[str], sampling_cfg: Any, generator: Generator = None, *,
                   latents: Optional[torch.Tensor] = None, decode: bool = True) -> Rollout:
    """Sample one video per prompt with the SDE sampler, recording latents and log-probs.

    Args:
        policy: a :class:`pisces_rl.models.VideoPolicy`.
        prompts: B prompts (repeat a prompt G times for a GRPO group).
        sampling_cfg: a ``SamplingConfig``-like object (``num_frames, height, width,
            num_inference_steps, guidance_scale, eta, sde_type, train_timestep_fraction, decode_chunk_size,
            negative_prompt, max_sequence_length``; a missing ``sde_type`` means ``"flow_grpo"``, ``"auto"`` the
            family's ``sde_type`` attribute, recorded resolved in ``Rollout.sde_type``). CFG runs
            when ``guidance_scale > 1``.
        generator: torch generator (or one per video) for the initial noise, the SDE noise and the
            choice of trained steps.
        latents: optional initial noise ``[B, C, F, h, w]`` (otherwise drawn like ``pipe(...)`` does); a family
            with an ``initial_latents(pipe, noise, sigma0)`` hook maps it to the flow latent at ``sigmas[0]``
            (a VP family: ``noise / (sqrt(ᾱ_0) + sqrt(1 − ᾱ_0))``), as ``pipe(latents=...)`` would use it.
        decode: decode the final latents to ``Rollout.videos`` (``[B, F, C, H, W]`` in [0, 1]).

    Returns:
        :class:`Rollout` with ``latents [B, T+1, C, F, h, w]``, ``log_probs [B, T]`` and the schedule.
    """
    _check_sampling_cfg(sampling_cfg)
    prompts = list(prompts) if not isinstance(prompts, str) else prompts
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings (wrap a single prompt in a list)")
    if isinstance(generator, list) and len(generator) != len(prompts):
        raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts; pass one or one per prompt")
    cfg = sampling_cfg
    b, guidance, eta = len(prompts), float(cfg.guidance_scale), float(cfg.eta)
    do_cfg = guidance > 1.0
    video_size = (cfg.num_frames, cfg.height, cfg.width)
    shape = policy.latent_shape(b, *video_size)
    prompt_embeds, negative_embeds = policy.encode_prompts(
        prompts, getattr(cfg, "negative_prompt", "") or "", do_cfg, getattr(cfg, "max_sequence_length", 512))
    timesteps, sigmas = policy.flow_schedule(cfg.num_inference_steps, video_size)
    window = _window(cfg, len(timesteps))
    block = int(getattr(cfg, "noise_block", 1))
    sde_type = resolve_sde_type(getattr(cfg, "sde_type", "flow_grpo"), policy.family)  # "auto": the family's

    if latents is None:
        x = randn_tensor(shape, generator=generator, device=policy.device, dtype=torch.float32)
    elif tuple(latents.shape) != tuple(shape):
        raise ValueError(f"initial latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
    else:
        x = latents.to(policy.device, torch.float32)
    # the pipeline's initial noise as a flow latent at sigmas[0] (identity for flow families; a VP family rescales)
    hook = getattr(policy.family, "initial_latents", None)
    x = x if hook is None else hook(policy.pipeline, x, sigmas[0]).float()

    trajectory, log_probs = [x], []
    noisy = in_sde_window(torch.arange(len(timesteps)), window).tolist()
    for i in range(len(timesteps)):
        velocity = policy.predict_velocity(x, timesteps[i], prompt_embeds, negative_embeds, guidance)
        step = sde_step_with_logprob(velocity, x, sigmas[i], sigmas[i + 1], eta if noisy[i] else 0.0,
                                     generator=generator, noise_block=block, sde_type=sde_type)
        x = step.prev_sample
        trajectory.append(x)
        log_probs.append(step.log_prob)

    videos = policy.decode(x, getattr(cfg, "decode_chunk_size", 0)) if decode else None
    return Rollout(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        latents=torch.stack(trajectory, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=timesteps,
        sigmas=sigmas,
        train_step_indices=select_train_steps(
            sigmas, eta, getattr(cfg, "train_timestep_fraction", 1.0), b, generator, window).to(policy.device),
        videos=videos,
        guidance_scale=guidance,
        eta=eta,
        sde_window=window,
        noise_block=block,
        sde_type=sde_type,
    )


def rescore_log_prob(policy: Any, rollout: Rollout, step_index: Union[int, torch.Tensor],
                     batch_indices: Optional[Union[Sequence[int], torch.Tensor]] = None) -> SDEStep:
    """Log-probability of recorded transitions under the policy's current weights.

    Re-runs the (LoRA) denoiser, with the rollout's CFG scale, on ``latents[:, step]`` and scores the
    recorded ``latents[:, step + 1]``. With the weights that sampled the rollout,
    ``exp(new.log_prob - rollout.log_probs[:, step]) == 1``. Runs under the caller's autograd mode:
    gradients flow to the LoRA parameters through ``SDEStep.mean`` / ``log_prob``.

    Args:
        policy: the :class:`pisces_rl.models.VideoPolicy` (call inside ``policy.lora_disabled()`` for the
            reference model).
        rollout: the recorded :class:`Rollout`.
        step_index: an int in ``[0, T)``, or a ``[b]`` long tensor with one step per selected video (e.g.
            ``rollout.train_step_indices[:, k]``).
        batch_indices: videos to score (default: all ``B``).

    Returns:
        :class:`SDEStep` for the ``b`` selected videos (``log_prob [b]``, ``mean [b, C, F, h, w]``, ``std``).
    """
    t_count = rollout.num_steps
    device = rollout.latents.device
    rows = (torch.arange(len(rollout), device=device) if batch_indices is None
            else torch.as_tensor(batch_indices, device=device).long().flatten())
    steps = torch.as_tensor(step_index, device=device).long()
    steps = steps.expand(rows.numel()) if steps.ndim == 0 else steps.flatten()
    if steps.numel() != rows.numel():
        raise ValueError(f"step_index has {steps.numel()} entries but {rows.numel()} videos are selected")
    if bool((steps < 0).any() or (steps >= t_count).any()):
        raise IndexError(f"step_index {steps.tolist()} out of range for a rollout of T={t_count} steps")
    x_t = rollout.latents[rows, steps]
    x_next = rollout.latents[rows, steps + 1]
    negative = None if rollout.negative_prompt_embeds is None else rollout.negative_prompt_embeds[rows]
    velocity = policy.predict_velocity(x_t, rollout.timesteps[steps], rollout.prompt_embeds[rows], negative,
                                       rollout.guidance_scale)
    return sde_step_with_logprob(velocity, x_t, rollout.sigmas[steps], rollout.sigmas[steps + 1],
                                 rollout.step_eta(steps), prev_sample=x_next, noise_block=rollout.noise_block,
                                 sde_type=rollout.sde_type)
