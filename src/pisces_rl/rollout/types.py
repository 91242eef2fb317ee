"""Typed container for a batch of sampled trajectories.

B = videos in the batch, T = denoising steps, K = trained steps per video, L = text tokens,
D = text embedding width, [C, F, h, w] = latent channels / frames / height / width and
[F, C, H, W] = decoded frames / channels / height / width.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Rollout", "cat", "in_sde_window"]

Index = Union[Sequence[int], torch.Tensor, slice]


def in_sde_window(steps: torch.Tensor, window: Optional[Tuple[int, int]]) -> torch.Tensor:
    """Bool mask, ``steps``' shape: True for the steps ``start <= i < stop`` of ``window`` (all of them if None)."""
    if window is None:
        return torch.ones_like(steps, dtype=torch.bool)
    return (steps >= window[0]) & (steps < window[1])


@dataclass
class Rollout:
    """Trajectories of ``B`` videos sampled with :func:`pisces_rl.rollout.sample_rollout`.

    ``latents[:, i]`` is the input of denoising step ``i`` and ``latents[:, i + 1]`` its output, so
    step ``i`` maps noise level ``sigmas[i]`` to ``sigmas[i + 1]`` with the model called at
    ``timesteps[i]``; ``log_probs[:, i]`` is the log-probability of that transition under the policy
    that sampled it. Per-batch fields are sliced by the helpers below; the schedule is shared.

    Each video has its own trained steps ``train_step_indices[i]``; a trainer visits them column by
    column, one step per video in the micro-batch ``mb``::

        for k in range(rollout.train_step_indices.shape[1]):
            j = rollout.train_step_indices[mb, k]                  # [b] step of each video
            new = rescore_log_prob(policy, rollout, j, mb)         # new.log_prob [b]
            old = rollout.log_probs[mb, j]                         # [b]
    """

    prompts: List[str]                              # B
    prompt_embeds: torch.Tensor                     # [B, L, D]  (denoiser dtype)
    negative_prompt_embeds: Optional[torch.Tensor]  # [B, L, D], or None when sampled without CFG
    latents: torch.Tensor                           # [B, T+1, C, F, h, w] float32; [:, 0] = initial noise
    log_probs: torch.Tensor                         # [B, T] float32; 0 at deterministic steps
    timesteps: torch.Tensor                         # [T] denoiser timesteps (sigma * num_train_timesteps)
    sigmas: torch.Tensor                            # [T+1] noise levels, sigmas[0] = 1 ... sigmas[T] = 0
    train_step_indices: torch.Tensor                # [B, K] long, sorted step indices in [0, T) to train on
    videos: Optional[torch.Tensor] = None           # [B, F, C, H, W] float in [0, 1], or None if not decoded
    guidance_scale: float = 1.0                     # CFG scale used when sampling (needed to re-score)
    eta: float = 0.0                                # SDE noise level used when sampling (needed to re-score)
    sde_window: Optional[Tuple[int, int]] = None    # steps [start, stop) sampled with eta; the rest are ODE steps
    noise_block: int = 1                            # SDE noise: one draw per k x k latent block (1 = per element)
    sde_type: str = "flow_grpo"                     # noise type ("flow_grpo" | "dance_grpo" | "ddim")

    _BATCHED = ("prompt_embeds", "negative_prompt_embeds", "latents", "log_probs", "train_step_indices", "videos")

    def __post_init__(self) -> None:
        b = len(self.prompts)
        if self.latents.ndim < 3:
            raise ValueError(f"latents must be [B, T+1, ...], got shape {tuple(self.latents.shape)}")
        t = self.latents.shape[1] - 1
        expected = {
            "prompt_embeds": (b,), "negative_prompt_embeds": (b,), "latents": (b, t + 1),
            "log_probs": (b, t), "train_step_indices": (b,), "videos": (b,),
        }
        for name, lead in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape[: len(lead)]) != lead:
                raise ValueError(
                    f"Rollout.{name} has shape {tuple(value.shape)} but must start with {lead} "
                    f"(B={b} prompts, T={t} steps)"
                )
        if tuple(self.timesteps.shape) != (t,) or tuple(self.sigmas.shape) != (t + 1,):
            raise ValueError(
                f"Rollout.timesteps must be [T]={t} and sigmas [T+1]={t + 1}; got {tuple(self.timesteps.shape)} "
                f"and {tuple(self.sigmas.shape)}"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        """T, the number of denoising steps."""
        return self.latents.shape[1] - 1

    def step_eta(self, steps: torch.Tensor) -> torch.Tensor:
        """SDE noise level of each step in ``steps`` (any shape): ``eta`` inside ``sde_window``, else 0."""
        eta = torch.full(steps.shape, float(self.eta), dtype=torch.float32, device=steps.device)
        return torch.where(in_sde_window(steps, self.sde_window), eta, torch.zeros_like(eta))

    def index_select(self, idx: Index) -> "Rollout":
        """The sub-batch ``idx`` (a list / 1-D tensor of indices, a bool mask or a slice)."""
        if isinstance(idx, slice):
            prompts = self.prompts[idx]
            pick = lambda x: x[idx]  # noqa: E731
        else:
            index = torch.as_tensor(idx, device="cpu")
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            index = index.long().flatten()
            if index.numel() and (index.min() < -len(self) or index.max() >= len(self)):
                raise IndexError(f"indices {index.tolist()} out of range for a rollout of {len(self)} videos")
            prompts = [self.prompts[i] for i in index.tolist()]
            pick = lambda x: x.index_select(0, index.to(x.device))  # noqa: E731
        batched = {n: (None if getattr(self, n) is None else pick(getattr(self, n))) for n in self._BATCHED}
        return replace(self, prompts=prompts, **batched)

    def to(self, device: Union[str, torch.device]) -> "Rollout":
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    @staticmethod
    def cat(rollouts: Sequence["Rollout"]) -> "Rollout":
        """Concatenate rollouts along the batch (same as :func:`cat`)."""
        return cat(rollouts)

    def split(self, batch_size: int) -> List["Rollout"]:
        """Consecutive sub-batches of ``batch_size`` videos (the last may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [self.index_select(slice(i, i + batch_size)) for i in range(0, len(self), batch_size)]

    def chunk(self, n: int) -> List["Rollout"]:
        """At most ``n`` nearly equal consecutive sub-batches, like :func:`torch.chunk`."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return self.split(-(-len(self) // n))


def cat(rollouts: Sequence[Rollout]) -> Rollout:
    """Concatenate rollouts along the batch. They must share the schedule, CFG scale, eta and K."""
    if not rollouts:
        raise ValueError("cat() needs at least one Rollout")
    first = rollouts[0]
    for r in rollouts[1:]:
        same = (
            r.num_steps == first.num_steps
            and torch.equal(r.sigmas.cpu(), first.sigmas.cpu())
            and torch.equal(r.timesteps.cpu(), first.timesteps.cpu())
            and r.guidance_scale == first.guidance_scale
            and r.eta == first.eta
            and r.sde_window == first.sde_window
            and r.noise_block == first.noise_block
            and r.sde_type == first.sde_type
            and r.train_step_indices.shape[1] == first.train_step_indices.shape[1]
            and (r.negative_prompt_embeds is None) == (first.negative_prompt_embeds is None)
            and (r.videos is None) == (first.videos is None)
        )
        if not same:
            raise ValueError(
                "cannot cat rollouts sampled with different settings (steps, sigmas, guidance_scale, eta, sde_window, "
                "noise_block, sde_type, train_timestep_fraction, CFG or decoding); sample them with the same SamplingConfig"
            )
    batched = {}
    for name in Rollout._BATCHED:
        if getattr(first, name) is None:
            batched[name] = None
        else:
            batched[name] = torch.cat([getattr(r, name) for r in rollouts], dim=0)
    prompts = [p for r in rollouts for p in r.prompts]
    return replace(first, prompts=prompts, **batched)
