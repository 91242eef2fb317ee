"""docs/hyperparameters.md cannot drift from the shipped recipes.

The page lists every key of every ``recipes/configs/*.yaml`` (class defaults included), its value per recipe and its
source; ``docs/make_hyperparameters.py`` writes it below a marker line. These tests fail when a YAML, a config class
default or a source changes without the page being regenerated (``python docs/make_hyperparameters.py``), and when a
config key ships without a source or an engineering role.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import yaml

from pisces_rl.config import to_dict

ROOT = Path(__file__).resolve().parents[1]
TITLES = {"grpo": "## GRPO and DiffusionNFT recipes", "backprop": "## Direct reward-backprop recipes"}


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_hyperparameters", ROOT / "docs" / "make_hyperparameters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page(gen) -> str:
    return gen.PAGE.read_text(encoding="utf-8")


def hyperparameter_cells(page: str, table: str) -> dict:
    """``{key: {recipe: cell}}`` of one recipe table of the page (every ``### section`` under its ``## title``)."""
    start = page.index(TITLES[table])
    end = min(page.index(t, start + 1) for t in (*TITLES.values(), "## Engineering") if t in page[start + 1:])
    cells, recipes = {}, []
    for line in page[start:end].splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split(" | ")]
        if parts[0] == "key":
            recipes = [p.strip("`") for p in parts[1:-1]]
        elif re.fullmatch(r"`[\w.]+`", parts[0]):
            cells[parts[0].strip("`")] = dict(zip(recipes, parts[1:-1]))
    return cells


def same(cell: str, raw) -> bool:
    """A page cell shows the YAML value ``raw`` (numbers compared as numbers: the page writes 1e-4 for 1.0e-4)."""
    if isinstance(raw, (list, tuple)):
        items = [c.strip() for c in cell.strip("[]").split(",")] if cell != "[]" else []
        return len(items) == len(raw) and all(same(c, r) for c, r in zip(items, raw))
    if isinstance(raw, bool) or raw is None:
        return cell == {None: "null", True: "true", False: "false"}[raw]
    if isinstance(raw, (int, float)):
        return math.isclose(float(cell), float(raw), rel_tol=1e-12)
    return cell == ('""' if raw == "" else str(raw))


def test_the_committed_page_is_what_the_generator_writes(gen, page):
    assert gen.render(page) == page, "docs/hyperparameters.md is stale: run `python docs/make_hyperparameters.py`"


def test_every_value_of_every_recipe_has_a_source_or_an_engineering_role(gen):
    assert gen.missing() == []
    shipped = sorted(p.stem for p in (ROOT / "recipes" / "configs").glob("*.yaml"))
    assert sorted(n for cfgs in gen.recipes().values() for n in cfgs) == shipped


def test_the_page_shows_each_value_the_yaml_sets(gen, page):
    """Read independently of the generator: every non-engineering key a recipe's YAML sets appears in that recipe's
    column with the YAML's value (in parentheses where that recipe does not read it), and every other key has a row."""
    checked = 0
    for table, cfgs in gen.recipes().items():
        cells = hyperparameter_cells(page, table)
        for name, cfg in cfgs.items():
            raw = gen.flatten(yaml.safe_load((ROOT / "recipes" / "configs" / f"{name}.yaml").read_text()))
            for key in gen.flatten(to_dict(cfg)):
                if gen.role(key, table):
                    assert f"`{key}`" in page.split("## Engineering settings")[1], key
                    continue
                shown = cells[key][name]
                assert shown.startswith("(") is gen.unused(key, table, cfg), f"{name}: {key} shown as {shown!r}"
                if key in raw:
                    assert same(shown.removeprefix("(").removesuffix(")"), raw[key]), \
                        f"{name}: {key} is {raw[key]!r} in the YAML but {shown!r} on the page"
                    checked += 1
    assert checked > 150


def test_the_not_read_marks_follow_the_algorithm(gen, page):
    """GRPO recipes do not read the DiffusionNFT section, NFT recipes not the PPO clip, backprop from dataset latents
    not the SDE noise: those values are shown in parentheses."""
    grpo, backprop = hyperparameter_cells(page, "grpo"), hyperparameter_cells(page, "backprop")
    for name, cfg in gen.recipes()["grpo"].items():
        nft = cfg.train.algorithm == "nft"
        assert grpo["nft.beta"][name].startswith("(") is not nft and grpo["train.epsilon"][name].startswith("(") is nft
    assert set(backprop["sampling.eta"].values()) == {"(0.25)"} and set(backprop["train.huber_c"].values()) == {"1e-3"}


def test_a_key_without_a_source_is_reported(gen, monkeypatch):
    """The check can fail: a key whose source is removed is reported for every recipe, and a group's scope removed
    from a per-group source is reported for that group's recipes only (tiny fixtures fall back to 'test fixture')."""
    monkeypatch.delitem(gen.SOURCES, "train.max_grad_norm")
    gaps = gen.missing()
    assert {g.split(":")[1] for g in gaps if g.endswith(":train.max_grad_norm")} == \
        {n for cfgs in gen.recipes().values() for n in cfgs}
    monkeypatch.undo()
    monkeypatch.setitem(gen.SOURCES, "model.lora_rank", {"shapes": gen.KEPT})
    gpu = [f"{t}:{t}_{length}_video_wan:model.lora_rank" for t in ("backprop", "grpo") for length in ("long", "short")]
    others = [f"{t}:{n}:model.lora_rank" for t, cfgs in gen.recipes().items() for n in cfgs if gen.group(n) == "gpu"]
    assert sorted(g for g in gen.missing() if g.endswith("model.lora_rank")) == sorted(gpu + others)
    monkeypatch.setitem(gen.ENGINEERING, "model.lora_rank", "memory")
    assert not [g for g in gen.missing() if g.endswith("model.lora_rank")]


def test_the_page_keeps_its_hand_written_head_and_the_generator_needs_the_marker(gen, page):
    head = page.split(gen.MARKER)[0]
    assert "## Deliberate departures" in head and "not sourced" in head
    assert gen.render(head + gen.MARKER + "\nstale tables\n") == page
    with pytest.raises(ValueError, match="marker|lacks"):
        gen.render(head)
