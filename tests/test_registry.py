"""The core looks names up in pisces_rl.registry; worlds register them (ShapesWorld through its entry point)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pisces_rl import registry

CORE = ("models", "encoders", "rewards", "trainer", "data", "config", "rollout", "ot")


def test_the_core_source_never_imports_a_world():
    """No import statement (top-level or inside a function) in a core package names ``pisces_rl.worlds``."""
    root = Path(registry.__file__).parent
    offenders = []
    for package in CORE:
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                if any("worlds" in n for n in names):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_shapesworld_registers_its_names_through_the_entry_point():
    code = ("import sys; from pisces_rl import registry; assert not [m for m in sys.modules if 'worlds' in m]; "
            "print(registry.names('model'), registry.names('ot_map'), registry.names('judge'), "
            "registry.names('prompts'), registry.names('videos'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "('shapes',) ('shapes', 'shapes:l2') ('shapesbench',) ('shapes',) ('shapes',)"


def test_a_registered_judge_and_prompt_source_reach_the_config_and_the_loader(tmp_path):
    from pisces_rl.config import ConfigError, GRPOConfig, load_config
    from pisces_rl.data import load_prompts
    from pisces_rl.trainer.evaluation import resolve_judge

    def judge(videos, prompts):
        return {"total": float(videos.mean())}

    registry.register("judge", "mean_pixel", judge)
    registry.register("prompts", "colours", lambda spec: [f"a {c} square" for c in spec.split(":")[1:]])
    try:
        assert load_config(GRPOConfig, None, ["logging.judge=mean_pixel"]).logging.judge == "mean_pixel"
        assert resolve_judge("mean_pixel") is judge
        assert load_prompts("colours:red:blue") == ["a red square", "a blue square"]
    finally:
        registry.unregister("judge", "mean_pixel")
        registry.unregister("prompts", "colours")
    with pytest.raises(ConfigError, match="logging.judge.*shapesbench"):
        load_config(GRPOConfig, None, ["logging.judge=mean_pixel"])
    with pytest.raises(ValueError, match="unknown registry kind"):
        registry.register("nope", "x", 1)
    assert resolve_judge("shapesbench")(torch.zeros(1, 3, 3, 16, 16), ["a red circle moving left"])["total"] < 0.5
