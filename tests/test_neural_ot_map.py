"""Text→video maps (Neural OT, L2 regression) and the paired alignment metrics used to select them."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pisces_rl.ot import (L2RegressionMap, NeuralOTMap, distance_spearman, extract_ot_map_state_dict, load_map,
                          load_released_ot_map, mutual_knn)

D = 8


def brenier_pairs(n=512, seed=0):
    """Text-like unit vectors ``y`` and "videos" ``x = A y + s``, ``A = Q diag(λ) Qᵀ`` (random rotation ``Q``).

    ``y ↦ A y + s`` is the gradient of the convex ``½ yᵀA y + sᵀy``, so by Brenier's theorem it *is* the
    quadratic-cost OT map from the text distribution to the video distribution: unpaired Neural OT can recover
    the pairing. (A pure rotation is not such a gradient, so no OT map could recover it from unpaired samples.)
    """
    gen = torch.Generator().manual_seed(seed)
    y = F.normalize(torch.randn(n, D, generator=gen), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
    a = q @ torch.diag(torch.logspace(-0.7, 0.7, D)) @ q.T
    return y, y @ a.T + 0.5 * torch.randn(D, generator=gen)


def held_out(n, val_fraction, seed):
    """The held-out indices ``fit`` documents: the first round(val_fraction * n) of a seeded permutation."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:round(val_fraction * n)]


@pytest.fixture(scope="module")
def fitted_ot_map():
    text, video = brenier_pairs()
    torch.manual_seed(0)
    ot_map = NeuralOTMap(dim=D, hidden=32)
    history = ot_map.fit(text, video, steps=200, lr=3e-3, val_fraction=0.25, eval_every=40, seed=0,
                         progress=False)
    return ot_map, history, text, video


# -- metrics -------------------------------------------------------------------------------------------------------

def unit(*degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_mutual_knn_hand_checked():
    a, b = unit(0, 10, 90, 100), unit(0, 80, 90, 170)
    # cosine nearest neighbours: a -> [1, 0, 3, 2], b -> [1, 2, 1, 2]; items 0 and 3 agree
    assert mutual_knn(a, b, k=1) == 0.5
    # 2-NN sets: a -> {1,2},{0,2},{1,3},{1,2}; b -> {1,2},{0,2},{1,3},{1,2}
    assert mutual_knn(a, b, k=2) == 1.0
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert mutual_knn(x, 3.0 * x @ q, k=10) == 1.0  # rotation and scale keep cosine neighbourhoods
    unrelated = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    assert mutual_knn(x, unrelated, k=10) < 0.2  # chance level is k / (N - 1) = 0.05


def test_distance_spearman_hand_checked():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # distances (01, 02, 12) = 1, 3, 2 -> ranks 1, 3, 2
    y = torch.tensor([[0.0], [2.0], [3.0]])  # distances 2, 3, 1 -> ranks 2, 3, 1
    assert distance_spearman(x, y) == pytest.approx(0.5)  # centred ranks (-1, 1, 0) . (0, 1, -1) / 2
    assert distance_spearman(x, -2 * x + 7) == pytest.approx(1.0)
    assert math.isnan(distance_spearman(x, torch.zeros(3, 2)))


def test_distance_spearman_ties_match_scipy():
    from scipy.stats import spearmanr

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (12, 2), generator=gen).double()  # many tied distances
    y = x + torch.randint(0, 2, (12, 2), generator=gen).double()
    expected = spearmanr(torch.pdist(x).numpy(), torch.pdist(y).numpy()).statistic
    assert distance_spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_metric_errors():
    with pytest.raises(ValueError, match=r"1 <= k < N = 4"):
        mutual_knn(torch.randn(4, 2), torch.randn(4, 2), k=4)
    with pytest.raises(ValueError, match="same N"):
        mutual_knn(torch.randn(4, 2), torch.randn(5, 2), k=1)
    with pytest.raises(ValueError, match="at least 3 pairs"):
        distance_spearman(torch.randn(2, 2), torch.randn(2, 2))


# -- Neural OT map -------------------------------------------------------------------------------------------------

def test_architecture_and_call():
    """T and f are the released PISCES MLPs (roar-ai/pisces fastvideo/optimal_transport.py ``OptimalTransportMap``,
    ``PotentialNetwork``): Linear, ReLU, LayerNorm, Linear, ReLU, LayerNorm, Linear; parameters at 0, 2, 3, 5, 6."""
    ot_map = NeuralOTMap(dim=6, hidden=10)
    linears = [m for m in ot_map.transport if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 10), (10, 10), (10, 6)]
    order = [torch.nn.Linear, torch.nn.ReLU, torch.nn.LayerNorm] * 2 + [torch.nn.Linear]
    assert [type(m) for m in ot_map.transport] == order == [type(m) for m in ot_map.critic]
    assert {k.rsplit(".", 1)[0] for k in ot_map.transport.state_dict()} == {"0", "2", "3", "5", "6"}
    assert ot_map.critic[-1].out_features == 1
    text = torch.randn(4, 6)
    out = ot_map(text)
    assert out.shape == (4, 6) and out.requires_grad
    torch.testing.assert_close(ot_map(7.0 * text), out)  # the map L2-normalises its input
    torch.testing.assert_close(ot_map(text[0]), out[0])
    with torch.no_grad():
        assert not ot_map(text).requires_grad
    double = text.double().requires_grad_()
    mapped = ot_map(double)
    assert mapped.dtype == torch.float64
    mapped.sum().backward()
    assert double.grad is not None and double.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expects text embeddings \[B, 6\]"):
        ot_map(torch.randn(4, 5))


def test_fit_improves_held_out_alignment(fitted_ot_map):
    ot_map, history, text, video = fitted_ot_map
    assert [e["step"] for e in history["eval"]] == [40, 80, 120, 160, 200]
    assert history["num_val"] == 128 and history["num_train"] == 384
    assert set(history["train"][0]) == {"step", "loss_T", "loss_f", "lr"}
    identity, best = history["identity"], history["best"]
    assert best["mknn"] > identity["mknn"] + 0.15, (identity, best)
    assert best["spearman"] > identity["spearman"] + 0.1, (identity, best)


def test_fit_restores_the_best_checkpoint():
    text, video = brenier_pairs(n=64, seed=3)
    torch.manual_seed(0)
    ot_map = NeuralOTMap(dim=D, hidden=16)
    history = ot_map.fit(text, video, steps=10, lr=3e-2, k_t=2, batch_size=32, val_fraction=0.25, eval_every=1,
                         seed=0, progress=False)  # a large step size: held-out mKNN peaks early, then drops
    scores = [e["mknn"] for e in history["eval"]]
    best = history["best"]
    assert best["mknn"] == max(scores) and best["step"] < 10 and scores[-1] < best["mknn"]
    val = held_out(len(text), 0.25, seed=0)
    with torch.no_grad():
        assert mutual_knn(ot_map(text[val]), video[val], k=10) == best["mknn"]


def test_save_and_load_round_trip(fitted_ot_map, tmp_path):
    ot_map = fitted_ot_map[0]
    ot_map.save_pretrained(tmp_path / "map")
    assert sorted(p.name for p in (tmp_path / "map").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "map" / "config.json").read_text())
    assert config == {"map_type": "NeuralOTMap", "dim": D, "hidden": 32, "layout": "linear_relu_norm",
                      "input_normalization": "l2"}
    loaded = NeuralOTMap.from_pretrained(tmp_path / "map")
    assert not loaded.training
    probe = torch.randn(16, D)
    with torch.no_grad():
        assert torch.equal(loaded(probe), ot_map(probe))
        assert torch.equal(loaded.potential(probe), ot_map.potential(probe))
    assert isinstance(load_map(tmp_path / "map"), NeuralOTMap)
    with pytest.raises(ValueError, match="holds a NeuralOTMap, not a L2RegressionMap"):
        L2RegressionMap.from_pretrained(tmp_path / "map")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NeuralOTMap.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        NeuralOTMap.from_pretrained(tmp_path / "empty")
    NeuralOTMap(dim=4, hidden=8).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        NeuralOTMap.from_pretrained(tmp_path / "m")
    NeuralOTMap(dim=4, hidden=8).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden": 16}))
    with pytest.raises(ValueError, match="does not match its config.json"):
        NeuralOTMap.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_map(tmp_path / "m")


def test_fit_errors():
    ot_map = NeuralOTMap(dim=4, hidden=8)
    text, video = torch.randn(20, 4), torch.randn(20, 4)
    with pytest.raises(ValueError, match=r"text_embeddings \[N, 4\]"):
        ot_map.fit(torch.randn(20, 5), video, steps=1)
    with pytest.raises(ValueError, match="20 texts and 19 videos"):
        ot_map.fit(text, video[:19], steps=1)
    with pytest.raises(ValueError, match=r"need >= 3 held-out \(or val_fraction=0"):
        ot_map.fit(text, video, steps=1, val_fraction=0.05)
    with pytest.raises(ValueError, match="k_t must be a positive integer"):
        ot_map.fit(text, video, steps=1, k_t=0)
    with pytest.raises(ValueError, match="steps >= 1"):
        ot_map.fit(text, video, steps=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        ot_map.fit(text, video.masked_fill(video > 1, float("nan")), steps=1)


def test_fit_without_validation_and_progress_bar(capsys):
    ot_map = NeuralOTMap(dim=4, hidden=8)
    before = [p.clone() for p in ot_map.transport.parameters()]
    history = ot_map.fit(torch.randn(20, 4), torch.randn(20, 4), steps=3, batch_size=8, k_t=2, val_fraction=0.0)
    assert history["eval"] == [] and "best" not in history and history["num_train"] == 20
    assert any(not torch.equal(p, q) for p, q in zip(before, ot_map.transport.parameters()))
    assert "fit NeuralOTMap" in capsys.readouterr().err


def test_fit_clips_gradients_and_decays_to_the_released_floor(monkeypatch):
    """Released train_OT_map.py: clip_grad_norm_(params, 1.0) after every T step and every f step, and
    CosineAnnealingLR(T_max=max_steps, eta_min=0.05 * lr) stepped once per outer step."""
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k:
                        calls.append(max_norm) or real(params, max_norm, *a, **k))
    ot_map = NeuralOTMap(dim=4, hidden=8)
    history = ot_map.fit(torch.randn(40, 4), torch.randn(40, 4), steps=6, batch_size=8, k_t=3, lr=1e-2,
                         val_fraction=0.0, eval_every=1, progress=False)
    assert calls == [1.0] * (6 * (3 + 1))
    lrs = [record["lr"] for record in history["train"]]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.05 * 1e-2, rel=1e-9)
    calls.clear()
    NeuralOTMap(dim=4, hidden=8).fit(torch.randn(40, 4), torch.randn(40, 4), steps=2, batch_size=8, k_t=1,
                                     val_fraction=0.0, progress=False, grad_clip=None)
    assert calls == []


class ReleasedMLP(torch.nn.Module):
    """roar-ai/pisces fastvideo/optimal_transport.py ``OptimalTransportMap`` (``out=1``: ``PotentialNetwork``
    before its squeeze), as released."""

    def __init__(self, dim, hidden, out):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.ReLU(inplace=True), torch.nn.LayerNorm(hidden),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(inplace=True), torch.nn.LayerNorm(hidden),
            torch.nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


def _randomised(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


@pytest.mark.parametrize("wrap", ["raw", "T", "ot_map", "state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_released_pisces_ot_map_loads(tmp_path, wrap, prefix):
    """A released OT-map checkpoint (raw state dict, or under 'T' / 'ot_map' / 'state_dict' / 'model', keys
    possibly prefixed by DDP's 'module.' or torch.compile's '_orig_mod.') loads into a NeuralOTMap that maps
    exactly like the released module; load_map accepts the file too, and a critic under 'f' comes along."""
    released = _randomised(ReleasedMLP(6, 10, 6), seed=0)
    critic = _randomised(ReleasedMLP(6, 10, 1), seed=1)
    state = {prefix + k: v for k, v in released.state_dict().items()}
    checkpoint = state if wrap == "raw" else {wrap: state, "step": 7}
    if wrap == "T":
        checkpoint["f"] = {prefix + k: v for k, v in critic.state_dict().items()}
    path = tmp_path / "OT_map.pt"
    torch.save(checkpoint, path)
    assert set(extract_ot_map_state_dict(checkpoint)) == set(released.state_dict())
    probe = torch.randn(5, 6)
    for ot_map in (load_released_ot_map(path), load_map(path)):
        assert isinstance(ot_map, NeuralOTMap) and (ot_map.dim, ot_map.hidden) == (6, 10) and not ot_map.training
        assert ot_map.input_normalization == "none"   # the released trainer maps raw text_proj features
        with torch.no_grad():
            torch.testing.assert_close(ot_map(probe), released(probe), rtol=0, atol=0)
            if wrap == "T":
                torch.testing.assert_close(ot_map.potential(probe), critic(probe).squeeze(-1), rtol=0, atol=0)
    normalised = load_released_ot_map(path, input_normalization="l2")
    with torch.no_grad():
        torch.testing.assert_close(normalised(3.0 * probe), released(F.normalize(probe, dim=-1)))


def test_released_map_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_released_ot_map(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_released_ot_map({"T": "not a state dict"})
    legacy = NeuralOTMap(dim=4, hidden=8, layout="linear_norm_relu").transport.state_dict()
    with pytest.raises(ValueError, match="not the released 3-layer MLP"):
        load_released_ot_map({"net." + k: v for k, v in legacy.items()})


def test_maps_saved_with_the_earlier_layout_still_load(tmp_path):
    """Maps saved before the released layout (Linear, LayerNorm, ReLU; no "layout" in config.json) load as such."""
    old = NeuralOTMap(dim=4, hidden=8, layout="linear_norm_relu")
    assert [type(m) for m in old.transport][:3] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ReLU]
    old.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["layout"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = load_map(tmp_path / "old")
    assert loaded.layout == "linear_norm_relu"
    probe = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(probe), old(probe))
    with pytest.raises(ValueError, match="layout"):
        NeuralOTMap(dim=4, hidden=8, layout="relu_first")


# -- L2 regression baseline ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [0, 32])
def test_l2_regression_same_interface(hidden, tmp_path):
    text, video = brenier_pairs(seed=1)
    torch.manual_seed(0)
    reg = L2RegressionMap(dim=D, hidden=hidden)
    history = reg.fit(text, video, steps=600, lr=3e-2, val_fraction=0.25, eval_every=100, progress=False)
    assert set(history["train"][0]) == {"step", "loss"}
    assert history["best"]["mknn"] > history["identity"]["mknn"] + 0.15
    if hidden == 0:  # the data are an affine map of the normalised text: linear regression recovers it
        assert history["best"]["mknn"] > 0.95
    reg.save_pretrained(tmp_path / "l2")
    loaded = load_map(tmp_path / "l2")
    assert isinstance(loaded, L2RegressionMap) and loaded.hidden == hidden
    with torch.no_grad():
        assert torch.equal(loaded(text[:5]), reg(text[:5]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_on_cuda_returns_on_input_device(tmp_path):
    ot_map = NeuralOTMap(dim=4, hidden=8)
    ot_map.save_pretrained(tmp_path / "m")
    on_gpu = NeuralOTMap.from_pretrained(tmp_path / "m", device="cuda")
    text = torch.randn(3, 4)
    with torch.no_grad():
        out = on_gpu(text)
        assert out.device.type == "cpu"
        torch.testing.assert_close(out, ot_map.eval()(text), rtol=1e-4, atol=1e-5)
        assert on_gpu(text.cuda()).device.type == "cuda"
    on_gpu.fit(torch.randn(30, 4), torch.randn(30, 4), steps=2, batch_size=8, progress=False)
