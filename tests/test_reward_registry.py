"""resolve_reward and build_reward_server: specs, import paths, errors, config reading, encoder sharing."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pisces_rl.rewards import RewardError, build_reward_server, resolve_reward

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    import reward_plugins

    return reward_plugins


def test_callables_are_returned_unchanged(plugins):
    assert resolve_reward(plugins.sharpness) is plugins.sharpness
    instance = plugins.ContrastReward()
    assert resolve_reward(instance, scale=9.0) is instance


def test_class_gets_only_the_options_its_init_accepts(plugins):
    before = plugins.ContrastReward.built
    reward = resolve_reward(plugins.ContrastReward, scale=2.0, encoder=object(), gamma=0.2)
    assert isinstance(reward, plugins.ContrastReward) and reward.scale == 2.0
    assert plugins.ContrastReward.built == before + 1


def test_import_paths_resolve_functions_classes_and_dotted_attributes(plugins):
    assert resolve_reward("reward_plugins:sharpness") is plugins.sharpness
    assert resolve_reward(" reward_plugins:Scorers.darkness ") is plugins.Scorers.darkness
    reward = resolve_reward("reward_plugins:ContrastReward", scale=3.0, device="cpu")
    assert isinstance(reward, plugins.ContrastReward) and (reward.scale, reward.device) == (3.0, "cpu")
    videos = torch.rand(2, 3, 3, 4, 4)
    torch.testing.assert_close(reward(videos, ["a", "b"]), 3.0 * videos.std(dim=(1, 2, 3, 4)))


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:fn", r"reward spec 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'.*PYTHONPATH"),
    ("reward_plugins:nope", r"'reward_plugins' has no attribute 'nope'; callables defined there: .*sharpness"),
    ("reward_plugins:NOT_A_REWARD", r"'reward_plugins:NOT_A_REWARD' points to a int, which is not callable"),
    ("sharpness", r"'sharpness' is neither a built-in reward nor an import path.*ot_quality.*package.module:"),
    ("reward_plugins:", r"neither a built-in reward nor an import path"),
    (42, r"reward spec 42 has type int"),
    ("reward_plugins:NeedsPath", r"'reward_plugins:NeedsPath': NeedsPath.__init__ needs model_path; pass model_path=..."),
    ("reward_plugins:BrokenInit", r"constructing BrokenInit\(\) raised OSError: weights file not found"),
    ("reward_plugins:NotCallable", r"NotCallable instances are not callable.*__call__"),
])
def test_bad_specs_name_the_spec_and_the_fix(plugins, spec, match):
    with pytest.raises(RewardError, match=match):
        resolve_reward(spec)


def test_module_with_a_missing_dependency_is_reported_as_such(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_plugin.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="one of its own imports is missing.*not_installed_dependency_xyz"):
        resolve_reward("needs_dep_plugin:reward")
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('bad global')\n")
    with pytest.raises(RewardError, match="importing module 'raising_plugin' raised RuntimeError: bad global"):
        resolve_reward("raising_plugin:reward")


def test_builtin_name_without_an_encoder_says_how_to_build_it():
    pytest.importorskip("pisces_rl.rewards.ot_quality")
    with pytest.raises(RewardError, match="needs encoder.*build_reward_server"):
        resolve_reward("ot_quality")


# ---------------------------------------------------------------- build_reward_server

def test_build_from_a_mapping_applies_every_server_setting(plugins):
    server = build_reward_server({"weights": {"reward_plugins:sharpness": 0.5, "reward_plugins:ContrastReward": 2.0},
                                  "num_frames": 2, "temporal_windows": 2, "max_batch_size": 3, "on_error": "skip"},
                                 device="cpu")
    assert server.names == ["reward_plugins:sharpness", "reward_plugins:ContrastReward"]
    assert server.weights.tolist() == [0.5, 2.0]
    assert (server.num_frames, server.temporal_windows, server.max_batch_size, server.on_error) == (2, 2, 3, "skip")
    contrast = server._entries[1].fn
    assert contrast.device == torch.device("cpu")  # classes are offered the device
    out = server(torch.rand(4, 6, 3, 4, 4), list("abcd"))
    assert out.scores.shape == (4, 2) and torch.isfinite(out.total).all()


def test_build_accepts_the_weights_shorthand_and_duck_typed_configs(plugins):
    shorthand = build_reward_server({"reward_plugins:brightness": 1.5})
    assert shorthand.names == ["reward_plugins:brightness"] and shorthand.weights.tolist() == [1.5]
    duck = build_reward_server(SimpleNamespace(weights={"reward_plugins:brightness": 1.0}, max_batch_size=2))
    assert duck.max_batch_size == 2 and duck.on_error == "raise"  # missing fields take the schema defaults


@pytest.mark.parametrize("cfg, match", [
    ({"weights": {}}, "non-empty mapping"),
    ({"weights": {"reward_plugins:brightness": 1.0}, "num_frame": 4}, r"unknown rewards config key\(s\) \['num_frame'\]"),
    ({"weights": {"reward_plugins:brightness": float("nan")}}, "has weight nan"),
])
def test_build_rejects_bad_configs(plugins, cfg, match):
    with pytest.raises(RewardError, match=match):
        build_reward_server(cfg)


def test_importing_the_server_and_plain_rewards_does_not_import_transformers():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        from pisces_rl.rewards import RewardServer, build_reward_server
        server = build_reward_server({{"reward_plugins:sharpness": 1.0}})
        server(torch.rand(1, 2, 3, 4, 4), ["a"])
        heavy = [m for m in ("transformers", "pisces_rl.encoders", "pisces_rl.rewards.ot_quality") if m in sys.modules]
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_build_shares_one_tiny_encoder_between_the_ot_rewards(monkeypatch):
    pytest.importorskip("pisces_rl.rewards.ot_semantic")
    import pisces_rl.encoders as encoders
    from pisces_rl.rewards import OTQualityReward, OTSemanticReward

    calls = []
    real_tiny = encoders.BlipVideoTextEncoder.tiny.__func__

    def counting_tiny(cls, *args, **kwargs):
        calls.append(args)
        return real_tiny(cls, *args, **kwargs)

    monkeypatch.setattr(encoders.BlipVideoTextEncoder, "tiny", classmethod(counting_tiny))
    server = build_reward_server({"weights": {"ot_quality": 1.0, "ot_semantic": 0.5}, "encoder": "tiny",
                                  "gamma": 0.3, "mass": 0.8})
    quality, semantic = (entry.fn for entry in server._entries)
    assert isinstance(quality, OTQualityReward) and isinstance(semantic, OTSemanticReward)
    assert len(calls) == 1 and quality.encoder is semantic.encoder
    assert not any(p.requires_grad for p in quality.encoder.parameters())
    out = server(torch.rand(2, 4, 3, 32, 32), ["a red circle", "a blue square"])
    assert out.names == ["ot_quality", "ot_semantic"] and torch.isfinite(out.scores).all()
    assert ((out.scores[:, 1] >= 0) & (out.scores[:, 1] <= 1)).all()  # semantic reward is a match probability
