"""`pisces-rl generate`: the base pipeline + a LoRA saved by a 1-step tiny GRPO run, through diffusers'
``pipe.load_lora_weights``, sampled with the evaluation's sampler (η = 0, seeded noise)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from pisces_rl.cli import generate_videos, main
from pisces_rl.config import GRPOConfig, ModelConfig, SamplingConfig, load_config
from pisces_rl.config.base import from_dict
from pisces_rl.config.loader import load_yaml
from pisces_rl.trainer import GRPOTrainer

PROMPTS = ["a red circle moving left", "a blue square moving right"]


def brightness(videos, prompts, **kwargs):
    """Mean pixel value per video, [B, F, C, H, W] -> [B]."""
    return videos.mean(dim=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-iteration tiny GRPO run (large step so the LoRA moves); returns (run dir, trainer)."""
    out = tmp_path_factory.mktemp("gen_run")
    cfg = load_config(GRPOConfig, None, [
        f"output_dir={out}", "train.max_steps=1", "train.prompts_per_step=1", "train.group_size=2",
        "train.sample_batch_size=2", "train.train_batch_size=2", "train.learning_rate=5e-2", "train.clip_range=0.2",
        "sampling.num_inference_steps=3", "sampling.num_frames=5", "sampling.height=16", "sampling.width=16",
        "logging.report_to=none", f"data.eval_prompts=[{PROMPTS[0]}, {PROMPTS[1]}]"])
    trainer = GRPOTrainer(cfg, rewards={"brightness": brightness})
    trainer.train()
    return out, trainer


def _settings(out):
    data = load_yaml(out / "config.yaml")
    return from_dict(ModelConfig, data["model"]), from_dict(SamplingConfig, data["sampling"]), data["train"]


def test_generate_reproduces_the_runs_trained_evaluation_videos(run):
    out, trainer = run
    model, sampling, train = _settings(out)
    videos = generate_videos(PROMPTS, model, sampling, lora=str(out / "lora"), seed=train["seed"],
                             batch_size=train["sample_batch_size"], device="cpu")
    after = trainer.evaluate().videos
    before = trainer.evaluate(base_model=True).videos
    assert videos.shape == after.shape == (2, 5, 3, 16, 16)
    # the LoRA applied through pipe.load_lora_weights + fuse gives the trained policy's videos ...
    torch.testing.assert_close(videos, after, rtol=0, atol=1e-5)
    # ... and not the base model's (the LoRA moved the videos far more than the tolerance above)
    assert (videos - before).abs().max() > 1e-3
    base = generate_videos(PROMPTS, model, sampling, lora=None, seed=train["seed"], batch_size=2, device="cpu")
    torch.testing.assert_close(base, before, rtol=0, atol=1e-5)
    off = generate_videos(PROMPTS, model, sampling, lora=str(out / "lora"), lora_scale=0.0, seed=train["seed"],
                          batch_size=2, device="cpu")
    torch.testing.assert_close(off, before, rtol=0, atol=1e-5)            # --lora-scale 0 = the base model


def test_cli_reads_the_run_config_and_writes_a_gif(run, tmp_path, capsys):
    out, _ = run
    gif = tmp_path / "one.gif"
    assert main(["generate", "--lora", str(out / "lora"), "--prompt", PROMPTS[0], "--out", str(gif)]) == 0
    printed = capsys.readouterr().out
    assert f"settings from {out / 'config.yaml'}" in printed and "seed 42" in printed
    with Image.open(gif) as im:
        assert im.size == (16, 16)            # the run's sampling.height/width, read from its config.yaml
        assert im.n_frames >= 2               # (Pillow merges identical consecutive frames)


def test_cli_several_prompts_flags_and_captioned_grid(run, tmp_path):
    out, _ = run
    args = ["generate", "--lora", str(out / "lora"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--height", "32", "--width", "32", "--steps", "2", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "v.gif")]) == 0
    for i in range(2):
        with Image.open(tmp_path / f"v_{i}.gif") as im:
            assert im.size == (32, 32)
    assert main([*args, "--captioned", "--cell-size", "64", "--out", str(tmp_path / "grid.gif")]) == 0
    with Image.open(tmp_path / "grid.gif") as im:
        width, height = im.size
    assert width >= 2 * 64 and height > 64   # two 64-px cells side by side, captions above them


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    out, _ = run
    assert main(["generate", "--lora", str(tmp_path / "missing"), "--prompt", "x", "--pretrained", "tiny",
                 "--out", str(tmp_path / "x.gif")]) == 1
    err = capsys.readouterr().err
    assert "pisces-rl generate: error:" in err and "neither an existing folder" in err
    assert main(["generate", "--prompt", "x", "--pretrained", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "x.gif")]) == 1
    assert "model.pretrained" in capsys.readouterr().err
    with pytest.raises(SystemExit):                       # --prompt is required
        main(["generate", "--lora", str(out / "lora")])

