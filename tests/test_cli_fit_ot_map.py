"""`pisces-rl fit-ot-map`: dataset loading, corpus encoding and an end-to-end fit on a tiny in-code corpus."""
import importlib.util
import json

import datasets
import numpy as np
import pytest
import torch

from pisces_rl.cli import main
from pisces_rl.encoders import BlipVideoTextEncoder
from pisces_rl.ot.fit import encode_corpus, load_video_dataset, video_to_tensor

HAS_NEURAL_MAP = importlib.util.find_spec("pisces_rl.ot.neural_map") is not None
needs_map = pytest.mark.skipif(not HAS_NEURAL_MAP, reason="pisces_rl.ot.neural_map (NeuralOTMap) is not available")

COLOURS = ["red", "green", "blue"]
SHAPES = ["circle", "square", "triangle"]


def corpus(n=24, layout="fchw", seed=0):
    """``n`` random captioned uint8 clips of 2 frames at 16x16."""
    rng = np.random.default_rng(seed)
    shape = (2, 3, 16, 16) if layout == "fchw" else (2, 16, 16, 3)
    return datasets.Dataset.from_dict({
        "clip": [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)],
        "text": [f"a {COLOURS[i % 3]} {SHAPES[(i // 3) % 3]} moving left" for i in range(n)],
    })


@pytest.fixture(scope="module")
def saved_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus"
    corpus().save_to_disk(str(path))
    return path


def test_video_layouts_and_scaling():
    fhwc = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    out = video_to_tensor(fhwc.tolist())
    assert out.shape == (2, 3, 5, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(fhwc).permute(0, 3, 1, 2).float() / 255)
    gray = video_to_tensor(np.full((2, 1, 4, 4), 0.5, dtype=np.float32))
    assert gray.shape == (2, 3, 4, 4) and torch.all(gray == 0.5)
    with pytest.raises(ValueError, match="cannot tell the channel axis.*--video-layout"):
        video_to_tensor(np.zeros((2, 3, 4, 3)))
    assert video_to_tensor(np.zeros((2, 3, 4, 3)), layout="fhwc").shape == (2, 3, 3, 4)
    with pytest.raises(ValueError, match="4-D array"):
        video_to_tensor(np.zeros((3, 4, 4)))


def test_encode_corpus_from_disk_and_parquet(saved_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep the user cache clean
    encoder = BlipVideoTextEncoder.tiny(seed=0)
    data = load_video_dataset(saved_corpus)
    text, video = encode_corpus(encoder, data, video_column="clip", caption_column="text", batch_size=10)
    assert text.shape == video.shape == (24, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(24))
    clip0 = torch.from_numpy(np.asarray(corpus()[0]["clip"], dtype=np.uint8)).float()[None] / 255
    torch.testing.assert_close(video[0], encoder.encode_video(clip0).pooled_embedding[0])
    torch.testing.assert_close(text[3], encoder.encode_text([corpus()[3]["text"]]).cls_embedding[0])
    # the same clips stored channels-last in parquet give the same embeddings
    corpus(layout="fhwc").to_parquet(str(tmp_path / "c.parquet"))
    parquet = load_video_dataset(tmp_path / "c.parquet")
    text2, video2 = encode_corpus(encoder, parquet, "clip", "text", batch_size=7, max_samples=5)
    reference = corpus(layout="fhwc")[:5]["clip"]
    clips = torch.from_numpy(np.asarray(reference, dtype=np.uint8)).permute(0, 1, 4, 2, 3).float() / 255
    torch.testing.assert_close(video2, encoder.encode_video(clips).pooled_embedding)
    with pytest.raises(ValueError, match=r"no column\(s\) \['video', 'caption'\].*--video-column"):
        encode_corpus(encoder, data)


def test_cli_reports_bad_inputs(tmp_path, saved_corpus, capsys):
    assert main(["fit-ot-map", "--dataset", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.csv").write_text("a,b\n")
    assert main(["fit-ot-map", "--dataset", str(tmp_path / "notes.csv"), "--output", str(tmp_path / "o")]) == 1
    assert "CSV cannot hold video arrays" in capsys.readouterr().err
    assert main(["fit-ot-map", "--dataset", str(saved_corpus), "--output", str(tmp_path / "o"),
                 "--encoder", str(tmp_path / "no_encoder")]) == 1
    assert "BLIP encoder checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit-ot-map", "--dataset", str(saved_corpus)])  # --output is required


@needs_map
@pytest.mark.parametrize("kind", ["neural", "l2"])
def test_fit_ot_map_end_to_end(saved_corpus, tmp_path, kind, capsys):
    from pisces_rl.ot.neural_map import L2RegressionMap, NeuralOTMap
    from pisces_rl.rewards.ot_quality import OTQualityReward

    out = tmp_path / f"map_{kind}"
    argv = ["fit-ot-map", "--dataset", str(saved_corpus), "--video-column", "clip", "--caption-column", "text",
            "--encoder", "tiny", "--map", kind, "--steps", "3", "--batch-size", "8", "--hidden", "16",
            "--lr", "1e-3", "--output", str(out), "--device", "cpu", "--quiet", "--val-fraction", "0.25"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"saved {kind} OT map (24 pairs, 3 steps)" in printed and "held-out mutual-kNN" in printed
    info = json.loads((out / "fit_ot_map.json").read_text())
    assert info["num_pairs"] == 24 and info["embed_dim"] == 32 and info["map"] == kind
    assert info["history"]["num_val"] == 6 and info["history"]["train"][-1]["step"] == 3
    loaded = (NeuralOTMap if kind == "neural" else L2RegressionMap).from_pretrained(out)
    encoder = BlipVideoTextEncoder.tiny(seed=0)
    text = encoder.encode_text(["a red circle moving left"]).cls_embedding
    with torch.no_grad():
        mapped = loaded(text)
    assert mapped.shape == (1, 32) and torch.isfinite(mapped).all()
    # the saved map plugs into the quality reward by path
    reward = OTQualityReward(encoder, ot_map=out)
    assert type(reward.ot_map) is type(loaded)
    clips, prompts = torch.rand(2, 2, 3, 16, 16), ["a red circle moving left"] * 2
    scores = reward(clips, prompts)
    video = encoder.encode_video(clips).pooled_embedding
    expected = torch.nn.functional.cosine_similarity(mapped.expand(2, -1), video, dim=-1)
    torch.testing.assert_close(scores, expected)
    assert not torch.allclose(scores, OTQualityReward(encoder, use_ot=False)(clips, prompts))
