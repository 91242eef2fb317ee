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

Frame order. A per-frame image tower pooled by a mean gives a clip and its time reversal the same features, so
"moving left" and "moving right" are indistinguishable to it. With ``temporal=True`` the encoder carries a
:class:`~pisces_rl.encoders.temporal.TemporalAdapter` (frame embeddings on the visual tokens and a motion term in the
pooled token), trained with two order-sensitive negatives: *direction-flip captions* (``direction_negatives``) and
*time-reversed clips* (``reversed_negatives``: the true caption against its clip played backwards, an extra ITC
column and an extra ITM pair for every clip in which something moves).
:func:`~pisces_rl.worlds.shapes.encoder_eval.evaluate_encoder` scores both.

At the default size and budget colour, shape, count, attribute binding, motion and its direction are learned;
motion is learned late (after about 2000 steps at batch 48), and spatial relations stay near chance.

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
from .corpus import videos_to_tensor
from .spec import COLOURS, MOTIONS, RELATIONS, SHAPES

__all__ = ["ShapesEncoderConfig", "NEGATIVE_KINDS", "corpus_attributes", "moves", "hard_negative",
           "train_shapes_encoder"]


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
    steps: int = 3000            # motion and its direction are learned late (after ~2000 steps at batch 48)
    batch_size: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.02
    warmup_steps: int = 100
    itm_weight: float = 1.0       # loss = itc + itm_weight * itm
    direction_negatives: bool = True    # also train on reversed-direction captions (needs ``temporal``)
    temporal: bool = True         # a TemporalAdapter makes the features frame-order aware (module doc)
    motion_moments: bool = True   # ... with motion moments of the patch tokens in the pooled token (False: kept 0)
    reversed_negatives: bool = True     # time-reversed moving clips as ITC / ITM negatives of their caption
    augment: float = 0.5          # probability per clip of a light degradation (noise / blur / brightness)
    hard_negatives: int = 1       # hard negative captions per clip and step (ITM)
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


def moves(attrs: Sequence[PromptAttributes]) -> Tensor:
    """``[N]`` bool: True for the scenes in which some object moves (their time reversal is another scene)."""
    return torch.tensor([any(o.motion != "still" for o in a.objects) for a in attrs], dtype=torch.bool)


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


def _cat_video(parts: list):
    """Concatenate VideoFeatures along the batch (frame_index / patch_position are shared)."""
    first = parts[0]
    return replace(first, **{name: torch.cat([getattr(p, name) for p in parts])
                             for name in ("pooled_embedding", "tokens", "token_embeddings")})


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
    weights = sim.detach().float().softmax(dim=1).masked_fill(same, 0.0).cpu()
    weights[weights.sum(dim=1) <= 0] = 1.0          # every clip shares the caption: any column will do
    return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def train_shapes_encoder(dataset, cfg: ShapesEncoderConfig = ShapesEncoderConfig(), progress: bool = True,
                         device=None, generated=None, generated_itm: bool = True, clips=None):
    """Train a tiny BLIP video–text encoder on a ShapesWorld corpus.

    Args:
        dataset: a :func:`~pisces_rl.worlds.shapes.shapes_corpus` dataset (``video`` uint8 ``[F, H, W, 3]``,
            ``caption``, ``canonical_caption`` and the attribute columns).
        cfg: :class:`ShapesEncoderConfig`.
        progress: tqdm progress bar.
        device: where to train (default CPU; the world build is defined, and deterministic, on CPU).
        generated: optional uint8 ``[N, F, H, W, 3]`` clips aligned with the dataset's rows, e.g. a video model's
            sample for each caption. Each one is an extra text->video ITC column (never a target) and an ITM
            negative of its own caption, so the encoder must learn what tells a real clip from a generated one.
        generated_itm: False = generated clips are ITC columns only, and the matching head is not taught to
            reject them (so it keeps grading how well a generated clip follows its caption).
        clips: optional uint8 ``[N, F, H, W, 3]`` clips that replace the dataset's videos as the real clips (e.g.
            their round trip through the video model's VAE, so that real and generated clips share the decoder's
            look and only what the video model gets wrong tells them apart).

    Returns:
        ``(encoder, history)``: the frozen :class:`~pisces_rl.encoders.BlipVideoTextEncoder` (eval mode,
        ``num_frames=cfg.num_frames``) and ``{"train": [{"step", "loss", "itc", "itm", "lr"}...], "seconds"}``.
    """
    from tqdm.auto import tqdm

    from pisces_rl.encoders import BlipVideoTextEncoder

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {cfg.steps} and {cfg.batch_size}")
    videos = torch.from_numpy(np.ascontiguousarray(dataset.with_format("numpy", dtype="uint8")[:]["video"]))
    if clips is not None:
        clips = torch.as_tensor(np.asarray(clips))
        if clips.shape != videos.shape or clips.dtype != torch.uint8:
            raise ValueError(f"clips must be uint8 {tuple(videos.shape)} like the dataset's videos, got "
                             f"{clips.dtype} {tuple(clips.shape)}")
        videos = clips
    captions = list(dataset["caption"])
    canon = list(dataset["canonical_caption"])
    caption_id = torch.tensor([{c: i for i, c in enumerate(dict.fromkeys(canon))}[c] for c in canon])
    attrs = corpus_attributes(dataset)
    paraphrased = any(a != b for a, b in zip(captions, canon))
    kinds = NEGATIVE_KINDS if cfg.direction_negatives else NEGATIVE_KINDS[:-1]
    n = len(captions)
    batch = min(cfg.batch_size, n)
    if generated is not None:
        generated = torch.as_tensor(np.asarray(generated))
        if generated.shape != videos.shape or generated.dtype != torch.uint8:
            raise ValueError(f"generated clips must be uint8 {tuple(videos.shape)} like the dataset's videos, got "
                             f"{generated.dtype} {tuple(generated.shape)}")

    moving = moves(attrs)
    encoder = BlipVideoTextEncoder.tiny(
        seed=cfg.seed, num_frames=cfg.num_frames, temporal_frames=cfg.num_frames if cfg.temporal else None,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, initializer_range=cfg.init_range)
    encoder.to(device or "cpu").train()
    encoder.requires_grad_(True)
    if encoder.temporal is not None and not cfg.motion_moments:
        encoder.temporal.moments.requires_grad_(False)                            # stays 0: the older adapter
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=encoder.device))
    named = list(encoder.named_parameters())
    decay = [p for name, p in named if p.dim() > 1 and "embedding" not in name]
    no_decay = [p for name, p in named if not (p.dim() > 1 and "embedding" not in name)]
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
        clips = videos_to_tensor(videos[idx])                                       # [B, F, C, H, W]
        clips = _augment(clips, cfg.augment, gen).to(encoder.device)
        negatives = [hard_negative(attrs[i], rng, kinds, paraphrase=paraphrased)[0]
                     for _ in range(cfg.hard_negatives) for i in idx.tolist()]
        both = encoder.encode_text([captions[i] for i in idx] + negatives)          # [(1 + H) B] true, negatives
        states = encoder.encode_frames(clips)                                       # [B, F, 1+P, Dv]
        video = encoder.features_from_states(states)
        ids = caption_id[idx].to(encoder.device)
        same = ids[:, None] == ids[None, :]                                          # [B, B]
        scale = logit_scale.clamp(max=math.log(100.0)).exp()
        sim = scale * both.cls_embedding[:batch] @ video.pooled_embedding.T          # [B, B] text x video
        targets = same.float() / same.float().sum(dim=1, keepdim=True)
        t2v = sim
        flip = torch.nonzero(moving[idx]).squeeze(1) if cfg.reversed_negatives else torch.zeros(0, dtype=torch.long)
        if len(flip):                               # reversed clips: extra text->video columns, never a target
            reversed_video = encoder.features_from_states(states[flip.to(states.device)].flip(1))
            t2v = torch.cat([sim, scale * both.cls_embedding[:batch] @ reversed_video.pooled_embedding.T], dim=1)
        if generated is not None:                   # generated clips of the same captions: columns, never targets
            fake = videos_to_tensor(generated[idx]).to(encoder.device)
            fake_video = encoder.features_from_states(encoder.encode_frames(fake))
            t2v = torch.cat([t2v, scale * both.cls_embedding[:batch] @ fake_video.pooled_embedding.T], dim=1)
        t2v_targets = F.pad(targets, (0, t2v.shape[1] - batch))
        itc = 0.5 * (-(t2v_targets * t2v.log_softmax(dim=1)).sum(1).mean()
                     - (targets * sim.T.log_softmax(dim=1)).sum(1).mean())

        # one fusion pass over (2 + H + mined_video) B pairs: (text, video), H x (hard negative text, video),
        # (mined text, video) and, if enabled, (text, mined video)
        rows = torch.arange(batch)
        hard = [rows + (h + 1) * batch for h in range(cfg.hard_negatives)]
        text_rows = torch.cat([rows, *hard, _mine(sim.T, same, gen)] + ([rows] if cfg.mined_video else []))
        video_rows = torch.cat([rows] * (2 + cfg.hard_negatives) + ([_mine(sim, same, gen)] if cfg.mined_video else []))
        fake_itm = generated is not None and generated_itm
        fake_rows = [rows] if fake_itm else []
        texts, pairs = _select(both, torch.cat([text_rows, flip, *fake_rows])), _select(video, video_rows)
        if len(flip):                               # (caption, its clip reversed) pairs are negatives too
            pairs = _cat_video([pairs, reversed_video])
        if fake_itm:                                # (caption, a generated clip of it) pairs are negatives
            pairs = _cat_video([pairs, fake_video])
        p = encoder.match_probability(texts, pairs)                                  # [(2 + H) B + R]
        itm = 0.5 * _bce(p[:batch], True) + 0.5 * _bce(p[batch:], False)

        loss = itc + cfg.itm_weight * itm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
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
