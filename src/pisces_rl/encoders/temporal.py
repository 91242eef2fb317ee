"""Frame-order awareness for an image tower applied frame by frame (an optional part of a video encoder).

An image model run on each frame and pooled by a mean sees a clip as a *set* of frames: a clip and its time reversal
get the same features, so "moving left" and "moving right" cannot be told apart. :class:`TemporalAdapter` adds two
zero-initialised pieces on top of the per-frame states ``h[b, f, k]`` (``k = 0`` the frame [CLS], ``k >= 1`` patches):

* a **frame embedding** ``e_f`` added to every patch token of frame ``f`` — the fusion (ITM) tower then knows which
  frame each visual token comes from;
* a **motion term** in the pooled token, ``cls = mean_f h[f, 0] + W_m Σ_f r_f h[f, 0]`` with the centred ramp
  ``r_f = (2f/(F-1) - 1) / Σ_f' |2f'/(F-1) - 1|`` (the least-squares slope of the frame [CLS] over time, up to
  scale), which changes sign when the clip is reversed.

* **motion moments** in the pooled token, ``W_x m_x + W_y m_y`` with ``m_x = (1/P) Σ_p x_p Σ_f r_f h[f, p]``
  (``x_p ∈ [-1, 1]`` the patch column, likewise ``y_p`` the row): for an object with patch features ``φ`` at
  position ``x(f)`` this is ``φ · Σ_f r_f x(f)``, its features times its velocity, while static content cancels
  (``Σ_f r_f = 0``). The frame [CLS] of an image tower trained on captions that never name positions learns to
  ignore where things are, so its slope (the motion term) can vanish; patch tokens keep their place in the grid, so
  the moments see motion from the first step.

All three are zero at initialisation, so adding an adapter leaves a pretrained encoder's outputs unchanged until the
adapter is trained, and an adapter saved before the moments existed loads with them at zero (the same outputs).
The frame table is stored for ``num_frames`` frames and linearly interpolated for other counts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TemporalAdapter"]


class TemporalAdapter(nn.Module):
    """``states[B, F, 1+P, Dv] -> (visual_cls[B, 1, Dv], patch_tokens[B, F*P, Dv])``, order-aware.

    Args:
        hidden_size: width ``Dv`` of the image tower's states.
        num_frames: frames the frame-embedding table is stored for (other counts interpolate it).
    """

    def __init__(self, hidden_size: int, num_frames: int):
        super().__init__()
        if int(num_frames) < 1:
            raise ValueError(f"TemporalAdapter needs num_frames >= 1, got {num_frames}")
        self.hidden_size = int(hidden_size)
        self.num_frames = int(num_frames)
        self.frame_embedding = nn.Parameter(torch.zeros(self.num_frames, self.hidden_size))
        self.motion = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        nn.init.zeros_(self.motion.weight)
        self.moments = nn.Linear(2 * self.hidden_size, self.hidden_size, bias=False)
        nn.init.zeros_(self.moments.weight)
        self._register_load_state_dict_pre_hook(self._zero_missing_moments)

    def _zero_missing_moments(self, state_dict, prefix, *args) -> None:
        """An adapter saved before the motion moments existed loads with them at zero (unchanged outputs)."""
        state_dict.setdefault(prefix + "moments.weight", torch.zeros_like(self.moments.weight))

    def frame_table(self, num_frames: int) -> Tensor:
        """The frame embeddings for ``num_frames`` frames ``[F, Dv]`` (linear interpolation over time)."""
        table = self.frame_embedding
        if num_frames == self.num_frames:
            return table
        if self.num_frames == 1:
            return table.expand(num_frames, -1)
        return F.interpolate(table.T[None], size=num_frames, mode="linear", align_corners=True)[0].T

    @staticmethod
    def ramp(num_frames: int, device=None, dtype=torch.float32) -> Tensor:
        """Centred time ramp ``r[F]`` with ``Σ|r| = 1`` (all zeros for one frame)."""
        if num_frames < 2:
            return torch.zeros(num_frames, device=device, dtype=dtype)
        r = torch.linspace(-1.0, 1.0, num_frames, device=device, dtype=dtype)
        return r / r.abs().sum()

    @staticmethod
    def motion_moments(states: Tensor, ramp: Tensor) -> Tensor:
        """``[B, F, 1+P, Dv] -> [B, 2 Dv]``: ``(m_x, m_y)``, the patch tokens' time slope weighted by the patch
        column / row in [-1, 1] (module docstring); P must be a square grid, row-major as patch embeddings are."""
        patches = states[:, :, 1:]                                              # [B, F, P, Dv]
        p = patches.shape[2]
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"motion moments need a square patch grid, got {p} patches per frame")
        velocity = torch.einsum("f,bfpd->bpd", ramp, patches)                    # [B, P, Dv]
        axis = torch.linspace(-1.0, 1.0, side, device=states.device, dtype=states.dtype) if side > 1 else \
            torch.zeros(1, device=states.device, dtype=states.dtype)
        cols, rows = axis.repeat(side), axis.repeat_interleave(side)          # [P] each, row-major grid
        return torch.cat([torch.einsum("p,bpd->bd", cols, velocity), torch.einsum("p,bpd->bd", rows, velocity)],
                         dim=-1) / p

    def forward(self, states: Tensor) -> tuple[Tensor, Tensor]:
        if states.dim() != 4 or states.shape[-1] != self.hidden_size:
            raise ValueError(f"TemporalAdapter expects states [B, F, 1+P, {self.hidden_size}], "
                             f"got {tuple(states.shape)}")
        f = states.shape[1]
        cls = states[:, :, 0]                                                   # [B, F, Dv]
        ramp = self.ramp(f, states.device, states.dtype)
        slope = torch.einsum("f,bfd->bd", ramp, cls)
        visual_cls = cls.mean(dim=1) + self.motion(slope) + self.moments(self.motion_moments(states, ramp))
        patches = states[:, :, 1:] + self.frame_table(f).to(states.dtype)[None, :, None]
        return visual_cls[:, None], patches.flatten(1, 2)
