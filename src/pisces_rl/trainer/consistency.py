"""Consistency distillation (PISCES Eq. 7, Algorithm 1), shared by the direct-backprop and GRPO trainers.

At a state ``x_σ [B, C, F, h, w]`` on an ``N``-level flow grid (``σ`` a level, ``σ'`` the next one, ``σ_min`` the
last)::

    x̂0   = x_σ  + (σ_min − σ) ·v_θ(x_σ, σ)          student: one Euler jump (LoRA, with grad)
    x_σ' = x_σ  + (σ' − σ)    ·v_φ(x_σ, σ)          teacher: one Euler step (LoRA disabled, no grad)
    x̃0   = x_σ' + (σ_min − σ')·v_ψ(x_σ', σ')        target: ψ = sg(θ) ("stopgrad") or EMA(θ) ("ema"), no grad
    L_CD = pseudo_huber(x̂0, x̃0)                    [B]

This is the released code's ``distill_one_step`` (roar-ai/pisces ``fastvideo/distill.py``): the student
``solver.euler_style_multiphase_pred`` with one phase (``--multi_phased_distill_schedule 4000-1``: the jump ends at
``σ_min``), the teacher ``solver.euler_step`` from ``sigmas[index]`` to ``sigmas_prev[index]``, and the target
network (``ema_transformer`` or the student under ``no_grad``) jumping from there with ``is_target=True``;
``fastvideo/distill_grpo.py`` computes the same term on the GRPO state. With ``--not_apply_cfg_solver`` (the
shipped scripts) the teacher is one conditional pass; otherwise ``cond + w·(cond − uncond)``, a CFG scale of
``1 + w``.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["noise_latents", "euler_jump", "consistency_target", "LoraEMA", "lora_ema_for"]


def _per_sample(s: Tensor, like: Tensor) -> Tensor:
    """``[B]`` noise levels -> ``[B, 1, ..., 1]`` broadcastable against ``like``."""
    return s.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noise_latents(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Flow-matching forward process ``x_σ = (1 − σ)·x0 + σ·ε``; ``x0, noise [B, ...]``, ``sigma [B]``."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def euler_jump(x: Tensor, velocity: Tensor, sigma: Tensor, sigma_to: Tensor) -> Tensor:
    """One Euler step of the flow ODE from ``σ`` to ``σ_to``: ``x + (σ_to − σ)·v`` (``sigma, sigma_to [B]``)."""
    return x + _per_sample(sigma_to - sigma, x) * velocity


def consistency_target(policy, x_sigma: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_min: Tensor,
                       timestep: Tensor, timestep_next: Tensor, cond: tuple, teacher_cond: Optional[tuple] = None,
                       ema: Optional["LoraEMA"] = None) -> Tensor:
    """``x̃0 [B, C, F, h, w]``: the teacher's Euler step ``σ → σ'`` (LoRA disabled), then the target network's
    jump ``σ' → σ_min``. No gradient flows.

    Args:
        policy: the :class:`~pisces_rl.models.VideoPolicy` (its LoRA is the student; disabled = the teacher).
        x_sigma: ``[B, C, F, h, w]`` the state at ``σ``.
        sigma, sigma_next, sigma_min: ``[B]`` noise levels; timestep, timestep_next: ``[B]`` denoiser timesteps
            of ``σ`` and ``σ'``.
        cond: ``(prompt_embeds [B, L, D], negative_prompt_embeds or None, guidance_scale)`` of the target pass.
        teacher_cond: the same for the teacher (default ``cond``).
        ema: the EMA of the LoRA weights (``cd_target=ema``), swapped in for the target pass; None = the current
            LoRA without gradient (``stopgrad``).

    Call it before the student's forward pass: swapping the EMA in writes into the LoRA parameters for the
    duration of this no-grad pass.
    """
    with torch.no_grad():
        with policy.lora_disabled():
            teacher = policy.predict_velocity(x_sigma, timestep, *(teacher_cond or cond))
        x_next = euler_jump(x_sigma, teacher, sigma, sigma_next)
        with (ema.swapped() if ema is not None else contextlib.nullcontext()):
            target = policy.predict_velocity(x_next, timestep_next, *cond)
        return euler_jump(x_next, target, sigma_next, sigma_min)


class LoraEMA:
    """Exponential moving average of the LoRA weights: ``ema ← λ·ema + (1 − λ)·θ`` after each step.

    ``swapped()`` runs a (no-grad) block with the live parameters holding the EMA values, restored bit for bit on
    exit. It writes through ``.data``, so the parameters' autograd version counters do not move and a graph
    recorded before the block (GRPO's log-prob step) still back-propagates, with the restored values. Register
    the object with ``accelerator.register_for_checkpointing`` so checkpoints carry it.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay} (train.ema_decay)")
        self.decay = float(decay)
        self.params = dict(named_parameters)
        if not self.params:
            raise ValueError("LoraEMA got no parameters; pass the trainable (LoRA) parameters")
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.data.copy_(self.shadow[n])
        try:
            yield self
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.data.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            raise ValueError(f"EMA state holds {len(shadow)} tensors, the model has {len(self.shadow)} LoRA "
                             "parameters; resume with the LoRA settings (model.lora_*) the run was started with")
        for n, t in shadow.items():
            self.shadow[n].copy_(t)


def lora_ema_for(policy, decay: float) -> LoraEMA:
    """A :class:`LoraEMA` of ``policy``'s trainable denoiser parameters."""
    return LoraEMA([(n, p) for n, p in policy.transformer.named_parameters() if p.requires_grad], decay)
