"""PISCES token-level semantic reward: video–text matching with partial-OT-fused cross-attention.

For every cross-attention head of every fusion layer of the encoder's text tower (PISCES, arXiv 2602.01624,
§3.3 and Algorithm 3):

1. cost ``C_ij = N[1 − cos(y_i, x_j)] + γ N[|τ_i − t_j|] + η N[‖π_i − s_j‖₂]``, then ``C ← N[C]``, over the
   lexical text tokens ``i`` and all visual tokens ``j`` (``τ_i = Σ_k A_ik t_k``, ``π_i = Σ_k A_ik s_k``,
   ``N`` = min–max to [0, 1]); see :func:`pisces_rl.rewards._ot_cost.token_transport_cost`; ``y_i`` / ``x_j`` are
   the layer's query / key projections (``cost_embeddings="layer_qk"``, the PISCES code) or the ITC projections
   (``"itc_proj"``); ``t_j`` / ``s_j`` put the visual [CLS] at frame -1, position (-1, -1);
2. entropic unbalanced OT with KL-relaxed marginals, uniform ``μ, ν``, transported mass ``m``:
   ``P = unbalanced_sinkhorn(C, ε, m)`` batched over ``[B, heads]``;
3. ``Ã_ij = softmax_j(log(A_ij + 1e-6) + log(P̂_ij + 1e-6))`` for lexical rows, ``P̂`` = detached row-normalised
   ``P``; the layer continues with ``Ã``;

and the reward is the VTM positive-match probability ``R_s = softmax(VTM(fused [CLS]))[1]``.
``use_ot=False`` scores with the vanilla attention (the "w/o OT" ablation).

Example::

    >>> enc = BlipVideoTextEncoder.tiny()
    >>> reward = OTSemanticReward(enc)
    >>> reward(torch.rand(2, 4, 3, 32, 32), ["a red circle", "two blue squares"]).shape
    torch.Size([2])
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._features import check_batch, encode_prompts, encoder_device, grad_context
from ._ot_cost import COST_EMBEDDINGS, OTAttentionFuser

__all__ = ["OTSemanticReward"]


class OTSemanticReward:
    """``R_s(videos[B, F, C, H, W] in [0, 1], prompts) -> Tensor[B]`` in (0, 1).

    Args:
        encoder: a frozen :class:`~pisces_rl.encoders.base.VideoTextEncoder` whose ``match_probability`` accepts
            an ``attention_fuser`` (e.g. :class:`~pisces_rl.encoders.blip.BlipVideoTextEncoder`).
        gamma, eta: weights of the temporal and spatial cost terms (paper: 0.2, 0.2).
        epsilon: entropic regularisation ``ε`` of the OT problem (paper: 0.05).
        mass: transported fraction ``m`` (paper: 0.9; ``>= 0.999`` = balanced OT).
        use_ot: False scores with vanilla cross-attention ("w/o OT").
        max_iter, tol: Sinkhorn stopping rule (at most ``max_iter`` updates, sup-norm change < ``tol``).
        cost_embeddings: ``"layer_qk"`` = each cross-attention layer's query (text) / key (video) projections, as
            the PISCES code; ``"itc_proj"`` = the ITC projections ``text_proj`` / ``vision_proj``, shared by layers.
        device: optional device to move the encoder to.

    Scoring runs without autograd unless grad mode is on *and* ``videos.requires_grad`` (what
    ``RewardServer.differentiable`` does, as advertised by ``differentiable = True``); gradients then reach the
    videos through the attention ``A`` (the transport plan is a constant), never the encoder's parameters.
    """

    name = "ot_semantic"
    differentiable = True

    def __init__(self, encoder, gamma: float = 0.2, eta: float = 0.2, epsilon: float = 0.05, mass: float = 0.9,
                 use_ot: bool = True, max_iter: int = 200, tol: float = 1e-3, device=None,
                 cost_embeddings: str = "layer_qk"):
        if encoder is None or not hasattr(encoder, "match_probability"):
            raise TypeError("OTSemanticReward needs a VideoTextEncoder (encode_text, encode_video, "
                            "match_probability), e.g. BlipVideoTextEncoder.tiny() or .from_pretrained(path)")
        for key, value in (("gamma", gamma), ("eta", eta)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0 (weight of a cost term), got {value}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0 (entropic regularisation), got {epsilon}")
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass must lie in (0, 1] (transported fraction; 0.9 in the paper), got {mass}")
        if cost_embeddings not in COST_EMBEDDINGS:
            raise ValueError(f"cost_embeddings must be one of {COST_EMBEDDINGS} ('layer_qk' = the PISCES code's "
                             f"per-layer query/key projections), got {cost_embeddings!r}")
        if use_ot and cost_embeddings == "layer_qk" and not getattr(encoder, "supports_layer_qk", False):
            raise ValueError(f"cost_embeddings='layer_qk' needs an encoder that passes its cross-attention "
                             f"query/key projections to the fuser (supports_layer_qk = True); "
                             f"{type(encoder).__name__} does not, use cost_embeddings='itc_proj'")
        if max_iter < 1 or tol <= 0:
            raise ValueError(f"need max_iter >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
        if device is not None and hasattr(encoder, "to"):
            encoder = encoder.to(device) or encoder
        self.encoder = encoder
        self.gamma, self.eta, self.epsilon, self.mass = float(gamma), float(eta), float(epsilon), float(mass)
        self.use_ot = bool(use_ot)
        self.cost_embeddings = cost_embeddings
        self.max_iter, self.tol = int(max_iter), float(tol)

    @property
    def device(self) -> Optional[torch.device]:
        """Where videos should live (the encoder's device); read by the RewardServer."""
        return encoder_device(self.encoder)

    def __repr__(self) -> str:
        return (f"OTSemanticReward(use_ot={self.use_ot}, gamma={self.gamma}, eta={self.eta}, "
                f"epsilon={self.epsilon}, mass={self.mass}, cost_embeddings={self.cost_embeddings!r})")

    def attention_fuser(self, text, video, plans: Optional[dict[int, Tensor]] = None) -> Optional[OTAttentionFuser]:
        """The per-layer OT fuser for these features (None with ``use_ot=False``).

        ``plans`` (``{layer_index: P[B, heads, N, M]}``, e.g. ``fuser.plans`` of an earlier call) fixes the
        transport plans instead of solving for them.
        """
        if not self.use_ot:
            return None
        return OTAttentionFuser(text, video, gamma=self.gamma, eta=self.eta, epsilon=self.epsilon,
                                mass=self.mass, max_iter=self.max_iter, tol=self.tol, plans=plans,
                                cost_embeddings=self.cost_embeddings)

    def score_features(self, text, video, plans: Optional[dict[int, Tensor]] = None) -> Tensor:
        """``R_s`` ``[B]`` from encoded features (follows the ambient grad mode)."""
        return self.encoder.match_probability(text, video, attention_fuser=self.attention_fuser(text, video, plans))

    def __call__(self, videos: Tensor, prompts: list[str], **kwargs) -> Tensor:
        """Score ``videos[B, F, C, H, W]`` in [0, 1] against ``B`` prompts; returns ``Tensor[B]``."""
        prompts = check_batch(videos, prompts, "ot_semantic")
        text = encode_prompts(self.encoder, prompts)
        with grad_context(videos):
            video = self.encoder.encode_video(videos)
            return self.score_features(text, video)
