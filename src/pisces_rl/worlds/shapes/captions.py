"""Caption templates for ShapesWorld scenes and the prompt parser that inverts them.

Grammar (canonical form; ``paraphrase=True`` swaps in the synonyms listed below)::

    caption  := group | relation | pair
    group    := NP(n) " " MOTION                          "two red squares moving left"
    relation := NP(1) " " REL " " NP(1) ", both " MOTION  "a blue circle to the left of a yellow triangle, both staying still"
    pair     := NP(1) " " MOTION " and " NP(1) " " MOTION "a red circle moving up and a green square moving right"
    NP(n)    := ("a" | "two" | "three") " " COLOUR " " SHAPE ["s" if n > 1]
    MOTION   := "moving " ("left" | "right" | "up" | "down") | "staying still"
    REL      := "to the left of" | "to the right of" | "above" | "below"

Synonyms the parser also understands: verbs ``sliding / drifting / going / moves ...``, ``to the left``,
``leftwards``; still as ``standing still / not moving / static / stationary / motionless``; relations
``left of``, ``over``, ``on top of``, ``under``, ``beneath``; counts ``an / one / 1 / 2 / 3``.

:func:`parse_prompt` reads any text: every noun phrase naming a shape becomes an
:class:`ObjectQuery` whose unknown fields stay ``None`` (e.g. "an orange square" has no palette
colour, "squares" has no count). A motion applies to the nearest object named before it, or to all
objects when written after "both"/"all"/"together". ``strict=True`` raises ``ValueError`` unless
every object has shape, colour, count and motion.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .spec import COLOURS, SHAPES, SceneSpec

__all__ = ["ObjectQuery", "PromptAttributes", "scene_attributes", "caption_from_attributes",
           "caption_scene", "parse_prompt"]

NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
RELATION_PHRASES = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
_MOVE_VERBS = ("moving", "sliding", "drifting")
_STILL_PHRASES = ("staying still", "standing still", "not moving")
_RELATION_SYNONYMS = {"left_of": ("to the left of", "left of"), "right_of": ("to the right of", "right of"),
                      "above": ("above", "over"), "below": ("below", "under")}


@dataclass(frozen=True)
class ObjectQuery:
    """What a prompt says about one kind of object; ``None`` = not said."""

    shape: Optional[str] = None
    colour: Optional[str] = None
    count: Optional[int] = None
    motion: Optional[str] = None

    @property
    def complete(self) -> bool:
        return None not in (self.shape, self.colour, self.count, self.motion)


@dataclass(frozen=True)
class PromptAttributes:
    """Structured content of a prompt.

    Attributes:
        objects: one :class:`ObjectQuery` per noun phrase, in reading order.
        relation: where ``objects[0]`` is relative to ``objects[1]`` (one of ``RELATIONS``), or None.
        text: the parsed text (ignored by ``==``).
    """

    objects: tuple[ObjectQuery, ...] = ()
    relation: Optional[str] = None
    text: str = field(default="", compare=False)

    @property
    def complete(self) -> bool:
        """True when there is at least one object and every object field is known."""
        return bool(self.objects) and all(o.complete for o in self.objects)

    @property
    def total_count(self) -> Optional[int]:
        """Total number of objects the prompt asks for (None if any count is unknown or no objects)."""
        if not self.objects or any(o.count is None for o in self.objects):
            return None
        return sum(o.count for o in self.objects)


def scene_attributes(scene: SceneSpec) -> PromptAttributes:
    """The attributes a caption of ``scene`` states (the ground truth for the parser and the judge)."""
    if scene.kind == "group":
        o = scene.objects[0]
        objects = (ObjectQuery(o.shape, o.colour, len(scene.objects), o.motion),)
    else:
        objects = tuple(ObjectQuery(o.shape, o.colour, 1, o.motion) for o in scene.objects)
    return PromptAttributes(objects=objects, relation=scene.relation)


def _noun_phrase(q: ObjectQuery) -> str:
    return f"{NUMBER_WORDS[q.count]} {q.colour} {q.shape}{'s' if q.count > 1 else ''}"


def _motion_phrase(motion: str, rng: Optional[np.random.Generator]) -> str:
    if motion == "still":
        return _STILL_PHRASES[int(rng.integers(len(_STILL_PHRASES)))] if rng is not None else _STILL_PHRASES[0]
    verb = _MOVE_VERBS[int(rng.integers(len(_MOVE_VERBS)))] if rng is not None else _MOVE_VERBS[0]
    return f"{verb} {motion}"


def caption_from_attributes(attrs: PromptAttributes, rng: Optional[np.random.Generator] = None) -> str:
    """Render complete attributes with the grammar above (canonical when ``rng`` is None, else paraphrased).

    Raises:
        ValueError: if an attribute is missing or the structure is outside the grammar.
    """
    if not attrs.complete:
        raise ValueError(f"cannot caption incomplete attributes {attrs}; every object needs shape, colour, "
                         "count and motion")
    objs = attrs.objects
    if len(objs) == 1 and attrs.relation is None and 1 <= objs[0].count <= 3:
        return f"{_noun_phrase(objs[0])} {_motion_phrase(objs[0].motion, rng)}"
    if len(objs) == 2 and all(o.count == 1 for o in objs):
        a, b = _noun_phrase(objs[0]), _noun_phrase(objs[1])
        if attrs.relation is not None:
            if objs[0].motion != objs[1].motion:
                raise ValueError("a relation caption needs both objects to share one motion")
            options = _RELATION_SYNONYMS[attrs.relation]
            rel = options[int(rng.integers(len(options)))] if rng is not None else RELATION_PHRASES[attrs.relation]
            return f"{a} {rel} {b}, both {_motion_phrase(objs[0].motion, rng)}"
        return f"{a} {_motion_phrase(objs[0].motion, rng)} and {b} {_motion_phrase(objs[1].motion, rng)}"
    raise ValueError(f"attributes {attrs} are outside the caption grammar (one group of 1-3 objects, "
                     "or two single objects)")


def caption_scene(scene: SceneSpec, rng: Optional[np.random.Generator] = None) -> str:
    """Caption of ``scene``; canonical (deterministic) without ``rng``, a seeded paraphrase with one."""
    return caption_from_attributes(scene_attributes(scene), rng)


# ----------------------------------------------------------------------------------------------- parser
_NUM = {"a": 1, "an": 1, "one": 1, "single": 1, "1": 1, "two": 2, "2": 2, "pair of": 2, "three": 3, "3": 3}
_NP_RE = re.compile(
    r"\b(?:(?P<num>an?|one|single|two|three|pair of|[123])\s+)?(?:(?P<colour>" + "|".join(COLOURS)
    + r")\s+)?(?P<shape>" + "|".join(SHAPES) + r")(?P<plural>s)?\b")
_DIR = {"left": "left", "leftward": "left", "leftwards": "left", "right": "right", "rightward": "right",
        "rightwards": "right", "up": "up", "upward": "up", "upwards": "up", "down": "down",
        "downward": "down", "downwards": "down"}
_MOTION_RE = re.compile(
    r"\b(?:(?:mov(?:ing|es?)|slid(?:ing|es?)|drift(?:ing|s)?|go(?:ing|es)?|travel(?:l?ing|s)?|head(?:ing|s)?)"
    r"\s+(?:to\s+the\s+|towards?\s+the\s+)?(?P<dir>left|right|up|down)(?:wards?)?"
    r"|(?P<adv>leftwards?|rightwards?|upwards?|downwards?))\b(?!\s+of\b)"
    r"|\b(?P<still>standing still|staying still|not moving|still|static|stationary|motionless)\b")
_SHARED_RE = re.compile(r"\b(both|all|together)\W*$")
_REL_RE = re.compile(r"\b(?P<rel>to the left of|left of|to the right of|right of|above|over|on top of|"
                     r"below|under|underneath|beneath)\b")
_REL_CANON = {"to the left of": "left_of", "left of": "left_of", "to the right of": "right_of",
              "right of": "right_of", "above": "above", "over": "above", "on top of": "above",
              "below": "below", "under": "below", "underneath": "below", "beneath": "below"}


def _motion_of(m: re.Match) -> str:
    if m.group("still"):
        return "still"
    return _DIR[(m.group("dir") or m.group("adv")).lower()]


def parse_prompt(text: str, strict: bool = False) -> PromptAttributes:
    """Parse a prompt into :class:`PromptAttributes` (inverts :func:`caption_scene`, paraphrases included).

    Args:
        text: any prompt.
        strict: raise instead of returning partial attributes.

    Returns:
        The attributes found; ``PromptAttributes(objects=())`` for text that names no shape.

    Raises:
        TypeError: if ``text`` is not a string.
        ValueError: in strict mode, when an object lacks shape, colour, count or motion, or no object
            is named at all.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt expects a string, got {type(text).__name__}")
    low = " ".join(text.lower().replace("-", " ").split())
    nps = list(_NP_RE.finditer(low))
    motions: list[Optional[str]] = [None] * len(nps)
    for m in _MOTION_RE.finditer(low):
        before = [i for i, np_ in enumerate(nps) if np_.end() <= m.start()]
        between_start = nps[before[-1]].end() if before else 0
        if _SHARED_RE.search(low[between_start:m.start()]) or not before:
            targets = range(len(nps))
        else:
            targets = [before[-1]]
        for i in targets:
            if motions[i] is None:
                motions[i] = _motion_of(m)
    objects = []
    for np_, motion in zip(nps, motions):
        num = np_.group("num")
        count = _NUM[num] if num else (None if np_.group("plural") else 1)
        objects.append(ObjectQuery(shape=np_.group("shape"), colour=np_.group("colour"), count=count, motion=motion))
    relation = None
    if len(nps) >= 2:
        rel = _REL_RE.search(low, nps[0].end(), nps[1].start())
        if rel is not None:
            relation = _REL_CANON[rel.group("rel")]
    attrs = PromptAttributes(objects=tuple(objects), relation=relation, text=text)
    if strict and not attrs.complete:
        missing = "no shape (circle/square/triangle) is named" if not objects else \
            "; ".join(f"object {i} ({o.shape}) lacks " + ", ".join(k for k in ("colour", "count", "motion")
                                                                  if getattr(o, k) is None)
                      for i, o in enumerate(objects) if not o.complete)
        raise ValueError(f"prompt {text!r} is outside the ShapesWorld grammar: {missing}. Use e.g. "
                         "'two red squares moving left' (colours: " + ", ".join(COLOURS) + ")")
    return attrs
