"""What a run shows: progress bar, logged reward counts, held-out evaluation points, the reward curve, the
captioned before/after video, the model card and the (offline) Hub upload."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pisces_rl.config import ConfigError, GRPOConfig, load_config
from pisces_rl.trainer import GRPOTrainer
from pisces_rl.trainer.evaluation import EvalResult, eval_series
from pisces_rl.trainer.figures import (captioned_grid_frames, reward_curve_figure, smooth_ema, wrap_text, _font)
from pisces_rl.trainer.tracking import progress_postfix

EVAL_PROMPTS = ["a red circle moving left", "a blue square moving right"]


# ----------------------------------------------------------------------------- pure pieces
def test_smooth_ema_is_tensorboards_debiased_ema():
    """Reference: tensorboard ``components/vz_line_chart2/line-chart.ts`` (resmoothDataset):
    ``last = last * w + (1 - w) * x; n += 1; smoothed = last / (1 - w ** n)``, non-finite values skipped.
    Checked here against the closed form ``sum_i (1 - w) w^(t-i) x_i / (1 - w^t)``."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=12)
    w = 0.6
    closed = [sum((1 - w) * w ** (t - i) * xs[i] for i in range(t + 1)) / (1 - w ** (t + 1)) for t in range(12)]
    np.testing.assert_allclose(smooth_ema(xs, w), closed, rtol=1e-12)
    assert smooth_ema([3.0, 5.0], 0.0) == [3.0, 5.0]                       # no smoothing
    assert smooth_ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    out = smooth_ema([1.0, math.nan, 3.0], 0.5)                            # NaN skipped, state kept
    assert math.isnan(out[1]) and out[2] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        smooth_ema([1.0], 1.0)


def test_progress_postfix_lists_every_component_kl_cd_and_videos_per_second():
    metrics = {"reward/ot_quality/mean": 0.25, "reward/ot_quality/std": 0.1, "reward/pkg.mod:sharp/mean": 0.5,
               "reward/total/mean": 0.75, "train/loss": 1e-8, "train/kl": 2e-5, "train/cd_loss": 0.125,
               "time/samples_per_s": 12.5, "reward/ot_quality/skipped": 2, "reward/pkg.mod:sharp/not_applicable": 3}
    shown = progress_postfix(metrics)
    assert list(shown) == ["total", "ot_quality", "sharp", "kl", "cd", "loss", "vid/s", "skipped", "n/a"]
    assert shown["total"] == "0.7500" and shown["kl"] == "2e-05" and shown["vid/s"] == "12.5"
    assert shown["skipped"] == "2" and shown["n/a"] == "3"
    quiet = progress_postfix({"reward/a/mean": 0.1, "reward/total/mean": 0.1, "reward/a/skipped": 0})
    assert "kl" not in quiet and "cd" not in quiet and "skipped" not in quiet   # only when on / non-zero


def test_wrap_text_fits_the_width_and_truncates():
    font = _font(16)
    lines = wrap_text("two large red squares moving left above a small green circle that stays still", font,
                      120, max_lines=3)
    from PIL import ImageDraw
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(measure(line, font=font) <= 120 for line in lines)
    assert wrap_text("short", font, 120) == ["short"]
    long_word = wrap_text("x" * 200, font, 50, max_lines=10)                # a word wider than a line is cut
    assert len(long_word) > 1 and all(measure(line, font=font) <= 50 for line in long_word)


def test_captioned_grid_upscales_by_nearest_neighbour_and_writes_labels():
    torch.manual_seed(0)
    base, trained = torch.rand(3, 2, 3, 8, 8), torch.rand(3, 2, 3, 8, 8)    # [B=3, F=2, C, H, W]
    frames = captioned_grid_frames([base, trained], ["a red circle", "a blue square", "a green triangle"],
                                   ["base", "trained"], cell_size=64, max_columns=2)
    assert frames.dtype == np.uint8 and frames.shape[0] == 2 and frames.shape[-1] == 3
    k = 8                                                                    # ceil(64 / 8)
    src = (base[0].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    expected = src.repeat(k, axis=1).repeat(k, axis=2)                        # [F, 64, 64, 3]
    # find the first cell: the 64x64 block of the first row whose pixels equal the nearest-neighbour upscale
    hits = [(y, x) for y in range(frames.shape[1] - 63) for x in range(frames.shape[2] - 63)
            if (frames[0, y, x] == expected[0, 0, 0]).all() and (frames[:, y:y + 64, x:x + 64] == expected).all()]
    assert len(hits) == 1
    y, x = hits[0]
    dark = frames[0].min(axis=-1) < 100
    assert dark[:y, x:x + 64].any(), "no caption above the first column"
    assert dark[y:y + 64, :x].any(), "no row label left of the first row"
    # 3 prompts with max_columns=2 -> two blocks; the grid is two cells wide (plus label column and padding)
    assert 2 * 64 < frames.shape[2] - x < 3 * 64
    assert frames.shape[1] > 4 * 64
    with pytest.raises(ValueError, match="one per video"):
        captioned_grid_frames([base], ["only one"], cell_size=16)


def test_eval_series_orders_before_during_after():
    history = {"eval/iteration": [2.0, 4.0], "eval/reward/a": [0.2, 0.4], "reward/a/mean": [0.0] * 5}
    series = eval_series(history, {"reward/a": 0.1, "judge/total": 0.5}, {"reward/a": 0.5, "judge/total": 0.6}, 5)
    assert series["iteration"] == [0.0, 2.0, 4.0, 5.0]
    assert series["reward/a"] == [0.1, 0.2, 0.4, 0.5]
    assert series["judge/total"][0] == 0.5 and math.isnan(series["judge/total"][1])


def test_reward_curve_figure_panels_axes_band_and_eval_points():
    history = {"reward/q/mean": [0.1, 0.3, 0.2, 0.4], "reward/q/std": [0.05] * 4,
               "reward/total/mean": [0.2, 0.6, 0.4, 0.8], "reward/total/std": [0.1] * 4,
               "train/loss": [1e-8] * 4, "train/kl": [1e-3, 2e-3, 1e-3, 3e-3]}
    evals = {"iteration": [0, 2, 4], "reward/q": [0.1, 0.2, 0.3], "reward/total": [0.2, 0.4, 0.6],
             "judge/total": [0.5, 0.55, 0.6]}
    fig = reward_curve_figure(history, evals, smoothing=0.6, title="GRPO")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["reward: q", "total reward (weighted sum)", "judge (no reward sees it), held-out prompts",
                      "KL to the base model (train/kl)"]                     # loss is not drawn
    assert all(ax.get_xlabel() == "iteration" for ax in axes)
    q = axes[0]
    lines = {line.get_label(): line for line in q.get_lines()}
    np.testing.assert_allclose(lines["EMA (smoothing 0.6)"].get_ydata(), smooth_ema(history["reward/q/mean"], 0.6))
    np.testing.assert_allclose(lines["held-out prompts (η = 0)"].get_xdata(), [0, 2, 4])
    assert len(q.collections) == 1                                          # the ±1 std band
    band = q.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(max(np.array(smooth_ema(history["reward/q/mean"], 0.6)) + 0.05))
    assert any("base" in t.get_text() for t in q.texts) and any("trained" in t.get_text() for t in q.texts)


# ----------------------------------------------------------------------------- a tiny run, end to end
def brightness(videos, prompts, **kwargs):
    """Mean pixel value per video, [B, F, C, H, W] -> [B]."""
    return videos.mean(dim=(1, 2, 3, 4))


def every_other(videos, prompts, **kwargs):
    """Not applicable (None) to every second video."""
    return [float(v.mean()) if i % 2 == 0 else None for i, v in enumerate(videos)]


def broken(videos, prompts, **kwargs):
    raise RuntimeError("reward service unavailable")


class _FakeHub:
    """Stands in for the two network calls of huggingface_hub.HfApi (no network here) and records them."""

    def __init__(self):
        self.calls = []

    def create_repo(self, api, repo_id, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", {"repo_id": repo_id, "exist_ok": exist_ok}))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, api, repo_id, folder_path, commit_message=None, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": str(folder_path),
                                             "files": sorted(os.listdir(folder_path)),
                                             "commit_message": commit_message}))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 iterations, evaluation every 2, a not-applicable and a failing reward, KL on, push_to_hub (patched)."""
    from huggingface_hub import HfApi

    out = tmp_path_factory.mktemp("run") / "tiny-pisces"
    cfg = load_config(GRPOConfig, None, [
        f"output_dir={out}", "train.max_steps=3", "train.prompts_per_step=1", "train.group_size=4",
        "train.sample_batch_size=4", "train.train_batch_size=4", "train.learning_rate=5e-3", "train.clip_range=0.2",
        "train.kl_beta=0.01", "train.push_to_hub=true", "sampling.num_inference_steps=3", "sampling.num_frames=5",
        "sampling.height=16", "sampling.width=16", "logging.report_to=tensorboard", "logging.eval_every=2",
        "logging.video_cell_size=64", "rewards.on_error=skip", f"data.eval_prompts=[{', '.join(EVAL_PROMPTS)}]"])
    hub, err = _FakeHub(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(HfApi, "create_repo", lambda api, **kw: hub.create_repo(api, **kw))
        mp.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
        trainer = GRPOTrainer(cfg, rewards={"brightness": brightness, "every_other": (every_other, 0.5),
                                            "broken": broken})
        trainer.train()
    return {"out": out, "trainer": trainer, "hub": hub, "stderr": err.getvalue(),
            "summary": json.loads((out / "summary.json").read_text())}


def test_progress_bar_shows_each_component_kl_videos_per_second_and_skips(tiny_run):
    bar = [line for line in re.split(r"[\r\n]", tiny_run["stderr"]) if "3/3" in line][-1]
    for part in ("total=", "brightness=", "every_other=", "broken=nan", "kl=", "loss=", "vid/s=", "skipped=4",
                 "n/a=2"):
        assert part in bar, (part, bar)


def test_every_reward_server_metric_reaches_summary_and_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = tiny_run["summary"]
    metrics = summary["metrics"]
    assert metrics["reward/broken/skipped"] == 4 and metrics["reward/broken/not_applicable"] == 0
    assert metrics["reward/every_other/not_applicable"] == 2 and metrics["reward/every_other/skipped"] == 0
    assert metrics["reward/total/nan"] == 0 and math.isnan(metrics["reward/broken/mean"])
    assert summary["reward_counts"]["broken"] == {"skipped": 12, "not_applicable": 0}      # 3 iterations x 4
    assert summary["reward_counts"]["every_other"] == {"skipped": 0, "not_applicable": 6}
    events = EventAccumulator(str(next((tiny_run["out"] / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("reward/broken/skipped", "reward/every_other/not_applicable", "reward/total/nan",
                "reward/brightness/std", "eval/reward/total", "eval/reward/brightness", "train/kl"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("eval/reward/total")] == [0, 2, 3]   # before, during, after
    assert [e.value for e in events.Scalars("reward/broken/skipped")] == [4, 4, 4]


def test_held_out_evaluation_every_n_iterations(tiny_run):
    points = tiny_run["summary"]["eval_points"]
    assert points["iteration"] == [0, 2, 3]
    evaluation = tiny_run["summary"]["eval"]
    assert points["reward/total"][0] == evaluation["reward/total"]["before"]
    assert points["reward/total"][-1] == evaluation["reward/total"]["after"]
    assert tiny_run["trainer"].history["eval/iteration"] == [2.0]


def test_before_after_video_is_captioned_and_upscaled(tiny_run):
    trainer = tiny_run["trainer"]
    with Image.open(tiny_run["out"] / "before_after.gif") as im:
        width, height = im.size
        frame = np.asarray(im.convert("RGB"))
    assert width >= 2 * 64 + 40 and height >= 2 * 64                    # 16 px videos -> 64 px cells (k = 4)
    after = trainer.evaluate().videos                                     # [2, F, C, 16, 16], deterministic
    cell = (after[0, 0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    best = min(np.abs(frame[y:y + 64, x:x + 64].astype(int) - cell).mean()
               for y in range(height - 63) for x in range(width - 63))
    assert best < 3.0                       # the trained video is in the grid, 4x upscaled (GIF palette error)
    assert (frame.min(axis=-1) < 60).sum() > 100                          # text: prompts and row labels


def test_model_card_in_diffusers_format(tiny_run):
    from huggingface_hub import ModelCard

    lora = tiny_run["out"] / "lora"
    card = ModelCard.load(lora / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-video"
    assert {"lora", "text-to-video", "pisces-rl", "grpo", "diffusers-training"} <= set(card.data.tags)
    text = card.text
    assert "pipe.load_lora_weights(\"me/tiny-pisces\")" in text              # the pushed repo in the snippet
    assert "| `every_other` | 0.5 |" in text and "| `broken` | 1 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| reward/total |"))
    before = tiny_run["summary"]["eval"]["reward/total"]["before"]
    assert f"{before:.4f}" in row
    assert "![base vs trained](before_after.gif)" in text and (lora / "before_after.gif").is_file()
    assert "max_steps: 3" in text                                          # the run's config


def test_model_card_snippet_runs(tiny_run):
    """The card's diffusers snippet (without the mp4 export, which needs ffmpeg) loads the LoRA and samples."""
    text = (tiny_run["out"] / "lora" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"me/tiny-pisces"', repr(str(tiny_run["out"] / "lora")))
    code = "\n".join(line for line in code.splitlines() if not line.startswith("export_to_video"))
    scope: dict = {}
    exec(compile(code, "model_card_snippet", "exec"), scope)                # noqa: S102
    assert scope["video"].shape == (5, 16, 16, 3)
    assert scope["pipe"].get_list_adapters()["transformer"]                 # the LoRA is loaded


def test_push_to_hub_creates_the_repo_and_uploads_the_lora_folder(tiny_run):
    calls = tiny_run["hub"].calls
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "tiny-pisces", "exist_ok": True}     # default: the output_dir's name
    upload = calls[1][1]
    assert upload["repo_id"] == "me/tiny-pisces" and upload["folder_path"] == str(tiny_run["out"] / "lora")
    assert upload["files"] == ["README.md", "before_after.gif", "pytorch_lora_weights.safetensors"]


def test_failed_push_keeps_the_outputs_and_says_how_to_retry(tiny_run, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    trainer = tiny_run["trainer"]
    monkeypatch.setattr(trainer.config, "output_dir", str(tmp_path))
    monkeypatch.setattr(trainer.config.train, "hub_model_id", "me/elsewhere")
    lora = tmp_path / "lora"
    shutil.copytree(tiny_run["out"] / "lora", lora)

    def offline(api, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    videos = torch.rand(2, 5, 3, 16, 16)
    result = EvalResult(videos, {"reward/total": 0.5})
    with pytest.raises(RuntimeError, match=r"huggingface-cli upload me/elsewhere"):
        trainer._write_outputs({}, result, result, str(lora))
    assert (tmp_path / "summary.json").is_file() and (lora / "README.md").is_file()


def test_new_config_fields_are_validated(tmp_path):
    base = [f"output_dir={tmp_path}"]
    for override, key in (("train.hub_model_id=bad id!", "train.hub_model_id"),
                          ("logging.eval_every=-1", "logging.eval_every"),
                          ("logging.curve_smoothing=1.0", "logging.curve_smoothing"),
                          ("logging.video_cell_size=0", "logging.video_cell_size")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(GRPOConfig, None, [*base, override]).validate()
    ok = load_config(GRPOConfig, None, [*base, "train.hub_model_id=me/model-1.5", "logging.eval_every=5"])
    assert ok.validate().train.hub_model_id == "me/model-1.5"
