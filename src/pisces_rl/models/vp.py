"""ε-, v- and x0-prediction (variance-preserving) diffusion models in the flow coordinates the policy works in.

Every sampler and trainer of pisces_rl works on the flow-matching path ``x_σ = (1 − σ)·x0 + σ·ε`` with the velocity
``v = ε − x0``. A VP model (DDPM/DDIM family: ModelScope's ``UNet3DConditionModel``, AnimateDiff, CogVideoX)
works on ``z_t = a·x0 + b·ε`` with ``a = sqrt(ᾱ_t)``, ``b = sqrt(1 − ᾱ_t)``. The two are the same path, rescaled::

    x_σ = z_t / (a + b),        σ = b / (a + b),        ᾱ = (1 − σ)² / ((1 − σ)² + σ²)

and the model's ε̂ / v̂ / x̂0 output gives ``x̂0`` and ``ε̂`` at ``z_t``, hence the velocity ``ε̂ − x̂0``. Euler on
the flow ODE between two levels, ``x' = x + (σ' − σ)·(ε̂ − x̂0) = (1 − σ')·x̂0 + σ'·ε̂``, is exactly the
deterministic DDIM update ``z' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ')·ε̂`` rescaled (Song et al. 2021, Eq. 12 with
σ_t = 0; the same identity is why DDIM is "Euler in the right coordinates", Karras et al. 2022, §3). So a VP
family implements the :class:`~pisces_rl.models.family.ModelFamily` protocol with two changes only: its
schedule is DDIM's (:func:`vp_flow_schedule`, the σ's of the DDIM grid) and its ``forward`` rescales the latent
and converts the prediction (:func:`vp_velocity`). The stochastic DDIM step with η > 0 and its Gaussian
log-probability (DDPO) is the ``"ddim"`` noise type of :mod:`pisces_rl.rollout`.

Shapes: any ``[B, ...]`` latents; ``alpha_bar`` broadcastable ``[B, 1, ..., 1]``. All maths in float32.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

__all__ = ["PREDICTION_TYPES", "sigma_from_alpha_bar", "alpha_bar_from_sigma", "vp_flow_schedule",
           "alpha_bar_at", "vp_velocity", "flow_to_vp", "vp_to_flow"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Flow noise level ``σ = sqrt(1 − ᾱ) / (sqrt(ᾱ) + sqrt(1 − ᾱ))`` (float32; ᾱ = 1 -> 0, ᾱ = 0 -> 1)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float32).clamp(0.0, 1.0)
    a, b = ab.sqrt(), (1.0 - ab).sqrt()
    return b / (a + b)


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sigma_from_alpha_bar`: ``ᾱ = (1 − σ)² / ((1 − σ)² + σ²)``."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    return (1.0 - s).square() / ((1.0 - s).square() + s.square())


def _ddim_scheduler(scheduler: Any) -> Any:
    """A fresh DDIM-type scheduler with ``scheduler``'s config (its own class if it is a DDIM scheduler)."""
    from diffusers import DDIMScheduler

    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: it is not a DDPM/DDIM-family scheduler; "
                         "a VP family needs one (e.g. DDIMScheduler, CogVideoXDDIMScheduler)")
    if "DDIM" in type(scheduler).__name__:
        return type(scheduler).from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config)


def vp_flow_schedule(scheduler: Any, num_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [T], sigmas [T+1])`` of the ``num_steps``-step DDIM grid, in flow σ's (float32).

    ``timesteps`` are the DDIM scheduler's (``set_timesteps``: its ``timestep_spacing`` and ``steps_offset``);
    ``sigmas[i] = σ(ᾱ_{t_i})`` and ``sigmas[i + 1] = σ(ᾱ_prev)`` with DDIM's previous timestep
    ``t_i − num_train_timesteps // num_steps`` (``final_alpha_cumprod`` below 0), as ``DDIMScheduler.step``
    does; ``sigmas[T]`` is 0 when the scheduler's ``set_alpha_to_one`` is true. The pipeline's scheduler is
    not modified.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sampling.num_inference_steps must be a positive integer, got {num_steps!r}")
    sched = _ddim_scheduler(scheduler)
    sched.set_timesteps(num_steps)
    timesteps = sched.timesteps.long().cpu()
    ac = sched.alphas_cumprod.float().cpu()
    final = torch.as_tensor(getattr(sched, "final_alpha_cumprod", ac[0]), dtype=torch.float32).cpu()
    prev = timesteps - sched.config.num_train_timesteps // num_steps
    ab = ac[timesteps]
    ab_prev = torch.where(prev >= 0, ac[prev.clamp_min(0)], final)
    sigmas = torch.cat([sigma_from_alpha_bar(ab), sigma_from_alpha_bar(ab_prev[-1:])])
    if num_steps > 1 and float((sigma_from_alpha_bar(ab_prev[:-1]) - sigmas[1:-1]).abs().max()) > 1e-6:
        # uneven spacing (e.g. "trailing" with a step count that does not divide num_train_timesteps): DDIM's
        # previous timestep is not the next grid point, and one σ grid cannot hold both
        raise ValueError(f"the {num_steps}-step DDIM grid of {type(sched).__name__} (timestep_spacing="
                         f"{sched.config.get('timestep_spacing')!r}) is not evenly spaced: DDIM's previous timestep is "
                         "not the next grid point; choose sampling.num_inference_steps dividing "
                         f"num_train_timesteps={sched.config.num_train_timesteps}")
    return timesteps.to(device, torch.float32), sigmas.to(device, torch.float32)


def alpha_bar_at(scheduler: Any, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``ᾱ_t`` of ``scheduler`` at integer timesteps ``[B]``, shaped ``[B, 1, ..., 1]`` like ``like`` (float32)."""
    ac = scheduler.alphas_cumprod.to(like.device, torch.float32)
    t = torch.as_tensor(timestep, device=like.device).round().long().clamp(0, ac.numel() - 1)
    return ac[t].reshape(-1, *([1] * (like.ndim - 1)))


def flow_to_vp(x_flow: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``z_t = (sqrt(ᾱ) + sqrt(1 − ᾱ))·x_σ``: the VP model's input for a flow latent."""
    return x_flow.float() * (alpha_bar.sqrt() + (1.0 - alpha_bar).sqrt())


def vp_to_flow(z: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flow_to_vp`."""
    return z.float() / (alpha_bar.sqrt() + (1.0 - alpha_bar).sqrt())


def vp_velocity(output: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Flow velocity ``ε̂ − x̂0`` from a VP model's ``output`` at ``z = z_t`` (float32, ``[B, ...]``).

    ``epsilon``: ``x̂0 = (z − b·ε̂) / a``; ``v_prediction`` (Salimans & Ho 2022): ``x̂0 = a·z − b·v̂``,
    ``ε̂ = b·z + a·v̂``; ``sample``: ``ε̂ = (z − a·x̂0) / b``; with ``a = sqrt(ᾱ)``, ``b = sqrt(1 − ᾱ)``.
    Affine in ``output`` for a fixed ``z``, so classifier-free guidance on velocities equals guidance on the
    model's outputs.
    """
    out, z = output.float(), z.float()
    a, b = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        eps, x0 = out, (z - b * out) / a
    elif prediction_type == "v_prediction":
        eps, x0 = b * z + a * out, a * z - b * out
    elif prediction_type == "sample":
        eps, x0 = (z - a * out) / b, out
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; one of {PREDICTION_TYPES}")
    return eps - x0
