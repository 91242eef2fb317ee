"""ShapesBench: near-perfect scores on real ShapesWorld videos, clear drops on matching corruptions."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from pisces_rl.worlds.shapes import (QUALITY_DIMENSIONS, SEMANTIC_DIMENSIONS, ObjectSpec, SceneSpec, ShapesBench,
                                     caption_scene, render_video, render_videos, sample_scene)
from pisces_rl.worlds.shapes.render import render_background

B, F, S = 16, 8, 32


@pytest.fixture(scope="module")
def world():
    scenes = [sample_scene((2024, i)) for i in range(B)]
    videos = render_videos(scenes, num_frames=F, size=S)                 # [B, F, C, H, W]
    return scenes, videos, [caption_scene(s) for s in scenes]


@pytest.fixture(scope="module")
def bench():
    return ShapesBench()


@pytest.fixture(scope="module")
def clean(world, bench):
    _, videos, prompts = world
    return bench.evaluate(videos, prompts)


def test_clean_videos_score_near_perfect(clean):
    for dim in SEMANTIC_DIMENSIONS:
        assert clean.dimensions[dim] >= 0.95, (dim, clean.dimensions[dim])
    for dim in QUALITY_DIMENSIONS:
        assert clean.dimensions[dim] >= 0.9, (dim, clean.dimensions[dim])
    assert clean.total >= 0.95 and np.all(clean.sample_total >= 0.9)
    assert np.isclose(clean.total, (4 * clean.quality + clean.semantic) / 5)


def test_recolouring_drops_colour_only(world, bench, clean):
    _, videos, prompts = world
    recoloured = videos[:, :, [2, 0, 1]]                 # RGB roll: every palette colour becomes another one
    r = bench.evaluate(recoloured, prompts)
    assert r.dimensions["colour"] <= 0.2
    assert r.dimensions["object_class"] >= 0.95 and r.dimensions["count"] >= 0.95
    assert r.quality >= clean.quality - 0.02


def test_reversed_time_drops_motion_direction(world, bench):
    scenes, videos, prompts = world
    moving = [i for i, s in enumerate(scenes) if all(o.motion != "still" for o in s.objects)]
    assert len(moving) >= 4
    fwd = bench.evaluate(videos[moving], [prompts[i] for i in moving])
    rev = bench.evaluate(videos[moving][:, ::-1].copy(), [prompts[i] for i in moving])
    assert fwd.dimensions["motion_direction"] >= 0.95 and rev.dimensions["motion_direction"] <= 0.1
    assert rev.dimensions["spatial_relation"] >= 0.95           # where things are is unchanged


def test_gaussian_noise_drops_cleanliness_and_sharpness(world, bench, clean):
    _, videos, prompts = world
    noisy = np.clip(videos + np.random.default_rng(0).normal(0, 0.08, videos.shape), 0, 1).astype(np.float32)
    r = bench.evaluate(noisy, prompts)
    assert r.dimensions["background_cleanliness"] <= clean.dimensions["background_cleanliness"] - 0.3
    assert r.dimensions["sharpness"] <= clean.dimensions["sharpness"] - 0.1
    assert r.total < clean.total - 0.15


def test_blur_drops_sharpness(world, bench, clean):
    _, videos, prompts = world
    r = bench.evaluate(ndimage.gaussian_filter(videos, sigma=(0, 0, 0, 1.0, 1.0)), prompts)
    assert r.dimensions["sharpness"] <= clean.dimensions["sharpness"] - 0.3


def test_brightness_flicker_drops_temporal_flicker(world, bench, clean):
    _, videos, prompts = world
    offsets = np.random.default_rng(1).uniform(-0.1, 0.1, size=(B, F, 1, 1, 1))
    r = bench.evaluate(np.clip(videos + offsets, 0, 1).astype(np.float32), prompts)
    assert r.dimensions["temporal_flicker"] <= clean.dimensions["temporal_flicker"] - 0.4
    assert r.semantic >= 0.95


def _without_last_object(scene: SceneSpec) -> np.ndarray:
    if len(scene.objects) == 1:
        return np.repeat(render_background(scene.background, S, S)[None], F, axis=0)
    return render_video(dataclasses.replace(scene, objects=scene.objects[:-1]), F, S)


def test_missing_object_drops_count(world, bench):
    scenes, _, prompts = world
    r = bench.evaluate(np.stack([_without_last_object(s) for s in scenes]), prompts)
    assert r.dimensions["count"] <= 0.1
    assert r.semantic < 0.6


def test_pure_noise_scores_low(bench, world):
    _, videos, prompts = world
    r = bench.evaluate(np.random.default_rng(2).uniform(0, 1, videos.shape).astype(np.float32), prompts)
    assert r.total < 0.3


def _two_objects(relation_prompt: str) -> tuple[np.ndarray, str]:
    a = ObjectSpec("circle", "red", x=0.25, y=0.5, size=0.12, motion="up", dx=0.0, dy=-0.3)
    b = ObjectSpec("square", "blue", x=0.72, y=0.5, size=0.12, motion="up", dx=0.0, dy=-0.3)
    video = render_video(SceneSpec(kind="relation", objects=(a, b), relation="left_of"), F, S)
    return video[None], relation_prompt


def test_spatial_relation_and_not_applicable_dimensions(bench):
    video, right = _two_objects("a red circle to the left of a blue square, both moving up")
    _, wrong = _two_objects("a red circle to the right of a blue square, both moving up")
    ok, bad = bench.evaluate(video, [right]), bench.evaluate(video, [wrong])
    assert ok.dimensions["spatial_relation"] == 1.0 and bad.dimensions["spatial_relation"] == 0.0
    assert ok.dimensions["motion_direction"] == 1.0
    partial = bench.evaluate(video, ["a red circle and a blue square"])       # no motion, no relation stated
    assert np.isnan(partial.dimensions["motion_direction"]) and np.isnan(partial.dimensions["spatial_relation"])
    assert partial.dimensions["object_class"] == 1.0 and partial.dimensions["count"] == 1.0
    free = bench.evaluate(video, ["a calm scene"])
    assert np.isnan(free.semantic) and free.total == pytest.approx(free.quality)


def test_result_reporting(clean):
    d = clean.to_dict(per_sample=True)
    assert set(d["dimensions"]) == set(SEMANTIC_DIMENSIONS + QUALITY_DIMENSIONS)
    assert len(d["per_sample"]["total"]) == B and d["weights"]["quality"] == 4.0
    table = clean.format_table()
    assert "spatial_relation" in table and "TOTAL" in table and f"{100 * clean.total:.2f}" in table
    assert clean.metrics()["shapesbench/total"] == pytest.approx(clean.total)
    for arr in clean.per_sample.values():
        vals = arr[~np.isnan(arr)]
        assert np.all((vals >= 0) & (vals <= 1))


def test_torch_input_and_weights(world, clean):
    _, videos, prompts = world
    r = ShapesBench(semantic_weight=0.0).evaluate(torch.from_numpy(videos[:4]), prompts[:4])
    assert r.total == pytest.approx(r.quality)
    np.testing.assert_allclose(r.per_sample["sharpness"], clean.per_sample["sharpness"][:4])
    only_colour = ShapesBench(dimension_weights={d: 0.0 for d in SEMANTIC_DIMENSIONS if d != "colour"})
    rc = only_colour.evaluate(videos[:4, :, [2, 0, 1]], prompts[:4])
    assert rc.semantic == pytest.approx(rc.dimensions["colour"])


@pytest.mark.parametrize("videos, prompts, match", [
    (np.zeros((2, F, S, S, 3), np.float32), ["a"] * 2, "permute"),
    (np.full((2, F, 3, S, S), 2.0, np.float32), ["a"] * 2, r"\[0, 1\]"),
    (np.zeros((2, F, 3, S, S), np.float32), ["a"], "2 strings"),
    (np.zeros((2, 2, 3, S, S), np.float32), ["a"] * 2, "3 frames"),
    (np.full((1, F, 3, S, S), np.nan, np.float32), ["a"], "NaN"),
])
def test_bad_input_raises_clear_errors(bench, videos, prompts, match):
    with pytest.raises(ValueError, match=match):
        bench.evaluate(videos, prompts)


def test_unknown_dimension_weight_is_rejected():
    with pytest.raises(ValueError, match="unknown ShapesBench dimension"):
        ShapesBench(dimension_weights={"colours": 1.0})
