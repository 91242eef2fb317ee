"""ShapesBench: a programmatic, VBench-style judge of ShapesWorld videos.

No learned model is involved: objects are segmented by colour and tracked (:mod:`.detect`), and
every dimension below is a score in [0, 1] (higher is better).

Semantic dimensions (scored against :func:`parse_prompt` of the prompt; a dimension the prompt
does not constrain is *not applicable* = NaN for that sample and skipped in its means):

==================  ==========================================================================
object_class        per frame, the share of the prompt's shapes seen among the video's objects
colour              per frame and named (shape, colour): is that colour on an object of that
                    shape (or, if no object has that shape, on any object)?
count               per frame, does the number of objects equal the prompt's total count?
motion_direction    per named object: share of its assigned tracks whose fitted displacement
                    (still below 8% of the frame side, else the dominant axis) is the prompt's
spatial_relation    share of the frames showing both named objects in which they stand in the
                    stated relation (right sign on the dominant axis, in frame fractions)
==================  ==========================================================================

Tracks are assigned to the named objects by one global matching that rewards the right shape and
the right colour (:func:`_assign_tracks`), so a recoloured video loses colour, not motion.

Quality dimensions (always applicable):

======================  ======================================================================
subject_consistency     per track (length-weighted): presence × shape constancy × area and
                        colour stability
temporal_flicker        1 - (mean frame-to-frame change of background pixels) / 0.1
motion_smoothness       1 - (mean |acceleration| of the objects' centroids) / (0.05 frame side)
background_cleanliness  share of background pixels within 0.12 (RGB) of the background colour
sharpness               mean edge acuity of the objects / 0.75, capped at 1
======================  ======================================================================

"Objects" are tracks present in at least half of the frames; a video without any scores 0 on
the dimensions that need one. Aggregation follows VBench: each group score is the weighted mean of
its dimension scores (all dimension weights 1 by default) and
``total = (4·quality + 1·semantic) / 5``. Set-level scores average each dimension over the samples
where it applies, then combine the dimension means; per-sample scores combine that sample's
applicable dimensions (a sample with no applicable semantic dimension gets ``total = quality``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .captions import ObjectQuery, PromptAttributes, parse_prompt
from .detect import Track, VideoAnalysis, analyse_video

__all__ = ["ShapesBench", "ShapesBenchResult", "SEMANTIC_DIMENSIONS", "QUALITY_DIMENSIONS", "track_direction"]

SEMANTIC_DIMENSIONS = ("object_class", "colour", "count", "motion_direction", "spatial_relation")
QUALITY_DIMENSIONS = ("subject_consistency", "temporal_flicker", "motion_smoothness", "background_cleanliness",
                      "sharpness")
STILL_THRESHOLD = 0.08      # displacement (frame fraction) below which an object counts as still
FLICKER_SCALE = 0.1         # mean background change that scores 0 flicker
MOTION_SCALE = 0.05         # mean centroid acceleration (frame fraction / frame^2) that scores 0
CLEAN_TOL = 0.12            # RGB distance to the background colour that still counts as clean
ACUITY_FULL = 0.75          # edge acuity that scores full sharpness
COLOUR_SCALE = 0.15         # mean colour drift of a track that scores 0 colour stability


def track_direction(track: Track, num_frames: int) -> str:
    """``left/right/up/down/still`` from the track's least-squares displacement over the clip."""
    dx, dy = track.displacement(num_frames)
    if max(abs(dx), abs(dy)) < STILL_THRESHOLD:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _assign_tracks(tracks: Sequence[Track], objs: Sequence[ObjectQuery], num_frames: int) -> list[list[Track]]:
    """Tracks for each named object by one global assignment.

    Each object asks for ``count`` tracks (when the count is unknown: as many as share its shape or
    colour, at least 1); a track scores +1 for the right shape, +1 for the right colour and a little
    for its length, and a pair needs at least one matching attribute. The global optimum keeps
    dimensions apart: after recolouring, a track still goes to the object with its shape instead of
    the one with its new colour.
    """
    def match(o: ObjectQuery, t: Track) -> int:
        return int(o.shape == t.shape) + int(o.colour == t.colour)

    out: list[list[Track]] = [[] for _ in objs]
    if not objs or not tracks:
        return out
    slots = [i for i, o in enumerate(objs)
             for _ in range(o.count or max(1, sum(match(o, t) > 0 for t in tracks)))]
    score = np.array([[match(objs[i], t) for t in tracks] for i in slots], dtype=float)
    rows, cols = linear_sum_assignment(-(score + np.array([len(t) for t in tracks]) / (100.0 * num_frames)))
    for r, c in zip(rows, cols):
        if score[r, c] >= 1:
            out[slots[r]].append(tracks[c])
    return out


def _relation_holds(a: np.ndarray, b: np.ndarray, relation: str) -> bool:
    dx, dy = b - a                                      # from object A to object B
    if relation in ("left_of", "right_of"):
        return abs(dx) >= abs(dy) and (dx > 0) == (relation == "left_of")
    return abs(dy) >= abs(dx) and (dy > 0) == (relation == "above")


def _semantic(an: VideoAnalysis, attrs: PromptAttributes) -> dict[str, float]:
    tracks = an.persistent_tracks
    frames = [[d for t in tracks for d in t.detections if d.frame == f] for f in range(an.num_frames)]
    objs = attrs.objects
    out = {k: np.nan for k in SEMANTIC_DIMENSIONS}
    shapes = sorted({o.shape for o in objs if o.shape})
    if shapes:
        out["object_class"] = float(np.mean([np.mean([any(d.shape == s for d in fr) for s in shapes])
                                             for fr in frames]))
    pairs = sorted({(o.shape, o.colour) for o in objs if o.colour}, key=str)
    if pairs:
        def colour_ok(fr, shape, colour):
            same = [d for d in fr if shape in (None, d.shape)]
            return any(d.colour == colour for d in (same or fr))
        out["colour"] = float(np.mean([np.mean([colour_ok(fr, s, c) for s, c in pairs]) for fr in frames]))
    if attrs.total_count is not None:
        out["count"] = float(np.mean([len(fr) == attrs.total_count for fr in frames]))
    assigned = _assign_tracks(tracks, objs, an.num_frames)
    if any(o.motion for o in objs):
        scores = [np.mean([track_direction(t, an.num_frames) == o.motion for t in matched]) if matched else 0.0
                  for o, matched in zip(objs, assigned) if o.motion]
        out["motion_direction"] = float(np.mean(scores))
    if attrs.relation is not None and len(objs) >= 2:
        ta, tb = assigned[0], assigned[1]
        score = 0.0
        if ta and tb:
            pa = {d.frame: np.array([d.cx, d.cy]) for d in ta[0].detections}   # frame fractions
            pb = {d.frame: np.array([d.cx, d.cy]) for d in tb[0].detections}
            common = sorted(set(pa) & set(pb))
            if common:
                score = float(np.mean([_relation_holds(pa[f], pb[f], attrs.relation) for f in common]))
        out["spatial_relation"] = score
    return out


def _quality(an: VideoAnalysis, video: np.ndarray) -> dict[str, float]:
    frames = np.moveaxis(video, 1, -1)                                   # [F, H, W, 3]
    side = min(an.height, an.width)
    out = {}
    # subject consistency over every track that links at least two frames
    linked = [t for t in an.tracks if len(t) >= 2]
    if linked:
        scores, weights = [], []
        for t in linked:
            areas = np.array([d.area for d in t.detections])
            rgbs = np.stack([d.rgb for d in t.detections])
            shape_const = np.mean([d.shape == t.shape for d in t.detections])
            area_stab = max(0.0, 1.0 - areas.std() / max(areas.mean(), 1e-9))
            colour_stab = max(0.0, 1.0 - np.linalg.norm(rgbs - rgbs.mean(0), axis=-1).mean() / COLOUR_SCALE)
            scores.append(len(t) / an.num_frames * shape_const * area_stab * colour_stab)
            weights.append(len(t))
        out["subject_consistency"] = float(np.average(scores, weights=weights))
    else:
        out["subject_consistency"] = 0.0
    # flicker: frame-to-frame change on pixels that are background in both frames
    grown = np.stack([ndimage.binary_dilation(m, iterations=1) for m in an.foreground])
    changes = []
    for f in range(an.num_frames - 1):
        keep = ~(grown[f] | grown[f + 1])
        if keep.any():
            changes.append(np.abs(frames[f + 1][keep] - frames[f][keep]).mean())
    out["temporal_flicker"] = float(np.clip(1.0 - np.mean(changes) / FLICKER_SCALE, 0, 1)) if changes else 0.0
    # motion smoothness of the objects' trajectories
    accs = []
    for t in an.persistent_tracks:
        fr, p = t.frames, t.positions * np.array([an.width, an.height]) / side
        for i in range(1, len(fr) - 1):
            if fr[i + 1] - fr[i] == 1 and fr[i] - fr[i - 1] == 1:
                accs.append(np.linalg.norm(p[i + 1] - 2 * p[i] + p[i - 1]))
    out["motion_smoothness"] = float(np.clip(1.0 - np.mean(accs) / MOTION_SCALE, 0, 1)) if accs else 0.0
    # background cleanliness: background pixels (outside the objects) close to the background colour
    clean = []
    objects = [[d for t in an.persistent_tracks for d in t.detections if d.frame == f] for f in range(an.num_frames)]
    for f in range(an.num_frames):
        mask = np.zeros((an.height, an.width), bool)
        for d in objects[f]:
            mask |= d.mask
        bgpix = ~ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=1)
        dist = np.linalg.norm(frames[f][bgpix] - an.background[f], axis=-1)
        clean.append(float((dist < CLEAN_TOL).mean()) if dist.size else 0.0)
    out["background_cleanliness"] = float(np.mean(clean))
    acuity = [d.acuity for fr in objects for d in fr]
    out["sharpness"] = float(np.clip(np.mean(acuity) / ACUITY_FULL, 0, 1)) if acuity else 0.0
    return out


def _weighted(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    vals = [(values[k], w) for k, w in weights.items() if not np.isnan(values[k]) and w > 0]
    if not vals:
        return float("nan")
    return float(sum(v * w for v, w in vals) / sum(w for _, w in vals))


@dataclass
class ShapesBenchResult:
    """Scores of a batch. Per-sample arrays are ``[B]`` with NaN where a dimension does not apply.

    Attributes:
        prompts: the prompts, in batch order.
        per_sample: ``{dimension: [B]}`` for every semantic and quality dimension.
        dimensions: ``{dimension: mean over applicable samples}`` (NaN if none applies).
        quality, semantic, total: set-level scores (weighted means of the dimension means).
        sample_quality, sample_semantic, sample_total: the same per sample, ``[B]``.
        weights: ``{"quality": wq, "semantic": ws, <dimension>: w, ...}`` used.
    """

    prompts: list[str]
    per_sample: dict[str, np.ndarray]
    dimensions: dict[str, float]
    quality: float
    semantic: float
    total: float
    sample_quality: np.ndarray
    sample_semantic: np.ndarray
    sample_total: np.ndarray
    weights: dict[str, float]

    def to_dict(self, per_sample: bool = False) -> dict:
        """Plain-Python summary (JSON-ready; NaN stays NaN). ``per_sample=True`` adds the ``[B]`` lists."""
        out = {"total": self.total, "quality": self.quality, "semantic": self.semantic,
               "dimensions": dict(self.dimensions), "num_samples": len(self.prompts), "weights": dict(self.weights)}
        if per_sample:
            out["per_sample"] = {k: v.tolist() for k, v in self.per_sample.items()}
            out["per_sample"].update(total=self.sample_total.tolist(), quality=self.sample_quality.tolist(),
                                     semantic=self.sample_semantic.tolist(), prompt=list(self.prompts))
        return out

    def metrics(self, prefix: str = "shapesbench/") -> dict[str, float]:
        """Flat ``{prefix + name: float}`` for loggers (totals and every dimension mean)."""
        flat = {"total": self.total, "quality": self.quality, "semantic": self.semantic, **self.dimensions}
        return {prefix + k: float(v) for k, v in flat.items()}

    def format_table(self) -> str:
        """A VBench-like text table of the set-level scores in percent."""
        lines = [f"{'dimension':<24}{'group':<10}{'weight':>7}{'score %':>10}{'n':>6}", "-" * 57]
        for group, dims in (("semantic", SEMANTIC_DIMENSIONS), ("quality", QUALITY_DIMENSIONS)):
            for d in dims:
                n = int(np.sum(~np.isnan(self.per_sample[d])))
                score = "n/a" if np.isnan(self.dimensions[d]) else f"{100 * self.dimensions[d]:.2f}"
                lines.append(f"{d:<24}{group:<10}{self.weights[d]:>7.2f}{score:>10}{n:>6}")
        lines.append("-" * 57)
        for name in ("quality", "semantic", "total"):
            value = getattr(self, name)
            weight = f"{self.weights[name]:>7.2f}" if name != "total" else " " * 7
            lines.append(f"{name.upper():<34}{weight}{'n/a' if np.isnan(value) else f'{100 * value:.2f}':>10}")
        return "\n".join(lines)


class ShapesBench:
    """Programmatic judge for ShapesWorld videos (see the module docstring for the dimensions).

    Args:
        quality_weight, semantic_weight: group weights of ``total`` (VBench: 4 and 1).
        dimension_weights: optional per-dimension weights within their group (default 1 each; 0
            drops a dimension).

    Example::

        >>> from pisces_rl.worlds.shapes import caption_scene, render_videos, sample_scene
        >>> scenes = [sample_scene(i) for i in range(2)]
        >>> videos = render_videos(scenes, num_frames=9, size=32)    # [B, F, C, H, W] in [0, 1]
        >>> result = ShapesBench().evaluate(videos, [caption_scene(s) for s in scenes])
        >>> round(result.dimensions["colour"], 2), result.total > 0.9
        (1.0, True)
    """

    def __init__(self, quality_weight: float = 4.0, semantic_weight: float = 1.0,
                 dimension_weights: Optional[Mapping[str, float]] = None):
        weights = {d: 1.0 for d in SEMANTIC_DIMENSIONS + QUALITY_DIMENSIONS}
        for k, v in (dimension_weights or {}).items():
            if k not in weights:
                raise ValueError(f"unknown ShapesBench dimension {k!r}; choose from {sorted(weights)}")
            if v < 0:
                raise ValueError(f"dimension weight {k}={v} must be >= 0")
            weights[k] = float(v)
        if quality_weight < 0 or semantic_weight < 0 or quality_weight + semantic_weight <= 0:
            raise ValueError("quality_weight and semantic_weight must be >= 0 with a positive sum")
        self.weights = {"quality": float(quality_weight), "semantic": float(semantic_weight), **weights}

    @staticmethod
    def _check(videos, prompts) -> np.ndarray:
        if hasattr(videos, "detach"):
            videos = videos.detach().to("cpu").float().numpy()
        videos = np.asarray(videos, dtype=np.float32)
        if videos.ndim != 5 or videos.shape[2] != 3:
            hint = " (this looks channels-last: permute to [B, F, C, H, W])" if videos.ndim == 5 and \
                videos.shape[-1] == 3 else ""
            raise ValueError(f"ShapesBench expects videos [B, F, C=3, H, W], got shape {videos.shape}{hint}")
        b, f, _, h, w = videos.shape
        if f < 3:
            raise ValueError(f"ShapesBench needs at least 3 frames to judge motion, got {f}")
        if min(h, w) < 16:
            raise ValueError(f"ShapesBench needs frames of at least 16x16 pixels, got {h}x{w}")
        if not np.isfinite(videos).all():
            raise ValueError("videos contain NaN or inf; check the decoder output")
        lo, hi = float(videos.min()), float(videos.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"videos must lie in [0, 1] (got min {lo:.3f}, max {hi:.3f}); map [-1, 1] outputs "
                             "with (x + 1) / 2 and clamp(0, 1)")
        if isinstance(prompts, str) or len(prompts) != b or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of {b} strings (one per video)")
        return np.clip(videos, 0.0, 1.0)

    def score_video(self, video: np.ndarray, prompt: str) -> dict[str, float]:
        """All dimensions for one video ``[F, C=3, H, W]`` in [0, 1] (NaN = not applicable)."""
        analysis = analyse_video(video)
        return {**_semantic(analysis, parse_prompt(prompt)), **_quality(analysis, np.asarray(video, np.float32))}

    def evaluate(self, videos, prompts: Sequence[str]) -> ShapesBenchResult:
        """Judge a batch.

        Args:
            videos: ``[B, F, C=3, H, W]`` float in [0, 1] (torch tensor or numpy), F >= 3, H, W >= 16.
            prompts: ``B`` prompts; ShapesWorld captions get every applicable semantic dimension,
                free text only those :func:`parse_prompt` can read.

        Returns:
            :class:`ShapesBenchResult`.
        """
        videos = self._check(videos, prompts)
        rows = [self.score_video(v, p) for v, p in zip(videos, prompts)]
        dims = SEMANTIC_DIMENSIONS + QUALITY_DIMENSIONS
        per_sample = {d: np.array([r[d] for r in rows], dtype=np.float64) for d in dims}
        with np.errstate(all="ignore"):
            means = {d: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan") for d, v in per_sample.items()}
        sem_w = {d: self.weights[d] for d in SEMANTIC_DIMENSIONS}
        qual_w = {d: self.weights[d] for d in QUALITY_DIMENSIONS}
        quality, semantic = _weighted(means, qual_w), _weighted(means, sem_w)
        s_quality = np.array([_weighted(r, qual_w) for r in rows])
        s_semantic = np.array([_weighted(r, sem_w) for r in rows])
        return ShapesBenchResult(
            prompts=list(prompts), per_sample=per_sample, dimensions=means, quality=quality, semantic=semantic,
            total=self._combine(quality, semantic), sample_quality=s_quality, sample_semantic=s_semantic,
            sample_total=np.array([self._combine(q, s) for q, s in zip(s_quality, s_semantic)]),
            weights=dict(self.weights))

    def _combine(self, quality: float, semantic: float) -> float:
        parts = [(quality, self.weights["quality"]), (semantic, self.weights["semantic"])]
        parts = [(v, w) for v, w in parts if not np.isnan(v) and w > 0]
        return float(sum(v * w for v, w in parts) / sum(w for _, w in parts)) if parts else float("nan")
