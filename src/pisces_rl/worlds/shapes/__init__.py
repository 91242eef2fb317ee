"""ShapesWorld: procedural captioned videos of coloured shapes, and ShapesBench, their programmatic judge.

* :mod:`.spec` -- vocabulary (shapes, palette, motions, relations), :class:`SceneSpec`, :func:`sample_scene`;
* :mod:`.render` -- :func:`render_video`: scene -> ``[F, C, H, W]`` float32 in [0, 1];
* :mod:`.captions` -- caption templates, :func:`caption_scene`, :func:`parse_prompt` -> :class:`PromptAttributes`;
* :mod:`.corpus` -- :func:`shapes_corpus` (a ``datasets.Dataset``), :func:`shapes_prompts`, train/held-out split;
* :mod:`.detect` / :mod:`.bench` -- colour segmentation, tracking and :class:`ShapesBench`.

Example::

    >>> from pisces_rl.worlds.shapes import ShapesBench, render_videos, sample_scene, caption_scene
    >>> scenes = [sample_scene((0, i)) for i in range(4)]
    >>> videos = render_videos(scenes, num_frames=9, size=32)          # [4, 9, 3, 32, 32]
    >>> result = ShapesBench().evaluate(videos, [caption_scene(s) for s in scenes])
    >>> result.total > 0.9
    True

See docs/shapesworld.md for the caption grammar and the judge's dimensions and weights.
"""
from .bench import QUALITY_DIMENSIONS, SEMANTIC_DIMENSIONS, ShapesBench, ShapesBenchResult
from .captions import (ObjectQuery, PromptAttributes, caption_from_attributes, caption_scene, parse_prompt,
                       scene_attributes)
from .corpus import caption_split, shapes_corpus, shapes_prompts, videos_to_tensor
from .detect import analyse_video
from .render import render_video, render_videos, to_uint8
from .spec import (COLOURS, MOTIONS, PALETTE, RELATIONS, SHAPES, BackgroundSpec, ObjectSpec, SceneSpec,
                   sample_scene)

__all__ = [
    "SHAPES", "COLOURS", "PALETTE", "MOTIONS", "RELATIONS", "ObjectSpec", "BackgroundSpec", "SceneSpec",
    "sample_scene", "render_video", "render_videos", "to_uint8", "ObjectQuery", "PromptAttributes",
    "scene_attributes", "caption_scene", "caption_from_attributes", "parse_prompt", "shapes_corpus",
    "shapes_prompts", "caption_split", "videos_to_tensor", "analyse_video", "ShapesBench", "ShapesBenchResult",
    "SEMANTIC_DIMENSIONS", "QUALITY_DIMENSIONS",
]
