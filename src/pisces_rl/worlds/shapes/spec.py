"""ShapesWorld vocabulary, scene dataclasses and the seeded scene sampler.

A scene is resolution-free: positions and sizes are fractions of the frame side, and each object's
motion is a displacement over the *whole clip*, so the same :class:`SceneSpec` renders to 9 or 17
frames, 32x32 or 48x48 pixels (see :mod:`.render`). Image coordinates: ``x`` grows to the right,
``y`` grows *downwards*, so "up" means decreasing ``y``.

Scene kinds (each has one caption template, see :mod:`.captions`):

* ``"group"``    -- 1 to 3 identical objects (same shape and colour) sharing one motion;
* ``"relation"`` -- two different objects in a spatial relation (left of / right of / above /
  below), sharing one motion, so the relation holds in every frame;
* ``"pair"``     -- two different objects, each with its own motion.

Example::

    >>> spec = sample_scene(seed=3)
    >>> spec.kind, [o.shape for o in spec.objects]        # doctest: +SKIP
    ('relation', ['circle', 'triangle'])
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

__all__ = [
    "SHAPES", "PALETTE", "COLOURS", "MOTIONS", "RELATIONS", "MOTION_VECTORS", "SCENE_KINDS",
    "ObjectSpec", "BackgroundSpec", "SceneSpec", "sample_scene", "make_rng",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Object shapes. Triangles are isosceles and point up; squares are axis-aligned."""

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.70, 0.20, 0.85),
    "cyan": (0.15, 0.85, 0.85),
}
"""Object colours as RGB in [0, 1]; pairwise Euclidean distance >= 0.55, far from the dark backgrounds."""

COLOURS: tuple[str, ...] = tuple(PALETTE)
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
SCENE_KINDS: tuple[str, ...] = ("group", "relation", "pair")

MOTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0),
}
"""Unit (dx, dy) of each motion in image coordinates (y grows downwards)."""

# Sampling ranges, all as fractions of the frame side.
SIZE_RANGE = (0.10, 0.13)          # half-extent (circle radius, half the square side)
TRAVEL_RANGE = (0.25, 0.35)        # displacement over the whole clip for a moving object
MARGIN = 0.03                      # free space kept between objects and the frame border
GAP = 0.06                         # minimum free space between two objects
BACKGROUND_LEVEL = (0.06, 0.24)    # grey level of the background
TEXTURE_AMPLITUDE = (0.01, 0.035)  # peak deviation of the static texture (when textured)


@dataclass(frozen=True)
class ObjectSpec:
    """One object: what it is, where it starts and where it goes.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        x, y: centre at the first frame, fractions of the frame width / height.
        size: half-extent as a fraction of the frame side (circle radius, half the square side,
            half the triangle's base and height).
        motion: one of :data:`MOTIONS`.
        dx, dy: displacement from the first to the last frame (fractions of the frame side).
        rgb: the exact rendered colour (the palette colour plus a small jitter).
    """

    shape: str
    colour: str
    x: float
    y: float
    size: float
    motion: str
    dx: float = 0.0
    dy: float = 0.0
    rgb: Optional[tuple[float, float, float]] = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {SHAPES}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; use one of {COLOURS}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; use one of {MOTIONS}")
        if not 0.0 < self.size < 0.5:
            raise ValueError(f"size is a half-extent in (0, 0.5) of the frame side, got {self.size}")

    @property
    def colour_rgb(self) -> tuple[float, float, float]:
        """The colour the renderer paints (``rgb`` if set, else the palette colour)."""
        return self.rgb if self.rgb is not None else PALETTE[self.colour]

    def position(self, t: float) -> tuple[float, float]:
        """Centre at clip time ``t`` in [0, 1] (0 = first frame, 1 = last frame)."""
        return self.x + self.dx * t, self.y + self.dy * t


@dataclass(frozen=True)
class BackgroundSpec:
    """A dark, near-grey background, optionally with a static low-frequency texture.

    Attributes:
        rgb: base colour in [0, 1].
        texture: peak amplitude of the texture (0 = plain).
        texture_seed: seed of the texture pattern (the texture is the same in every frame).
    """

    rgb: tuple[float, float, float] = (0.15, 0.15, 0.15)
    texture: float = 0.0
    texture_seed: int = 0


@dataclass(frozen=True)
class SceneSpec:
    """A full scene: its kind, objects (one entry per object instance) and background.

    ``relation`` (for kind ``"relation"``) says where ``objects[0]`` is relative to ``objects[1]``.
    """

    kind: str
    objects: tuple[ObjectSpec, ...]
    background: BackgroundSpec = field(default_factory=BackgroundSpec)
    relation: Optional[str] = None

    def __post_init__(self):
        if self.kind not in SCENE_KINDS:
            raise ValueError(f"unknown scene kind {self.kind!r}; use one of {SCENE_KINDS}")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1 to 3 objects, got {len(self.objects)}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; use one of {RELATIONS}")
        if (self.kind == "relation") != (self.relation is not None):
            raise ValueError("kind 'relation' needs a relation, and only it may have one")

    def to_json(self) -> str:
        """Serialise to a JSON string (inverse: :meth:`from_json`)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SceneSpec":
        d = json.loads(text)
        objs = tuple(ObjectSpec(**{**o, "rgb": tuple(o["rgb"]) if o.get("rgb") else None}) for o in d["objects"])
        bg = BackgroundSpec(**{**d["background"], "rgb": tuple(d["background"]["rgb"])})
        return cls(kind=d["kind"], objects=objs, background=bg, relation=d.get("relation"))


def make_rng(seed: Union[int, Sequence[int], np.random.Generator, None]) -> np.random.Generator:
    """A numpy Generator from an int, a tuple of ints (hashed by SeedSequence) or a Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise ValueError("ShapesWorld sampling needs an explicit seed (int or tuple of ints) to stay deterministic")
    entropy = int(seed) if isinstance(seed, (int, np.integer)) else [int(v) for v in seed]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _choice(rng: np.random.Generator, options: Sequence, p: Optional[Sequence[float]] = None):
    return options[int(rng.choice(len(options), p=p))]


def _displacement(rng: np.random.Generator, motion: str) -> tuple[float, float]:
    ux, uy = MOTION_VECTORS[motion]
    travel = rng.uniform(*TRAVEL_RANGE) if motion != "still" else 0.0
    return ux * travel, uy * travel


def _place(rng, sizes, moves, relation=None, shared=True, tries=400):
    """Sample start centres for objects of half-extents ``sizes`` and displacements ``moves``.

    Every object stays inside the frame for the whole clip; the objects' bounding boxes stay at
    least ``GAP`` apart (checked at the start when the motion is shared, at 17 instants otherwise).
    Returns None if no layout was found.
    """
    ts = np.array([0.0]) if shared else np.linspace(0.0, 1.0, 17)
    for _ in range(tries):
        centres = []
        for h, (dx, dy) in zip(sizes, moves):
            lo_x, hi_x = h + MARGIN - min(dx, 0.0), 1.0 - h - MARGIN - max(dx, 0.0)
            lo_y, hi_y = h + MARGIN - min(dy, 0.0), 1.0 - h - MARGIN - max(dy, 0.0)
            if lo_x > hi_x or lo_y > hi_y:
                return None
            centres.append((rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)))
        ok = True
        for i in range(len(sizes)):
            for j in range(i + 1, len(sizes)):
                pi = np.array(centres[i])[None] + np.outer(ts, moves[i])
                pj = np.array(centres[j])[None] + np.outer(ts, moves[j])
                if np.min(np.abs(pi - pj).max(axis=1)) < sizes[i] + sizes[j] + GAP:   # bounding boxes apart
                    ok = False
        if ok and relation is not None:
            (xa, ya), (xb, yb) = centres
            ddx, ddy = xb - xa, yb - ya          # vector from object A to object B
            need = {"left_of": ddx, "right_of": -ddx, "above": ddy, "below": -ddy}[relation]
            other = abs(ddy) if relation in ("left_of", "right_of") else abs(ddx)
            ok = need > 0 and need >= 1.5 * other
        if ok:
            return centres
    return None


def _jitter_rgb(rng, colour, amount=0.04) -> tuple[float, float, float]:
    base = np.array(PALETTE[colour]) + rng.uniform(-amount, amount, size=3)
    return tuple(float(v) for v in np.clip(base, 0.0, 1.0))


def _background(rng) -> BackgroundSpec:
    level = rng.uniform(*BACKGROUND_LEVEL)
    rgb = tuple(float(v) for v in np.clip(level + rng.uniform(-0.02, 0.02, size=3), 0.0, 1.0))
    texture = float(rng.uniform(*TEXTURE_AMPLITUDE)) if rng.random() < 0.5 else 0.0
    return BackgroundSpec(rgb=rgb, texture=texture, texture_seed=int(rng.integers(2**31)))


def _distinct_objects(rng) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two (shape, colour) pairs that differ in shape, colour or both."""
    a = (_choice(rng, SHAPES), _choice(rng, COLOURS))
    while True:
        b = (_choice(rng, SHAPES), _choice(rng, COLOURS))
        if b != a:
            return a, b


def _try_scene(rng, kind: str) -> Optional[SceneSpec]:
    if kind == "group":
        n = int(_choice(rng, (1, 2, 3), p=(0.4, 0.3, 0.3)))
        shape, colour, motion = _choice(rng, SHAPES), _choice(rng, COLOURS), _choice(rng, MOTIONS)
        size, move = rng.uniform(*SIZE_RANGE), _displacement(rng, motion)
        types, motions, sizes, moves, relation = [(shape, colour)] * n, [motion] * n, [size] * n, [move] * n, None
    elif kind == "relation":
        types, relation, motion = list(_distinct_objects(rng)), _choice(rng, RELATIONS), _choice(rng, MOTIONS)
        move = _displacement(rng, motion)
        motions, sizes, moves = [motion] * 2, [rng.uniform(*SIZE_RANGE) for _ in range(2)], [move] * 2
    else:
        types, relation = list(_distinct_objects(rng)), None
        motions = [_choice(rng, MOTIONS) for _ in range(2)]
        sizes, moves = [rng.uniform(*SIZE_RANGE) for _ in range(2)], [_displacement(rng, m) for m in motions]
    shared = kind != "pair" or motions[0] == motions[1] and moves[0] == moves[1]
    centres = _place(rng, sizes, moves, relation=relation, shared=shared)
    if centres is None:
        return None
    objects = tuple(
        ObjectSpec(shape=s, colour=c, x=float(x), y=float(y), size=float(h), motion=m,
                   dx=float(mx), dy=float(my), rgb=_jitter_rgb(rng, c))
        for (s, c), (x, y), h, m, (mx, my) in zip(types, centres, sizes, motions, moves)
    )
    return SceneSpec(kind=kind, objects=objects, background=_background(rng), relation=relation)


def sample_scene(seed: Union[int, Sequence[int], np.random.Generator],
                 kind_probs: Sequence[float] = (0.4, 0.35, 0.25)) -> SceneSpec:
    """Sample a scene deterministically from ``seed``.

    Args:
        seed: an int, a tuple of ints (e.g. ``(corpus_seed, index)``) or a numpy Generator.
        kind_probs: probabilities of the kinds ``("group", "relation", "pair")``.

    Returns:
        A :class:`SceneSpec` whose objects stay inside the frame and never overlap.
    """
    if len(kind_probs) != len(SCENE_KINDS) or min(kind_probs) < 0 or not np.isclose(sum(kind_probs), 1.0):
        raise ValueError(f"kind_probs must be {len(SCENE_KINDS)} non-negative numbers summing to 1 "
                         f"(for {SCENE_KINDS}), got {tuple(kind_probs)}")
    rng = make_rng(seed)
    kind = _choice(rng, SCENE_KINDS, p=kind_probs)
    for _ in range(100):
        scene = _try_scene(rng, kind)
        if scene is not None:
            return scene
    raise RuntimeError("could not place the objects of a scene in 100 attempts")  # not reached in practice
