"""Prompt loading: text and table files, the shipped VBench list, built-in lists, and the error messages."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from pisces_rl.data import BUILTIN_PROMPTS, load_prompts, vbench_dimensions, vbench_entries, vbench_prompts


def test_shipped_vbench_list():
    data = json.loads(resources.files("pisces_rl.data").joinpath("vbench_prompts.json").read_text("utf-8"))
    assert data["license"] == "Apache-2.0" and "VBench" in data["source"]
    entries = data["prompts"]
    prompts = [e["prompt"] for e in entries]
    assert len(entries) == 946 and all(isinstance(p, str) and p.strip() == p and p for p in prompts)
    assert len(set(prompts)) == 944  # two prompts are listed twice, under different dimensions
    assert len(vbench_dimensions()) == 16 and all(e["dimension"] for e in entries)
    loaded = load_prompts("vbench")
    assert len(loaded) == len(set(loaded)) == 944 and loaded[0] == prompts[0]
    assert len(vbench_entries()) == 946


def test_vbench_dimension_filter():
    color = load_prompts("vbench:color")
    assert len(color) == 85 and set(color) <= set(vbench_prompts())
    with pytest.raises(ValueError, match=r"unknown VBench dimension 'colour'. Did you mean 'vbench:color'"):
        load_prompts("vbench:colour")


def test_builtin_and_list_sources():
    assert load_prompts("builtin:tiny") == list(BUILTIN_PROMPTS["tiny"]) and len(BUILTIN_PROMPTS["tiny"]) >= 4
    assert load_prompts([" a cat ", "a dog"]) == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="unknown built-in prompt list 'huge'; available: builtin:tiny"):
        load_prompts("builtin:huge")
    with pytest.raises(ValueError, match="the prompt list: item 1 is an empty prompt"):
        load_prompts(["a cat", "  "])


def test_txt_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\n\na cat running\n  a dog sleeping  \n# done\n")
    assert load_prompts(str(path)) == ["a cat running", "a dog sleeping"]
    (tmp_path / "c.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="c.txt' holds no prompts"):
        load_prompts(str(tmp_path / "c.txt"))


def test_table_formats_through_datasets(tmp_path):
    rows = [{"prompt": "a cat", "id": 1}, {"prompt": "a dog", "id": 2}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.csv").write_text('caption,id\n"a cat, running",1\na dog,2\n')
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.json")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.parquet")) == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.csv", column="caption") == ["a cat, running", "a dog"]
    with pytest.raises(ValueError, match=r"has no column 'prompt'.* Columns: caption, id; set the column"):
        load_prompts(str(tmp_path / "p.csv"))
    with pytest.raises(ValueError, match=r"no column 'captoin'. Did you mean 'caption'"):
        load_prompts(str(tmp_path / "p.csv"), column="captoin")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file 'nope.jsonl' not found"):
        load_prompts("nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="e.jsonl' is empty"):
        load_prompts(str(tmp_path / "e.jsonl"))
    (tmp_path / "h.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match="h.csv' has a header line but no rows"):
        load_prompts(str(tmp_path / "h.csv"))
    (tmp_path / "b.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"b.jsonl' \(column 'prompt'\): row 1 is an empty prompt"):
        load_prompts(str(tmp_path / "b.jsonl"))
    (tmp_path / "p.yaml").write_text("- a cat\n")
    with pytest.raises(ValueError, match="unsupported extension '.yaml'"):
        load_prompts(str(tmp_path / "p.yaml"))
    with pytest.raises(ValueError, match="is a directory"):
        load_prompts(str(tmp_path))


def test_shapesworld_prompt_sources_are_disjoint_splits():
    train = load_prompts("shapes:train:64")
    heldout = load_prompts("shapes:heldout:16")
    assert len(train) == 64 and len(heldout) == 16 and not set(train) & set(heldout)
    assert load_prompts("shapes:train:64") == train  # deterministic
    with pytest.raises(ValueError, match="shapes:<split>:<n>"):
        load_prompts("shapes:test:5")
