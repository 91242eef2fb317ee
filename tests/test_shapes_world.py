"""ShapesWorld generator, captions/parser, corpus and prompt lists (CPU, offline, small)."""
import dataclasses

import numpy as np
import pytest
import torch

from pisces_rl.worlds.shapes import (COLOURS, MOTIONS, SHAPES, ObjectQuery, PromptAttributes, SceneSpec,
                                     caption_from_attributes, caption_scene, caption_split, parse_prompt,
                                     render_video, render_videos, sample_scene, scene_attributes, shapes_corpus,
                                     shapes_prompts, to_uint8, videos_to_tensor)
from pisces_rl.worlds.shapes.spec import GAP, ObjectSpec


# ----------------------------------------------------------------------------------------- scenes, render
def test_sample_scene_is_deterministic_and_seed_dependent():
    assert sample_scene(5) == sample_scene(5)
    assert sample_scene((1, 2)) == sample_scene((1, 2))
    assert len({sample_scene(i).to_json() for i in range(20)}) == 20


def test_scene_json_round_trip():
    for i in range(10):
        spec = sample_scene(i)
        assert SceneSpec.from_json(spec.to_json()) == spec


def test_scenes_cover_the_vocabulary_and_stay_in_frame_without_overlap():
    scenes = [sample_scene(i) for i in range(300)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.motion for o in objs} == set(MOTIONS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes:
        for t in np.linspace(0, 1, 9):
            boxes = [(*o.position(t), o.size) for o in s.objects]
            for x, y, h in boxes:
                assert h <= x <= 1 - h and h <= y <= 1 - h
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    (xi, yi, hi), (xj, yj, hj) = boxes[i], boxes[j]
                    assert max(abs(xi - xj), abs(yi - yj)) >= hi + hj + GAP - 1e-9


def test_relation_scenes_satisfy_their_relation():
    for i in range(200):
        s = sample_scene(i)
        if s.kind != "relation":
            continue
        (xa, ya), (xb, yb) = s.objects[0].position(0), s.objects[1].position(0)
        expected = {"left_of": xa < xb, "right_of": xa > xb, "above": ya < yb, "below": ya > yb}[s.relation]
        assert expected, (s.relation, xa, ya, xb, yb)


def test_render_shape_range_and_determinism():
    spec = sample_scene(3)
    a, b = render_video(spec, num_frames=9, size=32), render_video(spec, num_frames=9, size=32)
    assert a.shape == (9, 3, 32, 32) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert render_video(spec, num_frames=17, size=(48, 40)).shape == (17, 3, 48, 40)
    assert render_videos([spec, sample_scene(4)], num_frames=8, size=32).shape == (2, 8, 3, 32, 32)


def test_render_draws_the_object_colour_where_the_object_is():
    obj = ObjectSpec("square", "red", x=0.5, y=0.5, size=0.2, motion="right", dx=0.2, dy=0.0)
    video = render_video(SceneSpec(kind="group", objects=(obj,)), num_frames=3, size=40)
    np.testing.assert_allclose(video[0, :, 20, 20], obj.colour_rgb, atol=1e-6)      # centre at frame 0
    np.testing.assert_allclose(video[2, :, 20, 28], obj.colour_rgb, atol=1e-6)      # moved right by 8 px
    assert np.linalg.norm(video[2, :, 20, 14] - np.array(obj.colour_rgb)) > 0.5       # left edge vacated


def test_moving_objects_move_still_objects_do_not():
    for i in range(60):
        s = sample_scene(i)
        v = render_video(s, num_frames=9, size=32)
        moving = any(o.motion != "still" for o in s.objects)
        assert (np.abs(v[-1] - v[0]).max() > 0.3) == moving


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_frames=1), "num_frames"), (dict(size=8), "at least 16"), (dict(size=(32, 32, 3)), "size must"),
])
def test_render_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_video(sample_scene(0), **{"num_frames": 9, "size": 32, **kwargs})


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        ObjectSpec("square", "orange", 0.5, 0.5, 0.1, "still")
    with pytest.raises(ValueError, match="kind_probs"):
        sample_scene(0, kind_probs=(1.0, 0.0))
    with pytest.raises(ValueError, match="explicit seed"):
        sample_scene(None)


# ----------------------------------------------------------------------------------------- captions
def test_caption_parse_round_trip_many_seeds():
    for i in range(400):
        s = sample_scene((11, i))
        truth = scene_attributes(s)
        assert parse_prompt(caption_scene(s), strict=True) == truth
        assert parse_prompt(caption_scene(s, np.random.default_rng(i)), strict=True) == truth


def test_caption_examples():
    two = PromptAttributes((ObjectQuery("square", "red", 2, "left"),))
    assert caption_from_attributes(two) == "two red squares moving left"
    rel = PromptAttributes((ObjectQuery("circle", "blue", 1, "still"), ObjectQuery("triangle", "yellow", 1, "still")),
                           relation="left_of")
    assert caption_from_attributes(rel) == "a blue circle to the left of a yellow triangle, both staying still"
    assert parse_prompt("a blue circle to the left of a yellow triangle, both still") == rel


def test_parse_partial_and_free_text():
    assert parse_prompt("a dog running in a park").objects == ()
    partial = parse_prompt("an orange square and some circles moving up")
    assert partial.objects == (ObjectQuery("square", None, 1, None), ObjectQuery("circle", None, None, "up"))
    assert partial.total_count is None and not partial.complete
    shared = parse_prompt("A red square ABOVE a green circle - both moving rightwards.")
    assert shared.relation == "above" and [o.motion for o in shared.objects] == ["right", "right"]


def test_parse_errors_are_explicit():
    with pytest.raises(ValueError, match="no shape"):
        parse_prompt("a dog", strict=True)
    with pytest.raises(ValueError, match="lacks motion"):
        parse_prompt("a red circle", strict=True)
    with pytest.raises(TypeError):
        parse_prompt(3)
    with pytest.raises(ValueError, match="incomplete"):
        caption_from_attributes(PromptAttributes((ObjectQuery("circle"),)))


# ----------------------------------------------------------------------------------------- corpus
@pytest.fixture(scope="module")
def corpus():
    return shapes_corpus(12, seed=0, num_frames=9, size=32)


def test_corpus_columns_and_video_layout(corpus):
    assert len(corpus) == 12
    assert {"video", "caption", "shapes", "colours", "counts", "motions", "relation", "scene"} <= set(corpus.column_names)
    video = corpus.with_format("numpy", dtype="uint8")[:4]["video"]
    assert video.shape == (4, 9, 32, 32, 3) and video.dtype == np.uint8
    tensor = videos_to_tensor(video)
    assert tensor.shape == (4, 9, 3, 32, 32) and tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


def test_corpus_rows_are_consistent_and_reproducible(corpus):
    for row in corpus.select(range(6)):
        scene = SceneSpec.from_json(row["scene"])
        np.testing.assert_array_equal(np.asarray(row["video"], np.uint8), to_uint8(render_video(scene, 9, 32)))
        attrs = parse_prompt(row["caption"], strict=True)
        assert [o.shape for o in attrs.objects] == row["shapes"]
        assert [o.colour for o in attrs.objects] == row["colours"]
        assert [o.count for o in attrs.objects] == row["counts"]
        assert [o.motion for o in attrs.objects] == row["motions"]
        assert (attrs.relation or "") == row["relation"]
        assert sum(row["counts"]) == row["num_objects"]
    smaller = shapes_corpus(5, seed=0, num_frames=9, size=32)       # item i depends on (seed, i) only
    assert smaller["caption"] == corpus["caption"][:5]
    assert shapes_corpus(5, seed=1, num_frames=9, size=32)["caption"] != smaller["caption"]


def test_corpus_cache_round_trip(tmp_path):
    first = shapes_corpus(3, seed=2, num_frames=5, size=16, cache_dir=str(tmp_path))
    second = shapes_corpus(3, seed=2, num_frames=5, size=16, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    assert first["caption"] == second["caption"] and first["video"] == second["video"]


def test_train_and_heldout_splits_are_disjoint():
    train = shapes_corpus(40, seed=3, num_frames=3, size=16, split="train")
    heldout = shapes_prompts(40, seed=3, split="heldout")
    assert all(caption_split(c) == "train" for c in train["canonical_caption"])
    assert all(caption_split(p) == "heldout" for p in heldout)
    assert not set(train["canonical_caption"]) & set(heldout)


def test_prompts_are_unique_deterministic_and_parseable():
    prompts = shapes_prompts(50, seed=0)
    assert len(set(prompts)) == 50 and prompts == shapes_prompts(50, seed=0)
    assert prompts != shapes_prompts(50, seed=1)
    assert all(parse_prompt(p, strict=True).complete for p in shapes_prompts(20, seed=0, paraphrase=True))


@pytest.mark.parametrize("call, match", [
    (lambda: shapes_corpus(0), "num_videos"), (lambda: shapes_corpus(2, split="test"), "split"),
    (lambda: shapes_prompts(0), "positive"), (lambda: videos_to_tensor(np.zeros((2, 9, 3, 32, 32))), "shape"),
    (lambda: videos_to_tensor(np.zeros((9, 32, 32, 3), np.float32)), "uint8"),
])
def test_corpus_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_scene_attributes_of_group_counts_instances():
    s = next(sample_scene(i) for i in range(100) if sample_scene(i).kind == "group" and len(sample_scene(i).objects) == 3)
    attrs = scene_attributes(s)
    assert len(attrs.objects) == 1 and attrs.objects[0].count == 3 and attrs.total_count == 3
    assert caption_scene(s).startswith("three ")
    assert dataclasses.replace(attrs, text="x") == attrs          # text is not part of equality
