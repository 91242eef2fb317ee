"""The README's "Write your own reward" section runs as written, by object and by import path."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pisces_rl.rewards import RewardServer, build_reward_server

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Write your own reward"


def section_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md lost its '{SECTION}' section"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"^## ", body, flags=re.MULTILINE)[0]
    return re.findall(rf"^```{language}\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture
def fresh_module_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_readme_python_example_runs(capsys):
    blocks = section_blocks("python")
    assert blocks, "the README reward section has no python example"
    namespace: dict = {"__name__": "readme_example"}
    for block in blocks:
        exec(compile(block, f"{README}:{SECTION}", "exec"), namespace)
    servers = [v for v in namespace.values() if isinstance(v, RewardServer)]
    assert servers, "the README example should build a RewardServer"
    assert capsys.readouterr().out.strip(), "the README example should print its result"
    out = servers[0](torch.rand(2, 3, 3, 8, 8), ["a", "b"])
    assert out.scores.shape == (2, len(servers[0])) and torch.isfinite(out.total).all()


def test_readme_reward_plugs_in_by_module_path_from_the_yaml(fresh_module_dir):
    (fresh_module_dir / "my_rewards.py").write_text(section_blocks("python")[0], encoding="utf-8")
    configs = [yaml.safe_load(block) for block in section_blocks("yaml")]
    rewards_cfg = next(c["rewards"] for c in configs if isinstance(c, dict) and "rewards" in c)
    spec = next(k for k in rewards_cfg["weights"] if ":" in k)
    assert spec == "my_rewards:sharpness"

    server = build_reward_server({**rewards_cfg, "weights": {spec: rewards_cfg["weights"][spec]}})
    import my_rewards

    videos = torch.rand(3, 4, 3, 8, 8)
    out = server(videos, ["x", "y", "z"])
    assert out.names == [spec] and out.weights.tolist() == [0.5]
    torch.testing.assert_close(out.scores[:, 0], my_rewards.sharpness(videos, None))
    torch.testing.assert_close(out.total, 0.5 * my_rewards.sharpness(videos, None))


def test_readme_yaml_builds_with_the_builtin_rewards(fresh_module_dir):
    pytest.importorskip("pisces_rl.rewards.ot_semantic")
    (fresh_module_dir / "my_rewards.py").write_text(section_blocks("python")[0], encoding="utf-8")
    rewards_cfg = yaml.safe_load(section_blocks("yaml")[0])["rewards"]
    server = build_reward_server(rewards_cfg)
    assert server.names == ["ot_quality", "ot_semantic", "my_rewards:sharpness"]
    out = server(torch.rand(2, 4, 3, 32, 32), ["a red circle", "two blue squares"])
    assert torch.isfinite(out.scores).all()
