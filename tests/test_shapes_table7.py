"""benchmarks/shapes_table7.py: pairs, metrics and intervals by hand, and one pass on the tiny encoder."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pisces_rl.encoders import BlipVideoTextEncoder
from pisces_rl.worlds.shapes import shapes_corpus


@pytest.fixture(scope="module")
def table7(load_benchmark):
    return load_benchmark("shapes_table7")


@pytest.fixture(scope="module")
def heldout():
    return shapes_corpus(6, seed=1, split="heldout", num_frames=5, size=32)


def test_pairs_one_attribute_changed_and_a_primary_negative_per_clip(table7, heldout):
    pairs = table7.build_pairs(heldout, seed=0)
    assert pairs == table7.build_pairs(heldout, seed=0)                   # seeded
    assert len(pairs["captions"]) == len(pairs["primary"]) == 6
    for i, k in enumerate(pairs["primary"]):
        assert pairs["negatives"][k][0] == i                               # a clip's primary negative is its own
    for clip, caption, kind in pairs["negatives"]:
        assert kind in table7.KINDS and caption != pairs["captions"][clip]
    kinds_of_clip = {}
    for clip, _, kind in pairs["negatives"]:
        kinds_of_clip.setdefault(clip, []).append(kind)
    assert all(len(set(v)) == len(v) for v in kinds_of_clip.values())   # one negative per applicable kind


def test_summary_metrics_by_hand(table7):
    pairs = {"captions": ["a", "b", "c", "d"], "primary": [0, 2, 3, 4],
             "negatives": [(0, "x", "colour"), (0, "y", "shape"), (1, "z", "colour"), (2, "w", "count"),
                           (3, "v", "colour")]}
    p_pos = np.array([0.9, 0.6, 0.4, 0.7])
    p_neg = np.array([0.2, 0.8, 0.7, 0.4, 0.7])
    perfect = (np.ones(4) * 0.9, np.ones(5) * 0.1)
    rows = {r["setting"]: r for r in table7.summarise({"vanilla": perfect, "model": (p_pos, p_neg)}, pairs,
                                                      bootstrap=200)}
    assert rows["vanilla"]["accuracy"] == rows["vanilla"]["pair_accuracy"] == 1.0
    assert rows["vanilla"]["accuracy_ci95"] == [1.0, 1.0]
    m = rows["model"]
    # primary negatives 0.2, 0.7, 0.4, 0.7 -> classified right: pos (T, T, F, T), neg (T, F, T, F) -> 5 / 8
    assert m["accuracy"] == pytest.approx(5 / 8) and m["classified_pairs"] == 8
    assert m["pair_accuracy"] == pytest.approx(2 / 4)                       # 0.9>0.2, 0.6<0.7, 0.4=0.4 (half), 0.7=0.7
    assert m["per_kind"]["colour"]["pairs"] == 3
    assert m["per_kind"]["colour"]["pair_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["vs_vanilla"]["accuracy"] == pytest.approx(5 / 8 - 1)
    lo, hi = m["vs_vanilla"]["accuracy_ci95"]
    assert lo <= m["vs_vanilla"]["accuracy"] <= hi
    lo, hi = m["accuracy_ci95"]
    assert 0 <= lo <= 5 / 8 <= hi <= 1 and hi - lo > 0


def test_wilson_interval_matches_scipy(table7):
    for k, n in ((0, 10), (7, 20), (380, 400)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(table7.wilson(k, n), [ci.low, ci.high], atol=1e-6)


def test_run_on_the_tiny_encoder(table7, heldout):
    encoder = BlipVideoTextEncoder.tiny(seed=0, num_frames=3)
    result = table7.run(encoder, heldout, bootstrap=50)
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == [s[0] for s in table7.SETTINGS]
    assert result["protocol"]["clips"] == 6 and "nothing is tuned" in result["preregistration"]
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["pair_accuracy"] <= 1
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
    assert rows["vanilla"]["use_ot"] is False and rows["full_ot/itc_proj"]["mass"] == 1.0
    # the OT rows score differently from vanilla and from each other's cost embeddings
    means = {k: r["p_match_positive_mean"] for k, r in rows.items()}
    assert abs(means["partial_ot_m0.9/layer_qk"] - means["vanilla"]) > 1e-4
    assert abs(means["partial_ot_m0.9/layer_qk"] - means["partial_ot_m0.9/itc_proj"]) > 1e-4
    assert "| partial_ot_m0.9/layer_qk |" in table7.table(result)
