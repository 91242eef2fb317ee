"""Token-level transport cost and OT attention fusion of the PISCES semantic reward (arXiv 2602.01624, §3.3).

Three pieces, each testable on its own:

* :func:`token_transport_cost` builds the text-token × visual-token cost of one cross-attention layer;
* :func:`fuse_attention` mixes a (detached) transport plan into the attention probabilities;
* :class:`OTAttentionFuser` is the ``attention_fuser(layer_index, attn)`` callable an encoder applies in every
  cross-attention layer: cost → ``unbalanced_sinkhorn`` (batched over ``[B, heads]``) → fusion.

Cost embeddings (``y_i``, ``x_j`` of the semantic term), two choices:

* ``"layer_qk"`` (default; the PISCES code): in each cross-attention layer, ``y_i`` = that layer's *query*
  projection of the text states entering it and ``x_j`` = its *key* projection of the visual tokens, both with bias,
  all heads concatenated (width ``heads · head_dim``), L2-normalised; one semantic cost per layer, shared by the
  heads (roar-ai/pisces ``fastvideo/partial_optimal_transport.py`` @f8606b0, ``build_partial_ot_prior``: ``x =
  key_layer[0].transpose(0, 1).reshape(M, -1)``, ``y = query_embeddings[0, valid_tokens]`` with
  ``query_embeddings = mixed_query_layer``, passed from ``xbert.py``'s ``BertSelfAttention.forward``;
  ``compute_spatiotemporal_cost``: ``1 − normalize(y) @ normalize(x)ᵀ`` clamped to [0, 2]);
* ``"itc_proj"``: ``y_i = normalize(text_proj(unimodal text states))``, ``x_j = normalize(vision_proj(visual
  tokens))`` (the encoder's ITC space), the same in every layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pisces_rl.ot.sinkhorn import unbalanced_sinkhorn

__all__ = ["token_transport_cost", "fuse_attention", "OTAttentionFuser", "FUSION_FLOOR", "COST_EMBEDDINGS"]

FUSION_FLOOR = 1e-6
COST_EMBEDDINGS = ("layer_qk", "itc_proj")


def _range_normalise(x: Tensor, rows: Tensor) -> Tensor:
    """Min–max normalise ``x[B, H, N, M]`` to [0, 1] per ``(b, h)`` over the rows where ``rows[B, 1, N, 1]``;
    other rows become 0. A constant matrix becomes all zeros."""
    lo = x.masked_fill(~rows, float("inf")).amin(dim=(-2, -1), keepdim=True)
    hi = x.masked_fill(~rows, float("-inf")).amax(dim=(-2, -1), keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    out = ((x - lo) / span).masked_fill(~rows, 0.0)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)  # items without any selected row


def token_transport_cost(attn: Tensor, text_tokens: Tensor, video_tokens: Tensor, frame_index: Tensor,
                         patch_position: Tensor, lexical_mask: Tensor, gamma: float = 0.2,
                         eta: float = 0.2) -> Tensor:
    """Cost between lexical text tokens and visual tokens for one cross-attention layer (all heads at once).

    With ``A`` the head's attention (rows sum to 1), ``t_j`` the frame index and ``s_j`` the patch position of
    visual token ``j``, each text token's attended time and place are ``τ_i = Σ_k A_ik t_k`` and
    ``π_i = Σ_k A_ik s_k``, and::

        C_ij = N[1 − cos(y_i, x_j)] + γ · N[|τ_i − t_j|] + η · N[‖π_i − s_j‖₂]      then   C ← N[C]

    where ``N[·]`` min–max normalises a term to [0, 1] over the lexical rows of one ``(b, head)`` matrix
    (PISCES, arXiv 2602.01624, Eq. for the spatio-temporal cost; γ = η = 0.2 in the paper).

    Args:
        attn: ``[B, H, N, M]`` cross-attention probabilities.
        text_tokens: ``[B, N, D]`` L2-normalised text token embeddings ``y_i``.
        video_tokens: ``[B, M, D]`` L2-normalised visual token embeddings ``x_j``.
        frame_index: ``[M]`` (or ``[B, M]``) ``t_j`` (any affine scale: each term is range-normalised).
        patch_position: ``[M, 2]`` (or ``[B, M, 2]``) ``s_j`` (any common scale of both axes).
        lexical_mask: ``[B, N]`` bool, rows that take part (no [CLS]/[SEP]/pad).

    Returns:
        ``C`` of shape ``[B, H, N, M]`` in [0, 1]; rows outside ``lexical_mask`` are 0.
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be [B, heads, N, M], got {tuple(attn.shape)}")
    b, h, n, m = attn.shape
    if text_tokens.shape[:2] != (b, n) or video_tokens.shape[:2] != (b, m):
        raise ValueError(f"token shapes {tuple(text_tokens.shape)} / {tuple(video_tokens.shape)} do not match "
                         f"attention [B={b}, heads={h}, N={n}, M={m}]")
    t = frame_index.to(attn).expand(b, m)                      # [B, M]
    s = patch_position.to(attn).expand(b, m, 2)                # [B, M, 2]
    rows = lexical_mask.to(torch.bool).view(b, 1, n, 1)

    semantic = 1.0 - torch.einsum("bnd,bmd->bnm", text_tokens.to(attn), video_tokens.to(attn))  # [B, N, M]
    tau = attn @ t[:, None, :, None]                           # [B, H, N, 1]
    temporal = (tau - t[:, None, None, :]).abs()               # [B, H, N, M]
    pi = attn @ s[:, None]                                     # [B, H, N, 2]
    spatial = torch.cdist(pi, s[:, None].expand(b, h, m, 2),  # [B, H, N, M]
                          compute_mode="donot_use_mm_for_euclid_dist")

    cost = (_range_normalise(semantic[:, None].expand(b, h, n, m), rows)
            + gamma * _range_normalise(temporal, rows)
            + eta * _range_normalise(spatial, rows))
    return _range_normalise(cost, rows)


def fuse_attention(attn: Tensor, plan: Tensor, lexical_mask: Tensor) -> Tensor:
    """Fuse a transport plan into attention: ``Ã_ij = softmax_j(log(A_ij + 1e-6) + log(P̂_ij + 1e-6))``.

    ``P̂`` is the plan detached and row-normalised; rows outside ``lexical_mask`` keep ``A`` unchanged.
    Gradients flow through ``A`` only.

    Args:
        attn: ``[B, H, N, M]`` attention probabilities.
        plan: ``[B, H, N, M]`` transport plan (any non-negative scale).
        lexical_mask: ``[B, N]`` bool.
    Returns:
        ``[B, H, N, M]``, rows summing to 1.
    """
    plan = plan.detach().to(attn)
    plan = plan / plan.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    fused = torch.softmax(torch.log(attn + FUSION_FLOOR) + torch.log(plan + FUSION_FLOOR), dim=-1)
    rows = lexical_mask.to(device=attn.device, dtype=torch.bool)[:, None, :, None]
    return torch.where(rows, fused, attn)


class OTAttentionFuser:
    """``attention_fuser(layer_index, attn[B, H, N, M])`` that applies PISCES partial-OT fusion per layer.

    For each call: cost (:func:`token_transport_cost`, from the *detached* attention) → plan
    ``P = unbalanced_sinkhorn(C, ε, m)`` with uniform marginals over the lexical rows and over all visual tokens
    (batched over ``[B, heads]``) → :func:`fuse_attention`. Plans are kept in ``self.plans[layer_index]``;
    passing ``plans=`` reuses given plans instead of solving (e.g. to differentiate with the plan held fixed).

    ``cost_embeddings`` picks ``y_i`` / ``x_j`` of the semantic term (module docstring). With ``"layer_qk"``
    (``wants_layer_qk`` is True) the encoder calls ``fuser(layer_index, attn, query=Q[B, N, d], key=K[B, M, d])``
    with the layer's own query / key projections; with ``"itc_proj"`` it uses the features' ``token_embeddings``.
    """

    def __init__(self, text, video, gamma: float = 0.2, eta: float = 0.2, epsilon: float = 0.05,
                 mass: float = 0.9, max_iter: int = 200, tol: float = 1e-3,
                 plans: Optional[dict[int, Tensor]] = None, cost_embeddings: str = "layer_qk"):
        if cost_embeddings not in COST_EMBEDDINGS:
            raise ValueError(f"cost_embeddings must be one of {COST_EMBEDDINGS}, got {cost_embeddings!r}")
        self.gamma, self.eta, self.epsilon, self.mass = gamma, eta, epsilon, mass
        self.max_iter, self.tol = max_iter, tol
        self.cost_embeddings = cost_embeddings
        self.lexical_mask = text.lexical_mask.bool()                         # [B, N]
        self.text_tokens = text.token_embeddings.detach()                    # [B, N, D]
        self.video_tokens = video.token_embeddings.detach()                  # [B, M, D]
        self.frame_index = video.frame_index.detach()                        # [M]
        self.patch_position = video.patch_position.detach()                  # [M, 2]
        self.fixed = plans is not None
        self.plans: dict[int, Tensor] = dict(plans) if plans is not None else {}
        self.calls: list[int] = []

    @property
    def wants_layer_qk(self) -> bool:
        """True when the encoder must pass each layer's ``query=`` / ``key=`` projections (``layer_qk``)."""
        return self.cost_embeddings == "layer_qk" and not self.fixed

    def _embeddings(self, layer_index: int, query: Optional[Tensor], key: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(y[B, N, d], x[B, M, d])``, L2-normalised, for the semantic term of one layer."""
        if self.cost_embeddings == "itc_proj":
            return self.text_tokens, self.video_tokens
        if query is None or key is None:
            raise ValueError(f"cost_embeddings='layer_qk' needs the query/key projections of cross-attention layer "
                             f"{layer_index}, but the encoder passed none; use an encoder whose match_probability "
                             "supports it (supports_layer_qk = True, e.g. BlipVideoTextEncoder) or "
                             "cost_embeddings='itc_proj'")
        work = torch.float64 if query.dtype == torch.float64 else torch.float32
        return (torch.nn.functional.normalize(query.detach().to(work), dim=-1),
                torch.nn.functional.normalize(key.detach().to(work), dim=-1))

    def cost(self, attn: Tensor, query: Optional[Tensor] = None, key: Optional[Tensor] = None,
             layer_index: int = -1) -> Tensor:
        """The cost ``[B, H, N, M]`` for one layer's attention (computed without autograd, in >= fp32).

        ``query`` ``[B, N, d]`` / ``key`` ``[B, M, d]``: the layer's query / key projections (``layer_qk`` only).
        """
        work = attn.detach().to(torch.float64 if attn.dtype == torch.float64 else torch.float32)
        with torch.no_grad():
            y, x = self._embeddings(layer_index, query, key)
            return token_transport_cost(work, y, x, self.frame_index, self.patch_position,
                                        self.lexical_mask.to(attn.device), gamma=self.gamma, eta=self.eta)

    def solve(self, attn: Tensor, query: Optional[Tensor] = None, key: Optional[Tensor] = None,
              layer_index: int = -1) -> Tensor:
        """Unbalanced OT plan ``[B, H, N, M]`` for one layer (no autograd)."""
        cost = self.cost(attn, query, key, layer_index)
        b, h, n, m = cost.shape
        lexical = self.lexical_mask.to(cost.device)
        # Items with no lexical token get uniform rows so the solver stays finite; their plan is never used.
        rows = torch.where(lexical.any(dim=1, keepdim=True), lexical, torch.ones_like(lexical)).to(cost.dtype)
        a = (rows / rows.sum(dim=1, keepdim=True))[:, None, :]               # [B, 1, N]
        with torch.no_grad():
            return unbalanced_sinkhorn(cost, epsilon=self.epsilon, mass=self.mass, max_iter=self.max_iter,
                                       tol=self.tol, a=a)

    def __call__(self, layer_index: int, attn: Tensor, query: Optional[Tensor] = None,
                 key: Optional[Tensor] = None) -> Tensor:
        self.calls.append(layer_index)
        if self.fixed:
            if layer_index not in self.plans:
                raise KeyError(f"no fixed transport plan for cross-attention layer {layer_index}; "
                               f"plans were given for layers {sorted(self.plans)}")
            plan = self.plans[layer_index]
        else:
            plan = self.solve(attn, query, key, layer_index)
            self.plans[layer_index] = plan
        return fuse_attention(attn, plan, self.lexical_mask.to(attn.device))
