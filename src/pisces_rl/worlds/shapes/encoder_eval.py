"""Held-out quality of the ShapesWorld encoder: retrieval, hard-negative matching and time reversal.

Scores an encoder trained by :func:`~pisces_rl.worlds.shapes.encoder_training.train_shapes_encoder` (or any
:class:`~pisces_rl.encoders.base.VideoTextEncoder` with ``match_probability``) on a held-out ShapesWorld corpus. These
are the encoder's own metrics, written to the world manifest; the ShapesBench judge is separate and never used here.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

from .encoder_training import NEGATIVE_KINDS, _cat_video, _select, corpus_attributes, hard_negative, moves

__all__ = ["evaluate_encoder"]


def _axis_free(caption: str) -> str:
    """A caption with its directions reduced to their axis ("left"/"right" -> "horizontal", ...)."""
    for word, axis in (("left", "horizontal"), ("right", "horizontal"), ("up", "vertical"), ("down", "vertical")):
        caption = caption.replace(f"moving {word}", f"moving {axis}")
    return caption


@torch.no_grad()
def evaluate_encoder(encoder, dataset, pool_size: int = 200, rerank_k: int = 8, batch_size: int = 128,
                     seed: int = 0) -> dict:
    """Retrieval and matching quality of ``encoder`` on a (held-out) ShapesWorld corpus.

    * **Retrieval** over a pool of up to ``pool_size`` clips with distinct canonical captions: text→video and
      video→text R@1 by ITC cosine (chance ``1/pool``), text→video R@1 after re-ranking the ITC top-``rerank_k``
      by the ITM probability (BLIP's protocol), and ``t2v_r1_axis``, which counts a retrieved clip whose caption
      differs only in the *direction* of motion as correct (what an encoder blind to frame order can reach).
    * **Hard negatives**: for every clip and every negative kind that applies, ITM ``p(match)`` of the true caption
      vs. the perturbed one. ``itm_pair_acc/<kind>`` = share with p(true) > p(negative) (chance 0.5),
      ``itc_pair_acc/<kind>`` the same with the ITC cosine of text [CLS] and pooled video;
      ``itm_pair_acc`` pools the kinds except ``direction``; ``itm_acc`` = class-balanced accuracy of the 0.5
      threshold over all positives and the non-direction negatives (pooled as before the encoder saw frame order).
    * **Time reversal**: for every clip in which something moves, ``itm_pair_acc/reversed`` = share with
      ``p(caption, clip) > p(caption, clip played backwards)``, ``itc_pair_acc/reversed`` the same by ITC cosine
      (0.5 for an encoder blind to frame order, which scores both the same; ties count as failures).

    Returns a flat dict of floats (plus ``pool`` and per-kind counts ``count/<kind>``).
    """
    videos = torch.from_numpy(np.ascontiguousarray(dataset.with_format("numpy", dtype="uint8")[:]["video"]))
    captions = list(dataset["canonical_caption"])
    attrs = corpus_attributes(dataset)

    def encode(clips: Tensor):                                     # uint8 [N, F, H, W, 3] -> VideoFeatures
        return _cat_video([encoder.encode_video(clips[s:s + batch_size].movedim(-1, -3).float() / 255.0)
                           for s in range(0, len(clips), batch_size)])

    feats = encode(videos)

    def match(texts: list[str], rows: list[int], cosine: bool = False, clips=None) -> Tensor:  # [len(texts)]
        """ITM p(match) (or ITC cosine) of ``texts[i]`` with clip ``rows[i]`` of ``clips`` (default: the corpus)."""
        clips = feats if clips is None else clips
        out = []
        for s in range(0, len(texts), batch_size):
            text = encoder.encode_text(texts[s:s + batch_size])
            video = _select(clips, torch.tensor(rows[s:s + batch_size]))
            out.append((text.cls_embedding * video.pooled_embedding).sum(-1) if cosine else
                       encoder.match_probability(text, video))
        return torch.cat(out)

    # retrieval pool: the first clip of each distinct caption
    pool = sorted({c: i for i, c in reversed(list(enumerate(captions)))}.values())[:pool_size]
    pool_caps = [captions[i] for i in pool]
    text = torch.cat([encoder.encode_text(pool_caps[s:s + batch_size]).cls_embedding
                      for s in range(0, len(pool), batch_size)])
    sim = text @ feats.pooled_embedding[pool].T                                       # [P, P] text x video
    target = torch.arange(len(pool))
    t2v = sim.argmax(dim=1)
    axis = [_axis_free(c) for c in pool_caps]
    metrics = {"pool": len(pool), "chance_r1": 1.0 / len(pool),
               "t2v_r1": float((t2v == target).float().mean()),
               "v2t_r1": float((sim.argmax(dim=0) == target).float().mean()),
               "t2v_r1_axis": float(np.mean([axis[int(j)] == axis[i] for i, j in enumerate(t2v)]))}
    k = min(rerank_k, len(pool))
    top = sim.topk(k, dim=1).indices                                                  # [P, k]
    p = match([c for c in pool_caps for _ in range(k)], [pool[int(j)] for j in top.flatten()]).view(-1, k)
    reranked = top.gather(1, p.argmax(dim=1, keepdim=True)).squeeze(1)
    metrics["t2v_r1_itm_rerank"] = float((reranked == target).float().mean())

    # hard negatives: every applicable kind for every clip
    rng = random.Random(seed)
    rows, negs, kinds = [], [], []
    for i, a in enumerate(attrs):
        for kind in NEGATIVE_KINDS:
            try:
                negs.append(hard_negative(a, rng, [kind])[0])
            except ValueError:
                continue
            rows.append(i)
            kinds.append(kind)
    p_pos = match(captions, list(range(len(captions))))
    p_neg = match(negs, rows)
    pos_of = p_pos[torch.tensor(rows)]
    cos_pos = match(captions, list(range(len(captions))), cosine=True)
    cos_gap = cos_pos[torch.tensor(rows)] - match(negs, rows, True)
    kinds_arr = np.array(kinds)
    learnable = torch.from_numpy(kinds_arr != "direction")
    for kind in NEGATIVE_KINDS:
        mask = torch.from_numpy(kinds_arr == kind)
        if mask.any():
            metrics[f"itm_pair_acc/{kind}"] = float((pos_of[mask] > p_neg[mask]).float().mean())
            metrics[f"itc_pair_acc/{kind}"] = float((cos_gap[mask] > 0).float().mean())
            metrics[f"count/{kind}"] = int(mask.sum())
    metrics["itm_pair_acc"] = float((pos_of[learnable] > p_neg[learnable]).float().mean())
    metrics["itc_pair_acc"] = float((cos_gap[learnable] > 0).float().mean())
    metrics["itm_acc"] = 0.5 * float((p_pos > 0.5).float().mean()) + \
        0.5 * float((p_neg[learnable] < 0.5).float().mean())
    metrics["itm_pos_mean"] = float(p_pos.mean())
    metrics["itm_neg_mean"] = float(p_neg[learnable].mean())

    moving = torch.nonzero(moves(attrs)).squeeze(1).tolist()
    if moving:
        back = encode(videos[torch.tensor(moving)].flip(1))       # each moving clip played backwards
        texts, order = [captions[i] for i in moving], list(range(len(moving)))
        p_back, cos_back = match(texts, order, clips=back), match(texts, order, cosine=True, clips=back)
        margin = 1e-4                                  # an order-blind encoder differs only by rounding: a tie
        metrics["itm_pair_acc/reversed"] = float((p_pos[torch.tensor(moving)] - p_back > margin).float().mean())
        metrics["itc_pair_acc/reversed"] = float((cos_pos[torch.tensor(moving)] - cos_back > margin).float().mean())
        metrics["count/reversed"] = len(moving)
    return metrics
