"""benchmarks/gpu_families.py: its CPU path (--size tiny) gives one row per architecture x gradient checkpointing,
with positive timings and memory where measured, and a clear row for families this checkout does not have."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("gpu_families")


def test_published_configs_fill_the_class_defaults(bench):
    """The recipe-size kwargs are the conversion script's dict over the diffusers class defaults (what
    ``from_config`` builds): e.g. Wan 1.3B keeps ``rope_max_seq_len=1024`` and the default Wan 2.1 VAE."""
    wan = next(a for a in bench.ARCHITECTURES if a["name"] == "Wan2.1-T2V-1.3B")
    kw = bench.build_kwargs(wan, "recipe")
    tr, vae = kw["transformer_kwargs"], kw["vae_kwargs"]
    assert (tr["num_layers"], tr["num_attention_heads"], tr["ffn_dim"], tr["text_dim"]) == (30, 12, 8960, 4096)
    assert tr["rope_max_seq_len"] == 1024
    assert (vae["base_dim"], vae["z_dim"], vae["dim_mult"]) == (96, 16, [1, 2, 4, 4])
    assert kw["text_encoder_kwargs"]["d_model"] == tr["text_dim"]
    assert bench.build_kwargs(wan, "tiny") == {}
    assert all(a["source"] and a["recipe"] for a in bench.ARCHITECTURES)


def test_tiny_table_rows_columns_and_positive_measurements(bench, tmp_path, capsys, fresh_accelerate_state):
    out = tmp_path / "rows.json"
    assert bench.main(["--size", "tiny", "--device", "cpu", "--threads", "1", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| architecture"))
    assert [c.strip() for c in header.strip("|").split("|")] == bench.COLUMNS
    assert "not benchmarked" in table
    rows = json.loads(out.read_text())["rows"]
    wan = [r for r in rows if r["architecture"] == "Wan2.1-T2V-1.3B"]
    assert [r["grad ckpt"] for r in wan] == ["on", "off"]
    for r in wan:
        assert r["status"] == "ok", r
        assert r["H x W x F"] == "32 x 32 x 9"
        for key in ("sample s", "decode s", "reward s", "update s", "s/step", "s/train", "peak GiB",
                    "denoiser B params"):
            assert r[key] > 0, (key, r)
        assert r["decode s"] < r["sample s"]
    for r in rows:
        assert r["status"] in ("ok", bench.NO_CKPT), r       # every family of the table runs at tiny size
    assert {r["family"] for r in rows} == {"wan", "hunyuan_video", "cogvideox", "text_to_video_sd", "mochi",
                                           "ltx_video"}
    assert sum(r["architecture"] == "Wan2.1-T2V-1.3B" for r in rows) == 2
    assert len(table.strip().splitlines()) >= 2 + len(rows)


def test_time_budget_skips_remaining_rows(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["--size", "tiny", "--device", "cpu", "--families", "wan", "--time-budget", "0", "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "skipped (budget)" for r in rows if r["family"] == "wan"
                        and not r["status"].startswith("family not available"))
    assert "skipped (budget)" in capsys.readouterr().out
