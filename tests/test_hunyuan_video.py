"""The hunyuan_video family on a tiny random HunyuanVideoPipeline built in code: the template's crop, η=0 sampling
equals ``pipe(...)``, embedded guidance (one branch, scale x 1000), packed conditioning through Rollout row
selection / cat / casts, ratio 1, GRPO and backprop steps that move only LoRA, and LoRA that loads into the plain
pipeline."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
from pisces_rl.models import build_policy, build_tiny_hunyuan_video_pipeline
from pisces_rl.models.hunyuan_video import unpack_conditioning
from pisces_rl.rollout import Rollout, rescore_log_prob, sample_rollout

from _models import (assert_saved_lora_reproduces_policy, brightness, model_cfg, perturb_lora, train_moves_only_lora,
                     video_dataset)

PROMPTS = ["two red squares moving left", "a blue circle"]   # different lengths: the mask matters
SIZE = dict(num_frames=5, height=16, width=16)
SEQ = 16


def sampling(**kw):
    cfg = dict(**SIZE, num_inference_steps=3, guidance_scale=6.0, eta=0.0, sde_type="flow_grpo",
               max_sequence_length=SEQ, negative_prompt="")
    cfg.update(kw)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def policy():
    return build_policy(model_cfg(family="hunyuan_video"), device="cpu")


def noise(policy, seed=0):
    return torch.randn(policy.latent_shape(len(PROMPTS), **SIZE), generator=torch.Generator().manual_seed(seed))


def run_plain(pipe, latents, guidance_scale):
    return pipe(PROMPTS, latents=latents, guidance_scale=guidance_scale, num_inference_steps=3, **SIZE,
                max_sequence_length=SEQ, output_type="pt").frames


def test_tokenizer_template_crop_start_is_the_prompt(policy):
    tok = policy.pipeline.tokenizer
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(tok(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    ids = tok(DEFAULT_PROMPT_TEMPLATE["template"].format(PROMPTS[0])).input_ids[95:]
    assert tok.convert_ids_to_tokens(ids) == [*PROMPTS[0].split(), "<|eot_id|>"]
    packed, negative = policy.encode_prompts(PROMPTS, "ugly", do_cfg=True, max_sequence_length=SEQ)
    assert negative is None and packed.shape == (2, 1 + SEQ, 16 + 1)   # [B, 1 + L, max(D=16, P=8) + 1]
    _, mask, _ = unpack_conditioning(packed, 16, 8)
    assert mask.sum(1).tolist() == [6.0, 4.0]                          # prompt words + <|eot_id|>


def test_eta0_rollout_equals_plain_pipeline_with_the_same_embedded_guidance(policy):
    """Tolerance: 1e-6 on videos in [0, 1] (measured: bitwise equal on CPU float32, at g = 6 and 2.5)."""
    plain = build_tiny_hunyuan_video_pipeline(0)
    x = noise(policy)
    for g in (6.0, 2.5):
        roll = sample_rollout(policy, PROMPTS, sampling(guidance_scale=g), latents=x)
        assert roll.negative_prompt_embeds is None and roll.guidance_scale == g
        torch.testing.assert_close(roll.videos, run_plain(plain, x.clone(), g), atol=1e-6, rtol=0)


def test_embedded_guidance_is_one_branch_with_scale_times_1000_and_changes_the_output(policy):
    calls = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda m, args, kw: calls.append((kw["hidden_states"].shape[0], kw["guidance"].tolist())), with_kwargs=True)
    try:
        a = sample_rollout(policy, PROMPTS, sampling(guidance_scale=6.0), latents=noise(policy))
        b = sample_rollout(policy, PROMPTS, sampling(guidance_scale=1.0), latents=noise(policy))
    finally:
        hook.remove()
    assert calls == [(2, [6000.0, 6000.0])] * 3 + [(2, [1000.0, 1000.0])] * 3, "one B-sized call per step"
    assert (a.videos - b.videos).abs().max() > 1e-3, "the embedded guidance scale must change the video"
    emb, _ = policy.encode_prompts(PROMPTS, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="no negative branch"):
        policy.predict_velocity(noise(policy), 500.0, emb, emb, 6.0)
    assert torch.tensor([6.0], dtype=torch.bfloat16) * 1000.0 == torch.tensor([6018.0], dtype=torch.bfloat16), \
        "DanceGRPO's guidance 6018 is the pipeline's g = 6 in bfloat16 (both 6016)"


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo"])
def test_rescore_gives_ratio_one_after_row_selection_cat_and_bf16_cast(policy, sde_type):
    perturb_lora(policy)
    try:
        gen = torch.Generator().manual_seed(3)
        cfg = sampling(eta=0.5, sde_type=sde_type)
        r = Rollout.cat([sample_rollout(policy, PROMPTS, cfg, generator=gen, decode=False),
                         sample_rollout(policy, PROMPTS[::-1], cfg, generator=gen, decode=False)])
        sub = r.index_select([3, 0])                                    # "two red ..." twice, from both rollouts
        for step in range(r.num_steps - 1):
            new = rescore_log_prob(policy, sub, step)
            ratio = torch.exp(new.log_prob - sub.log_probs[:, step])
            torch.testing.assert_close(ratio, torch.ones(2), atol=1e-5, rtol=0)
        assert torch.equal(sub.prompt_embeds[0], sub.prompt_embeds[1])
        cast = sub.prompt_embeds.to(torch.bfloat16)                     # the mask column survives any cast exactly
        assert torch.equal(unpack_conditioning(cast, 16, 8)[1], unpack_conditioning(sub.prompt_embeds, 16, 8)[1])
    finally:
        perturb_lora(policy, scale=0.0)


COMMON = ["model.family=hunyuan_video", "train.max_steps=1", "train.prompts_per_step=1", "train.num_generations=2",
          "train.sample_batch_size=2", "train.learning_rate=5e-3", "sampling.num_inference_steps=3",
          "sampling.num_frames=5", "sampling.height=16", "sampling.width=16", "sampling.guidance_scale=6.0",
          f"sampling.max_sequence_length={SEQ}", "logging.report_to=none", "data.num_eval_prompts=1"]


def test_one_grpo_step_changes_only_lora(tmp_path):
    """With the CD term on too (its teacher and target: one embedded-guidance branch, no negative embeddings)."""
    from pisces_rl.trainer import GRPOTrainer

    cfg = load_config(GRPOConfig, None, [f"output_dir={tmp_path}", *COMMON, "train.train_batch_size=2",
                                         "train.epsilon=0.2", "train.cd_weight=0.5"])
    trainer = GRPOTrainer(cfg, rewards={"brightness": brightness})
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/cd_loss"])


def test_one_backprop_step_from_data_changes_only_lora(tmp_path):
    from pisces_rl.trainer import BackpropTrainer

    cfg = load_config(BackpropConfig, None, [f"output_dir={tmp_path}", *COMMON, "train.train_batch_size=1",
                                             "train.teacher_steps=4"])
    trainer = BackpropTrainer(cfg, rewards={"b": brightness}, dataset=video_dataset(2, frames=5, size=16))
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/cd_loss"])
    latents = trainer.policy.encode(torch.rand(1, 5, 3, 16, 16))
    assert latents.shape == (1, 16, 2, 2, 2)                           # [B, 16, (F-1)/4+1, H/8, W/8]


def test_saved_lora_loads_into_a_plain_pipeline_and_reproduces_the_policy(policy, tmp_path):
    x = noise(policy)
    pipe = build_tiny_hunyuan_video_pipeline(0)
    assert isinstance(pipe, HunyuanVideoPipeline)
    assert_saved_lora_reproduces_policy(
        policy, tmp_path, lambda: sample_rollout(policy, PROMPTS, sampling(), latents=x).videos,
        pipe, lambda p: run_plain(p, x.clone(), 6.0), atol=1e-6)


def test_schedule_is_the_pipeline_grid_and_model_scheduler_shift_gives_dancegrpos():
    """``model.scheduler_shift=5``: DanceGRPO's ``sd3_time_shift(5, linspace(1, 0, T + 1))`` (train_grpo_hunyuan.py),
    also in the pipeline's own scheduler (so ``pipe(...)`` samples on the same grid)."""
    shifted = build_policy(model_cfg(family="hunyuan_video", scheduler_shift=5.0), device="cpu")
    assert shifted.pipeline.scheduler.config.shift == 5.0
    timesteps, sigmas = shifted.flow_schedule(16)
    s = torch.linspace(1, 0, 17)
    torch.testing.assert_close(sigmas, 5 * s / (1 + 4 * s), atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, sigmas[:-1] * 1000, atol=1e-3, rtol=0)
