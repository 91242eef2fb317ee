"""One stochastic denoising step of a rectified-flow model, with its Gaussian log-probability.

Conventions (diffusers' flow matching, as in Wan / HunyuanVideo / SD3): time is the noise level
``sigma`` in [0, 1], running from 1 (pure noise) down to 0 (data), and

    x_sigma = (1 - sigma) * x0 + sigma * eps,        v = dx/dsigma = eps - x0

is the velocity the denoiser predicts. The deterministic sampler is Euler on the ODE,
``x_next = x + (sigma_next - sigma) * v``. To get a stochastic policy with a tractable
likelihood we use the reverse-time SDE with the same marginals::

    dx = [ v + s_t^2 / (2 sigma) * (x + (1 - sigma) * v) ] dsigma  +  s_t dw

where ``-(x + (1 - sigma) v) / sigma`` is the score of ``x_sigma``. One Euler-Maruyama step with
``dt = sigma_next - sigma < 0`` gives the Gaussian transition ``x_next ~ N(mean, std^2 I)``::

    mean = x * (1 + s_t^2 / (2 sigma) * dt) + v * (1 + s_t^2 * (1 - sigma) / (2 sigma)) * dt
    std  = s_t * sqrt(-dt)

Two diffusion coefficients ``s_t`` are offered (``sampling.sde_type``); they share the mean above and
differ only in how ``eta`` sets the noise:

* ``"flow_grpo"`` (Flow-GRPO, yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``)::

      s_t = eta * sqrt(sigma / (1 - sigma)),     std = eta * sqrt(sigma / (1 - sigma)) * sqrt(sigma - sigma_next)

  large near pure noise, small near the data.
* ``"dance_grpo"`` (DanceGRPO ``flux_step``, XueZeyue/DanceGRPO ``fastvideo/train_grpo_hunyuan.py``; copied
  unchanged into the PISCES code, roar-ai/pisces ``fastvideo/distill_grpo.py``, called with ``eta=0.25``)::

      s_t = eta,                                 std = eta * sqrt(sigma - sigma_next)

  Their mean is written ``x + dsigma * v - 0.5 * eta^2 * score * dsigma`` with
  ``score = -(x - x0_hat * (1 - sigma)) / sigma^2`` and ``x0_hat = x - sigma * v``, which is the formula
  above with ``s_t = eta``. On a shift-2, 16-step schedule at ``eta = 0.25`` the per-step std runs from
  0.25 down to 0.034 for ``flow_grpo`` and from 0.046 up to 0.088 for ``dance_grpo``; the total injected
  variance is 0.256 and 0.062 (:func:`sde_std_table` computes both for any schedule).

A third type, ``"ddim"`` (DDPO, kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``), is
the stochastic DDIM step of an ε/v-prediction model, computed in the VP coordinates of :mod:`pisces_rl.models.vp`
and returned in flow coordinates (:mod:`pisces_rl.rollout.ddim` has the maths)::

      std  = sigma_next * eta * sqrt(1 - q^2),     q = (1 - sigma) sigma_next / (sigma (1 - sigma_next))
      mean = x + dt * v + sigma_next * (sqrt(1 - r) - 1) * (x + (1 - sigma) v),      r = (std / sigma_next)^2

It needs ``eta <= 1`` (1 = DDPM) and works on any sigma grid, flow models included; its ``log_prob`` is DDPO's
(the density of the VP latent, which adds ``0.5 log((1 - sigma_next)^2 + sigma_next^2)`` to the flow one).
With ``noise_block > 1`` its eps correction is projected like the noise (the marginals are kept, as below).

Edge cases, handled explicitly:

* ``sigma == 1`` (the first step): for ``flow_grpo``, ``sigma / (1 - sigma)`` is infinite. As in Flow-GRPO,
  which uses the second sigma of the schedule there, the denominator becomes ``1 - sigma_next``.
  ``dance_grpo`` needs no special case (its score term is ``-x`` there), nor ``ddim`` (ᾱ = 0: ``q = 0``,
  ``std = eta * sigma_next``).
* ``sigma_next == 0`` (the last step) and ``eta == 0``: the step is deterministic. We return the
  plain Euler step (``mean`` reduces to ``x + dt * v`` when ``s_t = 0``), ``std = 0`` and
  ``log_prob = 0``: a point mass has no density, so these steps contribute a ratio of exactly 1
  and no policy gradient, and the sampler leaves them out of the trained steps. Ending on a
  deterministic step also means the final latent carries no leftover injected noise. For both types
  this is the latent the reference code decodes: DanceGRPO and PISCES decode the last step's
  ``x0_hat = x - sigma * v``, which is this Euler step to ``sigma_next = 0`` (they still draw noise
  and a log-prob for that step, whose noise never reaches the decoded video; we do not train it).

Low-dimensional exploration (``noise_block = k > 1``): the noise lives on the subspace of latents that are
constant on ``k x k`` spatial blocks, with the orthonormal basis ``U z = upsample_k(z) / k``
(``U^T y = k * avgpool_k(y)``, ``P = U U^T`` the block average). Noise with covariance ``s_t^2 P`` keeps
the marginals when the score correction is projected the same way::

    mean = x + v dt + P[ s_t^2 / (2 sigma) * (x + (1 - sigma) v) ] dt,      x_next = mean + std * P eps

and the log-probability is that of ``z = U^T (x_next - mean) / std ~ N(0, I)``, averaged over the
``k^2`` times fewer coordinates. A policy gradient's noise grows with the dimension of the action, so on
small budgets exploring the coarse layout (where objects are, where they move) gives a far clearer
signal; the component of the mean off the subspace is followed deterministically and is not scored.

``log_prob`` is the Gaussian log-density **averaged** (not summed) over all non-batch
elements, the Flow-GRPO and DanceGRPO convention: it keeps the scale independent of the video size.
(The copy of ``flux_step`` in the PISCES ``distill_grpo.py`` loses the constant ``-log(std) - log sqrt(2 pi)``
to a line break; the constant cancels in every ratio, so only the reported value differs.) All maths
is in float32 whatever the model dtype.

Example::

    >>> v = torch.randn(2, 16, 2, 4, 4); x = torch.randn(2, 16, 2, 4, 4)
    >>> step = sde_step_with_logprob(v, x, sigma=0.8, sigma_next=0.6, eta=0.25)
    >>> step.prev_sample.shape, step.log_prob.shape
    (torch.Size([2, 16, 2, 4, 4]), torch.Size([2]))
    >>> again = sde_step_with_logprob(v, x, 0.8, 0.6, 0.25, prev_sample=step.prev_sample)  # scoring mode
    >>> torch.allclose(again.log_prob, step.log_prob)
    True
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from .ddim import ddim_eps_correction, ddim_log_prob_offset, ddim_std

__all__ = ["SDEStep", "SDE_TYPES", "sde_step_with_logprob", "sde_std", "sde_std_table", "check_sde_type",
           "resolve_sde_type"]

SDE_TYPES = ("flow_grpo", "dance_grpo", "ddim")
"""Names of the noise types (module docstring): Flow-GRPO's and DanceGRPO's / PISCES's diffusion coefficients
``s_t``, and DDPO's stochastic DDIM step (:mod:`pisces_rl.rollout.ddim`)."""

Scalar = Union[float, torch.Tensor]
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SDEStep(NamedTuple):
    """Result of :func:`sde_step_with_logprob`.

    Attributes:
        prev_sample: ``[B, ...]`` float32, the next (less noisy) latent ``x_{sigma_next}``.
        log_prob: ``[B]`` float32, mean over non-batch elements of ``log N(prev_sample; mean, std^2)``
            (0 for deterministic steps).
        mean: ``[B, ...]`` float32, the transition mean; differentiable w.r.t. ``velocity``.
        std: ``[B, 1, ..., 1]`` float32, the transition standard deviation (``s_t * sqrt(-dt)``),
            0 for deterministic steps. The KL between two policies' transitions at this step is
            ``((mean_a - mean_b) ** 2).mean(non-batch dims) / (2 * std ** 2)``.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _as_batch_column(value: Scalar, name: str, batch: int, ndim: int, device: torch.device) -> torch.Tensor:
    """Float32 tensor of shape ``[B or 1, 1, ..., 1]`` from a float, 0-d tensor or ``[B]`` tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a float or a tensor of shape [] or [{batch}], got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (ndim - 1)))


def check_sde_type(sde_type: str, allow_auto: bool = False) -> str:
    """``sde_type`` if it is one of :data:`SDE_TYPES` (or ``"auto"`` when allowed), else a ``ValueError``."""
    if sde_type not in SDE_TYPES and not (allow_auto and sde_type == "auto"):
        choices = ("auto",) * allow_auto + SDE_TYPES
        raise ValueError(f"sde_type must be one of {', '.join(repr(t) for t in choices)} (sampling.sde_type), "
                         f"got {sde_type!r}")
    return sde_type


def resolve_sde_type(sde_type: str, family: object = None) -> str:
    """The noise type to sample with: ``sde_type`` itself, or for ``"auto"`` the model family's choice, its class
    attribute ``sde_type`` (e.g. ``"flow_grpo"`` for Wan, ``"ddim"`` for an ε/v-prediction family); a family
    without one gets ``"flow_grpo"``."""
    check_sde_type(sde_type, allow_auto=True)
    if sde_type != "auto":
        return sde_type
    chosen = getattr(family, "sde_type", "flow_grpo")
    try:
        return check_sde_type(chosen)
    except ValueError as err:
        raise ValueError(f"model family {getattr(family, 'name', family)!r} declares sde_type={chosen!r}: {err}") from None


def sde_std(sigma: Scalar, sigma_next: Scalar, eta: Scalar, sde_type: str = "flow_grpo") -> torch.Tensor:
    """Transition std, 0 when deterministic (``sigma_next == 0``).

    ``"flow_grpo"``: ``eta * sqrt(sigma / (1 - sigma~)) * sqrt(sigma - sigma_next)``, where ``sigma~`` is
    ``sigma`` except at ``sigma == 1``, where it is ``sigma_next`` (no division by zero).
    ``"dance_grpo"``: ``eta * sqrt(sigma - sigma_next)``.
    ``"ddim"``: ``sigma_next * eta * sqrt(1 - q^2)``, ``q = (1 - sigma) sigma_next / (sigma (1 - sigma_next))``:
    DDPO's ``eta * sqrt(variance)`` in flow coordinates (:func:`pisces_rl.rollout.ddim.ddim_std`).
    Shapes broadcast; float64 inputs give float64, anything else float32.
    """
    check_sde_type(sde_type)
    sigma = torch.as_tensor(sigma)
    dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
    sigma = sigma.to(dtype)
    sigma_next = torch.as_tensor(sigma_next, device=sigma.device).to(dtype)
    if sde_type == "ddim":
        return ddim_std(sigma, sigma_next, eta)
    if sde_type == "flow_grpo":
        s_t = eta * torch.sqrt(sigma / (1.0 - torch.where(sigma >= 1.0, sigma_next, sigma)))
    else:
        s_t = eta * torch.ones_like(sigma)
    std = s_t * torch.sqrt((sigma - sigma_next).clamp_min(0.0))
    return torch.where(sigma_next > 0, std, torch.zeros_like(std))


def sde_std_table(sigmas: torch.Tensor, eta: float, sde_type: str = "flow_grpo",
                  sde_window: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, float]:
    """Per-step transition std of a schedule and the total variance the sampler injects.

    Args:
        sigmas: ``[T+1]`` noise levels of the schedule, ``sigmas[0] = 1 ... sigmas[T] = 0``.
        eta: the SDE noise level.
        sde_type: one of :data:`SDE_TYPES`.
        sde_window: ``(start, stop)``: only steps ``start <= i < stop`` inject noise (None = all).

    Returns:
        ``(std [T] float64, total)``: ``std[i]`` is step ``i``'s std (0 for ODE steps and the last step) and
        ``total = sum_i std[i]^2`` the injected variance per latent element.

    Example::

        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> s = FlowMatchEulerDiscreteScheduler(shift=2.0); s.set_timesteps(16)
        >>> std, total = sde_std_table(s.sigmas, 0.25, "dance_grpo")   # 0.046 ... 0.088, total 0.062
    """
    sig = torch.as_tensor(sigmas).detach().cpu().to(torch.float64).flatten()
    std = sde_std(sig[:-1], sig[1:], float(eta), sde_type)
    if sde_window is not None:
        steps = torch.arange(std.numel())
        std = torch.where((steps >= sde_window[0]) & (steps < sde_window[1]), std, torch.zeros_like(std))
    return std, float(std.square().sum())


def sde_step_with_logprob(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    eta: Scalar,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
    noise: Optional[torch.Tensor] = None,
    noise_block: int = 1,
    sde_type: str = "flow_grpo",
) -> SDEStep:
    """One SDE step ``x_sigma -> x_sigma_next`` (Flow-GRPO, DanceGRPO or DDIM noise) and its log-probability.

    Args:
        velocity: ``[B, C, F, h, w]`` (any ``[B, ...]``) predicted velocity ``v = eps - x0`` at
            ``latents``, already guided (CFG) if applicable; any dtype, cast to float32.
        latents: ``[B, ...]`` current latent ``x_sigma``.
        sigma: current noise level in (0, 1]; float, 0-d tensor or ``[B]`` tensor.
        sigma_next: next noise level in [0, sigma); same forms as ``sigma``.
        eta: SDE noise level (>= 0), a float or a ``[B]`` tensor (one level per video, e.g. 0 for
            videos whose step lies outside an SDE window). ``eta = 0`` is the deterministic Euler ODE step.
        prev_sample: scoring mode: the recorded next latent ``[B, ...]`` whose log-prob is
            returned (it is detached; gradients flow through ``mean`` only). If None, one is sampled.
        generator: torch generator(s) for the sampled noise (one per batch item if a list).
        noise: explicit standard-normal noise ``[B, ...]`` (overrides ``generator``); with
            ``noise_block = k`` its block average is used (``P eps = U z``, ``z = U^T eps ~ N(0, I)``).
        noise_block: ``k``; 1 = i.i.d. noise on every latent element. ``k > 1`` = low-dimensional
            exploration: one noise draw per ``k x k`` spatial block (see the module docstring).
        sde_type: the noise type, ``"flow_grpo"`` (``s_t = eta sqrt(sigma / (1 - sigma))``),
            ``"dance_grpo"`` (``s_t = eta``, the DanceGRPO / PISCES code) or ``"ddim"`` (DDPO's stochastic DDIM
            step, ``eta <= 1``; its ``log_prob`` is DDPO's, in VP coordinates); see the module docstring.

    Returns:
        :class:`SDEStep` ``(prev_sample, log_prob [B], mean [B, ...], std [B, 1, ...])``, all float32.

    Raises:
        ValueError: on mismatched shapes, negative ``eta``, an unknown ``sde_type``, or a sigma pair that
            does not step down within [0, 1].
    """
    if velocity.shape != latents.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and latents {tuple(latents.shape)} must have the same shape")
    if prev_sample is not None and prev_sample.shape != latents.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} must have the latents' shape {tuple(latents.shape)}")
    check_sde_type(sde_type)
    batch, ndim, device = latents.shape[0], latents.ndim, latents.device
    eta = _as_batch_column(eta, "eta", batch, ndim, device)
    if bool((eta < 0).any()):
        raise ValueError(f"eta must be >= 0, got {eta.flatten().tolist()}")
    sigma_t = _as_batch_column(sigma, "sigma", batch, ndim, device)
    sigma_n = _as_batch_column(sigma_next, "sigma_next", batch, ndim, device)
    if bool((sigma_t > 1.0).any() or (sigma_t <= 0.0).any() or (sigma_n < 0.0).any() or (sigma_n >= sigma_t).any()):
        raise ValueError(
            "sigmas must satisfy 0 <= sigma_next < sigma <= 1 (denoising runs from 1 to 0); got "
            f"sigma={sigma_t.flatten().tolist()}, sigma_next={sigma_n.flatten().tolist()}"
        )

    v = velocity.float()
    x = latents.float()
    k = int(noise_block)
    if k < 1 or (k > 1 and (ndim < 3 or x.shape[-1] % k or x.shape[-2] % k)):
        raise ValueError(f"noise_block must be >= 1 and divide the latent height and width "
                         f"{tuple(x.shape[-2:])}, got {noise_block}")
    dt = sigma_n - sigma_t  # < 0
    std = sde_std(sigma_t, sigma_n, eta, sde_type)
    if sde_type == "ddim":  # Euler + DDIM's reduced eps term (rollout/ddim.py); exactly Euler at eta = 0
        correction = ddim_eps_correction(x, v, sigma_t, sigma_n, eta)
        mean = x + v * dt + (correction if k == 1 else _unpool(_pool(correction, k), k))
    else:
        # s_t^2 = std^2 / (-dt); zero on deterministic steps, where mean is the plain Euler step.
        s2 = std.square() / (-dt)
        if k == 1:
            mean = x * (1.0 + s2 / (2.0 * sigma_t) * dt) + v * (1.0 + s2 * (1.0 - sigma_t) / (2.0 * sigma_t)) * dt
        else:  # the score correction only where the noise goes: P = U U^T, the k x k block average
            correction = s2 / (2.0 * sigma_t) * dt * (x + (1.0 - sigma_t) * v)
            mean = x + v * dt + _unpool(_pool(correction, k), k)
    std = std.expand(batch, *std.shape[1:])
    stochastic = std > 0  # [B, 1, ..., 1]

    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=device, dtype=torch.float32)
        elif noise.shape != x.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the latents' shape {tuple(x.shape)}")
        # P eps = U (U^T eps) with U^T eps ~ N(0, I): the same draws whatever k, so the random stream (and any
        # later sample from the same generator) does not depend on the block size.
        noise = noise.float() if k == 1 else _unpool(_pool(noise.float(), k), k)
        prev_sample = mean + std * noise
    else:
        prev_sample = prev_sample.detach().float()

    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    resid = prev_sample - mean if k == 1 else _pool(prev_sample - mean, k) * k   # U^T (x' - mean)
    elem = -(resid**2) / (2.0 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    log_prob = elem.mean(dim=tuple(range(1, ndim)))
    if sde_type == "ddim":  # DDPO's density is in VP coordinates: + the rescaling's log-Jacobian per element
        log_prob = log_prob + ddim_log_prob_offset(sigma_n).reshape(-1)
    log_prob = torch.where(stochastic.reshape(batch), log_prob, torch.zeros_like(log_prob))
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def _pool(y: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over non-overlapping ``k x k`` blocks of the last two dims: ``[..., h, w] -> [..., h/k, w/k]``."""
    *lead, h, w = y.shape
    return y.reshape(*lead, h // k, k, w // k, k).mean(dim=(-3, -1))


def _unpool(z: torch.Tensor, k: int) -> torch.Tensor:
    """Repeat each element over a ``k x k`` block: ``[..., h, w] -> [..., h*k, w*k]``."""
    return z.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
