"""Train the tiny BLIP-class video–text encoder of ShapesWorld (the reward model of the embedded default).

The encoder is a :class:`~pisces_rl.encoders.BlipVideoTextEncoder` built with :meth:`~BlipVideoTextEncoder.tiny`
and trained through the adapter's own calls (``encode_text`` / ``encode_video`` / ``match_probability``), so the
rewards later read exactly the features that were trained. Two losses, as in BLIP / InternVideo2 stage 2:

* **ITC** (contrastive): ``s = exp(logit_scale) · cls_text @ pooled_videoᵀ`` ``[B, B]``, symmetric cross-entropy
  whose targets spread over every pair sharing the same canonical caption (the corpus repeats captions);
* **ITM** (matching) on the fused [CLS]: binary cross-entropy on ``p = match_probability(text, video)`` for
  ``B`` positives against, per clip, ``hard_negatives`` *hard negative captions* (the true caption with one
  attribute changed: colour, shape, count, motion, relation or a swap of attributes between the two objects,
  see :func:`hard_negative`) and one caption mined in the batch by ITC similarity (BLIP's sampling; optionally
  also a mined clip per caption). All pairs go through one fusion pass; positives and negatives weigh half each.

Weights start with std ``init_range = 0.1`` rather than BLIP's 0.02: at this width the matching head otherwise
sits at p = 0.5 for hundreds of steps before the cross-attention becomes selective.

The adapter looks at frames independently and pools them without frame order (the visual [CLS] is the mean of the
frame [CLS] tokens; cross-attention sees the patch tokens as a set), so a clip and its time reversal get the same
features: "moving left" and "moving right" are indistinguishable to it. Direction-flip negatives are therefore
left out of training by default (``ShapesEncoderConfig.direction_negatives``) and scored separately by
:func:`evaluate_encoder`. At the default size and budget colour, shape, count and attribute binding are learned,
while motion axis / still-vs-moving and spatial relations stay near chance (``benchmarks/shapes_world_build.py``).

Example::

    >>> ds = shapes_corpus(2000, seed=0, num_frames=9, size=32, split="train")
    >>> encoder, history = train_shapes_encoder(ds, ShapesEncoderConfig(steps=300))
    >>> metrics = evaluate_encoder(encoder, shapes_corpus(300, seed=1, split="heldout"))
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .captions import ObjectQuery, PromptAttributes, caption_from_attributes
from .spec import COLOURS, MOTIONS, RELATIONS, SHAPES

__all__ = ["ShapesEncoderConfig", "NEGATIVE_KINDS", "corpus_attributes", "hard_negative", "train_shapes_encoder",
           "evaluate_encoder"]

NEGATIVE_KINDS = ("colour", "shape", "count", "motion", "relation", "binding", "direction")
"""Hard-negative caption kinds: one attribute changed (``motion`` picks another axis or still/moving; ``direction``
reverses a motion), ``relation`` another spatial relation, ``binding`` two objects' colours (or shapes) swapped."""
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still",
            "left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ShapesEncoderConfig:
    """Architecture and optimisation of the ShapesWorld encoder (every field enters the world's cache key)."""

    seed: int = 0                 # weight init, batch order, negatives
    hidden_size: int = 64         # width of the vision and text towers
    num_layers: int = 2           # layers per tower (every text layer has cross-attention)
    num_heads: int = 4
    image_size: int = 32          # frames are resized to this side
    patch_size: int = 8           # 4x4 patches per 32x32 frame
    embed_dim: int = 64           # ITC space (the OT map's dimension)
    num_frames: int = 5           # frames the encoder subsamples from any clip (stored with the checkpoint)
    init_range: float = 0.1       # std of the initial weights (BLIP's 0.02 leaves ITM stuck at chance for long)
    steps: int = 1500
    batch_size: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.02
    warmup_steps: int = 100
    itm_weight: float = 1.0       # loss = itc + itm_weight * itm
    direction_negatives: bool = False   # also train on reversed-direction captions (unlearnable, see module doc)
    augment: float = 0.5          # probability per clip of a light degradation (noise / blur / brightness)
    hard_negatives: int = 2       # hard negative captions per clip and step (ITM)
    mined_video: bool = False     # also an ITC-mined negative clip per caption (ITM)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- hard negatives
def corpus_attributes(dataset) -> list[PromptAttributes]:
    """The :class:`PromptAttributes` of every corpus row, read from its ``shapes/colours/counts/motions/relation``."""
    cols = dataset.select_columns(["shapes", "colours", "counts", "motions", "relation"])[:]
    return [PromptAttributes(objects=tuple(ObjectQuery(*o) for o in zip(s, c, n, m)), relation=r or None)
            for s, c, n, m, r in zip(cols["shapes"], cols["colours"], cols["counts"], cols["motions"],
                                     cols["relation"])]


def _canonical(attrs: PromptAttributes) -> tuple:
    """A key equal for captions that state the same scene (object order and relation direction normalised)."""
    objects = tuple((o.shape, o.colour, o.count, o.motion) for o in attrs.objects)
    if attrs.relation is None:
        return tuple(sorted(objects)), None
    if objects[0] > objects[1]:
        return (objects[1], objects[0]), OPPOSITE[attrs.relation]
    return objects, attrs.relation


def _perturb(attrs: PromptAttributes, kind: str, rng: random.Random) -> Optional[PromptAttributes]:
    objs, rel = list(attrs.objects), attrs.relation
    i = rng.randrange(len(objs))
    shared_motion = rel is not None          # a relation caption states one motion for both objects
    if kind == "colour":
        objs[i] = replace(objs[i], colour=rng.choice([c for c in COLOURS if c != objs[i].colour]))
    elif kind == "shape":
        objs[i] = replace(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape]))
    elif kind == "count":
        if len(objs) != 1:
            return None
        objs[0] = replace(objs[0], count=rng.choice([n for n in (1, 2, 3) if n != objs[0].count]))
    elif kind in ("motion", "direction"):
        old = objs[i].motion
        if kind == "direction":
            if old == "still":
                return None
            new = OPPOSITE[old]
        else:
            new = rng.choice([m for m in MOTIONS if m not in (old, OPPOSITE[old])])
        objs = [replace(o, motion=new) for o in objs] if shared_motion else \
            [replace(o, motion=new) if j == i else o for j, o in enumerate(objs)]
    elif kind == "relation":
        if rel is None:
            return None
        rel = rng.choice([r for r in RELATIONS if r != rel])
    elif kind == "binding":
        if len(objs) != 2:
            return None
        a, b = objs
        field = "colour" if a.colour != b.colour else "shape"
        objs = [replace(a, **{field: getattr(b, field)}), replace(b, **{field: getattr(a, field)})]
    else:
        raise ValueError(f"unknown negative kind {kind!r}; use one of {NEGATIVE_KINDS}")
    out = PromptAttributes(objects=tuple(objs), relation=rel)
    return None if _canonical(out) == _canonical(attrs) else out


def hard_negative(attrs: PromptAttributes, rng: random.Random, kinds: Sequence[str] = NEGATIVE_KINDS[:-1],
                  paraphrase: bool = False) -> tuple[str, str]:
    """A caption that contradicts ``attrs`` in exactly one respect: ``(caption, kind)``.

    ``kind`` is drawn uniformly from the ``kinds`` that apply to the scene (``count`` needs a single group,
    ``relation`` a relation caption, ``binding`` two objects, ``direction`` a moving object); the result never
    states the same scene as ``attrs`` (object order and mirrored relations are normalised before comparing).
    """
    kinds = list(kinds)
    rng.shuffle(kinds)
    for kind in kinds:
        for _ in range(4):
            out = _perturb(attrs, kind, rng)
            if out is not None:
                np_rng = np.random.default_rng(rng.randrange(2**31)) if paraphrase else None
                return caption_from_attributes(out, np_rng), kind
    raise ValueError(f"no hard negative of kinds {kinds} applies to {attrs}")


# ----------------------------------------------------------------------------------------------- training
def _select(features, index: Tensor):
    """Rows ``index`` of a TextFeatures / VideoFeatures (batch-first tensors only)."""
    batch = len(features)
    values = {}
    for f in fields(features):
        v = getattr(features, f.name)
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch and f.name not in (
                "frame_index", "patch_position"):
            v = v[index]
        elif isinstance(v, list):
            v = [v[int(j)] for j in index]
        values[f.name] = v
    return type(features)(**values)


def _augment(videos: Tensor, prob: float, gen: torch.Generator) -> Tensor:
    """Light degradations of ``videos[B, F, C, H, W]`` in [0, 1]: per clip, with probability ``prob``, a blend
    towards a 3x3 box blur, Gaussian noise and a brightness offset (strengths drawn per clip)."""
    if prob <= 0:
        return videos
    b = videos.shape[0]
    chosen = (torch.rand(b, generator=gen) < prob).float().view(b, 1, 1, 1, 1)
    flat = videos.flatten(0, 1)
    blurred = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1).view_as(videos)
    alpha = torch.rand(b, 1, 1, 1, 1, generator=gen) * 0.7
    sigma = torch.rand(b, 1, 1, 1, 1, generator=gen) * 0.04
    shift = (torch.rand(b, 1, 1, 1, 1, generator=gen) - 0.5) * 0.1
    noisy = (1 - alpha) * videos + alpha * blurred + sigma * torch.randn(videos.shape, generator=gen) + shift
    return (chosen * noisy + (1 - chosen) * videos).clamp(0, 1)


def _lr_factor(step: int, cfg: ShapesEncoderConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _bce(p: Tensor, positive: bool) -> Tensor:
    return -torch.log((p if positive else 1 - p).clamp_min(1e-6)).mean()


def _mine(sim: Tensor, same: Tensor, gen: torch.Generator) -> Tensor:
    """For each row, an index drawn from ``softmax(sim[row])`` over the columns with another caption ``[B]``."""
    weights = sim.detach().float().softmax(dim=1).masked_fill(same, 0.0)
    weights[weights.sum(dim=1) <= 0] = 1.0          # every clip shares the caption: any column will do
    return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def train_shapes_encoder(dataset, cfg: ShapesEncoderConfig = ShapesEncoderConfig(), progress: bool = True):
    """Train a tiny BLIP video–text encoder on a ShapesWorld corpus.

    Args:
        dataset: a :func:`~pisces_rl.worlds.shapes.shapes_corpus` dataset (``video`` uint8 ``[F, H, W, 3]``,
            ``caption``, ``canonical_caption`` and the attribute columns).
        cfg: :class:`ShapesEncoderConfig`.
        progress: tqdm progress bar.

    Returns:
        ``(encoder, history)``: the frozen :class:`~pisces_rl.encoders.BlipVideoTextEncoder` (eval mode,
        ``num_frames=cfg.num_frames``) and ``{"train": [{"step", "loss", "itc", "itm", "lr"}...], "seconds"}``.
    """
    from tqdm.auto import tqdm

    from pisces_rl.encoders import BlipVideoTextEncoder

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {cfg.steps} and {cfg.batch_size}")
    videos = torch.from_numpy(np.ascontiguousarray(dataset.with_format("numpy", dtype="uint8")[:]["video"]))
    captions = list(dataset["caption"])
    canon = list(dataset["canonical_caption"])
    caption_id = torch.tensor([{c: i for i, c in enumerate(dict.fromkeys(canon))}[c] for c in canon])
    attrs = corpus_attributes(dataset)
    paraphrased = any(a != b for a, b in zip(captions, canon))
    kinds = NEGATIVE_KINDS if cfg.direction_negatives else NEGATIVE_KINDS[:-1]
    n = len(captions)
    batch = min(cfg.batch_size, n)

    encoder = BlipVideoTextEncoder.tiny(
        seed=cfg.seed, num_frames=cfg.num_frames, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        initializer_range=cfg.init_range)
    model = encoder.model
    model.train()
    model.requires_grad_(True)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    decay = [p for name, p in model.named_parameters() if p.dim() > 1 and "embeddings" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.dim() > 1 and "embeddings" not in name)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay + [logit_scale], "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = random.Random(cfg.seed + 2)
    history: dict = {"train": []}
    sums = {"loss": 0.0, "itc": 0.0, "itm": 0.0}
    log_every = max(1, cfg.steps // 50)
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train encoder", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randperm(n, generator=gen)[:batch]
        clips = videos[idx].movedim(-1, -3).float() / 255.0                        # [B, F, C, H, W]
        clips = _augment(clips, cfg.augment, gen)
        negatives = [hard_negative(attrs[i], rng, kinds, paraphrase=paraphrased)[0]
                     for _ in range(cfg.hard_negatives) for i in idx.tolist()]
        both = encoder.encode_text([captions[i] for i in idx] + negatives)          # [(1 + H) B] true, negatives
        video = encoder.encode_video(clips)
        ids = caption_id[idx]
        same = ids[:, None] == ids[None, :]                                          # [B, B]
        scale = logit_scale.clamp(max=math.log(100.0)).exp()
        sim = scale * both.cls_embedding[:batch] @ video.pooled_embedding.T          # [B, B] text x video
        targets = same.float() / same.float().sum(dim=1, keepdim=True)
        itc = 0.5 * (-(targets * sim.log_softmax(dim=1)).sum(1).mean()
                     - (targets * sim.T.log_softmax(dim=1)).sum(1).mean())

        # one fusion pass over (2 + H + mined_video) B pairs: (text, video), H x (hard negative text, video),
        # (mined text, video) and, if enabled, (text, mined video)
        rows = torch.arange(batch)
        hard = [rows + (h + 1) * batch for h in range(cfg.hard_negatives)]
        text_rows = torch.cat([rows, *hard, _mine(sim.T, same, gen)] + ([rows] if cfg.mined_video else []))
        video_rows = torch.cat([rows] * (2 + cfg.hard_negatives) + ([_mine(sim, same, gen)] if cfg.mined_video else []))
        p = encoder.match_probability(_select(both, text_rows), _select(video, video_rows))   # [4B]
        itm = 0.5 * _bce(p[:batch], True) + 0.5 * _bce(p[batch:], False)

        loss = itc + cfg.itm_weight * itm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for key, value in (("loss", loss), ("itc", itc), ("itm", itm)):
            sums[key] += value.item()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            count = step + 1 - (history["train"][-1]["step"] if history["train"] else 0)
            record = {"step": step + 1, **{k: v / count for k, v in sums.items()},
                      "lr": scheduler.get_last_lr()[0], "temperature": 1 / scale.item()}
            history["train"].append(record)
            sums = dict.fromkeys(sums, 0.0)
            bar.set_postfix(itc=f"{record['itc']:.3f}", itm=f"{record['itm']:.3f}")
    history["seconds"] = time.perf_counter() - start
    return encoder.freeze(), history


# ----------------------------------------------------------------------------------------------- evaluation
def _axis_free(caption: str) -> str:
    """A caption with its directions reduced to their axis ("left"/"right" -> "horizontal", ...)."""
    for word, axis in (("left", "horizontal"), ("right", "horizontal"), ("up", "vertical"), ("down", "vertical")):
        caption = caption.replace(f"moving {word}", f"moving {axis}")
    return caption


def _cat_video(parts: list):
    """Concatenate VideoFeatures along the batch (frame_index / patch_position are shared)."""
    first = parts[0]
    return replace(first, **{name: torch.cat([getattr(p, name) for p in parts])
                             for name in ("pooled_embedding", "tokens", "token_embeddings")})


@torch.no_grad()
def evaluate_encoder(encoder, dataset, pool_size: int = 200, rerank_k: int = 8, batch_size: int = 128,
                     seed: int = 0) -> dict:
    """Retrieval and matching quality of ``encoder`` on a (held-out) ShapesWorld corpus.

    * **Retrieval** over a pool of up to ``pool_size`` clips with distinct canonical captions: text→video and
      video→text R@1 by ITC cosine (chance ``1/pool``), text→video R@1 after re-ranking the ITC top-``rerank_k``
      by the ITM probability (BLIP's protocol), and ``t2v_r1_axis``, which counts a retrieved clip whose caption
      differs only in the *direction* of motion as correct (the adapter cannot see frame order).
    * **Hard negatives**: for every clip and every negative kind that applies, ITM ``p(match)`` of the true caption
      vs. the perturbed one. ``itm_pair_acc/<kind>`` = share with p(true) > p(negative) (chance 0.5),
      ``itc_pair_acc/<kind>`` the same with the ITC cosine of text [CLS] and pooled video;
      ``itm_pair_acc`` pools the kinds except ``direction``; ``itm_acc`` = class-balanced accuracy of the 0.5
      threshold over all positives and the non-direction negatives.

    Returns a flat dict of floats (plus ``pool`` and per-kind counts ``count/<kind>``).
    """
    videos = torch.from_numpy(np.ascontiguousarray(dataset.with_format("numpy", dtype="uint8")[:]["video"]))
    captions = list(dataset["canonical_caption"])
    attrs = corpus_attributes(dataset)
    feats = _cat_video([encoder.encode_video(videos[s:s + batch_size].movedim(-1, -3).float() / 255.0)
                        for s in range(0, len(videos), batch_size)])

    def match(texts: list[str], rows: list[int], cosine: bool = False) -> Tensor:  # [len(texts)]
        out = []
        for s in range(0, len(texts), batch_size):
            text = encoder.encode_text(texts[s:s + batch_size])
            video = _select(feats, torch.tensor(rows[s:s + batch_size]))
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
    cos_gap = match(captions, list(range(len(captions))), cosine=True)[torch.tensor(rows)] - match(negs, rows, True)
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
    return metrics
