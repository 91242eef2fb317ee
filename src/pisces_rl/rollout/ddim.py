"""The stochastic DDIM step (η > 0) of an ε/v-prediction model, in the flow coordinates of :mod:`.sde`.

DDPO (Black et al. 2023; kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``,
``ddim_step_with_logprob``) samples with DDIM (Song et al. 2021, Eq. 12 and 16) in VP coordinates
``z_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε``::

    variance = (1 − ᾱ') / (1 − ᾱ) · (1 − ᾱ / ᾱ')                       # _get_variance
    std      = η · sqrt(variance)                                          # std_dev_t
    mean     = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − std²)·ε̂                     # prev_sample_mean
    z'       = mean + std·ξ,   log_prob = mean over non-batch dims of log N(z'; mean, std²)

The flow latent is ``x = z / (sqrt(ᾱ) + sqrt(1 − ᾱ))`` with ``σ = sqrt(1 − ᾱ) / (sqrt(ᾱ) + sqrt(1 − ᾱ))``
(:mod:`pisces_rl.models.vp`), and the flow velocity ``v`` gives ``x̂0 = x − σ·v`` and ``ε̂ = x + (1 − σ)·v``.
With the signal-to-noise ratio ``λ = ᾱ / (1 − ᾱ) = ((1 − σ) / σ)²`` the DDPO variance becomes
``(1 − ᾱ')·(1 − λ/λ')``, and dividing by ``sqrt(ᾱ') + sqrt(1 − ᾱ')`` (so that ``sqrt(1 − ᾱ') -> σ'``,
``sqrt(ᾱ') -> 1 − σ'``) gives the same step in flow coordinates, written without ᾱ (no cancellation at small σ)::

    q    = (1 − σ)·σ' / (σ·(1 − σ'))            # sqrt(λ / λ') in [0, 1)
    r    = η² · (1 − q²)                         # std² / (1 − ᾱ'): the share of ε̂ replaced by fresh noise
    std  = σ' · sqrt(r)                          # flow-coordinate std (VP std / (sqrt ᾱ' + sqrt(1 − ᾱ')))
    mean = (1 − σ')·x̂0 + σ'·sqrt(1 − r)·ε̂  =  x + (σ' − σ)·v  +  σ'·(sqrt(1 − r) − 1)·ε̂

The last form is what is computed: at η = 0 the correction is exactly 0 and the step is the flow Euler step
bit for bit (the deterministic DDIM step, :mod:`pisces_rl.models.vp`). ``r <= 1`` is needed; at σ = 1
(ᾱ = 0, ``q = 0``) ``r = η²``, so ``η <= 1`` (η = 1 is DDPM's posterior variance). The VP log-density
differs from the flow one by the Jacobian of the rescaling, ``log(sqrt ᾱ' + sqrt(1 − ᾱ')) =
−½·log((1 − σ')² + σ'²)`` per element; :func:`ddim_log_prob_offset` returns it, so the log-probs reported
are DDPO's (in VP coordinates). The offset cancels in every ratio.

Difference from DDPO's code, on purpose: DDPO clamps the previous timestep at 0 *before* testing it against 0,
so its last step uses ``alphas_cumprod[0]`` instead of ``final_alpha_cumprod`` and still injects a little noise.
Here the schedule's last σ' is the scheduler's (``vp_flow_schedule``: 0 with ``set_alpha_to_one``), and a step
to σ' = 0 is deterministic (std 0, log-prob 0), like the flow noise types.
"""
from __future__ import annotations

import torch

__all__ = ["ddim_std", "ddim_eps_correction", "ddim_log_prob_offset"]


def _q(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """``sqrt(λ/λ') = (1 − σ)·σ' / (σ·(1 − σ'))``, 0 where σ' = 0 (then the step is deterministic anyway)."""
    den = sigma * (1.0 - sigma_next)
    return torch.where(den > 0, (1.0 - sigma) * sigma_next / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(den))


def _noise_share(sigma: torch.Tensor, sigma_next: torch.Tensor, eta) -> torch.Tensor:
    """``r = η²·(1 − q²)`` (module docstring); raises if it exceeds 1 (DDIM's mean would be imaginary)."""
    r = torch.as_tensor(eta, dtype=sigma.dtype, device=sigma.device) ** 2 * (1.0 - _q(sigma, sigma_next) ** 2)
    r = torch.where(sigma_next > 0, r, torch.zeros_like(r))
    if bool((r > 1.0 + 1e-6).any()):
        raise ValueError("sde_type='ddim' needs eta <= 1 (eta = 1 is DDPM's variance; at sigma = 1 the DDIM noise "
                         f"variance eta^2 (1 - alpha_bar') exceeds 1 - alpha_bar' for eta > 1); set sampling.eta <= 1")
    return r.clamp(0.0, 1.0)


def ddim_std(sigma: torch.Tensor, sigma_next: torch.Tensor, eta) -> torch.Tensor:
    """Flow-coordinate std ``σ'·η·sqrt(1 − q²)`` of the DDIM step ``σ -> σ'`` (0 when ``σ' = 0``).

    Equals DDPO's ``std_dev_t = η·sqrt((1 − ᾱ')/(1 − ᾱ)·(1 − ᾱ/ᾱ'))`` divided by ``sqrt(ᾱ') + sqrt(1 − ᾱ')``.
    """
    return sigma_next * _noise_share(sigma, sigma_next, eta).sqrt()


def ddim_eps_correction(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                        eta) -> torch.Tensor:
    """``σ'·(sqrt(1 − r) − 1)·ε̂`` with ``ε̂ = x + (1 − σ)·v``: DDIM's mean minus the Euler step ``x + (σ' − σ)·v``.

    Written as ``−σ'·r / (1 + sqrt(1 − r))·ε̂`` (no cancellation for small ``r``); exactly 0 at η = 0.
    """
    r = _noise_share(sigma, sigma_next, eta)
    return -sigma_next * r / (1.0 + (1.0 - r).sqrt()) * (x + (1.0 - sigma) * v)


def ddim_log_prob_offset(sigma_next: torch.Tensor) -> torch.Tensor:
    """``½·log((1 − σ')² + σ'²) = −log(sqrt(ᾱ') + sqrt(1 − ᾱ'))``: add it to a flow-coordinate Gaussian
    log-density (per element) to get the VP-coordinate one DDPO reports."""
    return 0.5 * torch.log((1.0 - sigma_next) ** 2 + sigma_next**2)
