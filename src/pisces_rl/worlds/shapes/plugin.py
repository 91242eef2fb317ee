"""What ShapesWorld provides to the core, registered through the ``pisces_rl.plugins`` entry point (setup.cfg).

* artifacts: ``model.pretrained: shapes``, ``rewards.encoder: shapes``, ``rewards.ot_map: shapes`` / ``shapes:l2``
  (directories of the active world, :func:`.store.active_world_dir`, verified against their checksums);
* prompt sources ``shapes:<split>:<n>`` (``data.prompts``, ``data.eval_source``);
* the judge ``logging.judge: shapesbench``;
* the video source ``train.video_dataset: shapes`` (the corpus clips, for direct backprop).
"""
from __future__ import annotations

from functools import partial

__all__ = ["register", "shapes_prompt_source", "shapesbench_judge"]


def shapes_prompt_source(spec: str) -> list:
    """``shapes:<split>:<n>`` -> the first ``n`` ShapesWorld prompts of ``split`` (seed 0, distinct)."""
    from .corpus import shapes_prompts

    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in ("all", "train", "heldout") or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"ShapesWorld prompt source {spec!r} must read 'shapes:<split>:<n>' with split all, train "
                         "or heldout and n >= 1, e.g. 'shapes:train:256'")
    return shapes_prompts(int(parts[2]), seed=0, split=parts[1])


def shapesbench_judge(videos, prompts) -> dict:
    """ShapesBench: Total, Quality, Semantic and every dimension, in [0, 1] (``videos[B, F, C, H, W]``)."""
    from .bench import ShapesBench

    return ShapesBench().evaluate(videos.float().cpu(), list(prompts)).metrics(prefix="")


def _shapes_videos(*args, **kwargs):
    from .video_source import shapes_video_dataset

    return shapes_video_dataset(*args, **kwargs)


def register() -> None:
    """Register every ShapesWorld name with :mod:`pisces_rl.registry` (the entry point's target)."""
    from pisces_rl import registry

    from .store import WORLD_NAMES, world_artifact

    for role, table in WORLD_NAMES.items():
        for name, artifact in table.items():
            registry.register(role, name, partial(world_artifact, artifact))
    registry.register("prompts", "shapes", shapes_prompt_source)
    registry.register("judge", "shapesbench", shapesbench_judge)
    registry.register("videos", "shapes", _shapes_videos)
