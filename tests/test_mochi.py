"""The mochi family on a tiny random MochiPipeline built in code: its inverted time convention (timestep
``1000 (1 - σ)``, output ``x0 - ε``) and linear-quadratic schedule, η=0 sampling equals ``pipe(...)`` with CFG,
the packed prompt mask through Rollout row selection / cat / casts, ratio 1, GRPO and backprop steps that move
only LoRA, and LoRA that loads into the plain pipeline."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import MochiPipeline
from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
from pisces_rl.models import build_policy, build_tiny_mochi_pipeline
from pisces_rl.models.base import with_shift
from pisces_rl.models.mochi import mochi_sigmas, unpack_conditioning
from pisces_rl.rollout import Rollout, rescore_log_prob, sample_rollout

from _models import (assert_saved_lora_reproduces_policy, brightness, model_cfg, perturb_lora, train_moves_only_lora,
                     video_dataset)

PROMPTS = ["two red squares moving left", "a blue circle"]   # different lengths: the mask matters
SIZE = dict(num_frames=7, height=16, width=16)               # 6k+1 frames -> 2 latent frames
SEQ = 16
D = 32                                                       # the tiny T5's d_model


def sampling(**kw):
    cfg = dict(**SIZE, num_inference_steps=3, guidance_scale=4.5, eta=0.0, sde_type="flow_grpo",
               max_sequence_length=SEQ, negative_prompt="")
    cfg.update(kw)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def policy():
    return build_policy(model_cfg(family="mochi"), device="cpu")


def noise(policy, seed=0):
    return torch.randn(policy.latent_shape(len(PROMPTS), **SIZE), generator=torch.Generator().manual_seed(seed))


def run_plain(pipe, latents, guidance_scale):
    return pipe(PROMPTS, latents=latents, guidance_scale=guidance_scale, num_inference_steps=3, **SIZE,
                max_sequence_length=SEQ, output_type="pt").frames


def test_schedule_is_the_pipelines_inverted_linear_quadratic_grid(policy):
    """Our σ is ``1 -`` the inverted scheduler's sigmas, our timesteps ``1000 -`` its timesteps."""
    timesteps, sigmas = policy.flow_schedule(8)
    sched = policy.pipeline.scheduler
    sched.set_timesteps(sigmas=linear_quadratic_schedule(8, 0.025))        # what MochiPipeline.__call__ does
    torch.testing.assert_close(sigmas, 1 - sched.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, 1000 - sched.timesteps, atol=1e-3, rtol=0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    shifted = with_shift(sched, 3.0)                                       # model.scheduler_shift: same in both
    _, sigmas3 = mochi_sigmas(shifted, 8, torch.device("cpu"))
    shifted.set_timesteps(sigmas=linear_quadratic_schedule(8, 0.025))
    torch.testing.assert_close(sigmas3, 1 - shifted.sigmas, atol=1e-6, rtol=0)
    assert (sigmas3[1:-1] > sigmas[1:-1]).all()
    with pytest.raises(ValueError, match="6k\\+1"):
        policy.latent_shape(1, 9, 16, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        policy.latent_shape(1, 7, 24, 16)


def test_prompt_mask_is_packed_and_used(policy):
    packed, negative = policy.encode_prompts(PROMPTS, "", do_cfg=True, max_sequence_length=SEQ)
    assert packed.shape == negative.shape == (2, SEQ, D + 1)
    _, mask = unpack_conditioning(packed, D)
    assert mask.sum(1).tolist() == [6, 4]                                 # words + </s>
    assert unpack_conditioning(negative, D)[1].sum(1).tolist() == [1, 1]  # "" -> </s>
    x, t = noise(policy), torch.full((2,), 500.0)
    with torch.no_grad():
        v = policy.predict_velocity(x, t, packed)
        unmasked = packed.clone()
        unmasked[..., -1] = 1.0                                            # attend to the padding too
        assert (policy.predict_velocity(x, t, unmasked) - v).abs().max() > 1e-4, "the mask must matter"


def test_eta0_rollout_equals_plain_pipeline_with_cfg(policy):
    """Tolerance 1e-5 on videos in [0, 1] (measured ~1e-6 on CPU float32: the transformer sees ``1000 - 1000σ``
    where the pipeline computes ``1000 (1 - σ)``); also without CFG (g = 1)."""
    plain = build_tiny_mochi_pipeline(0)
    x = noise(policy)
    for g in (4.5, 1.0):
        roll = sample_rollout(policy, PROMPTS, sampling(guidance_scale=g), latents=x)
        assert (roll.negative_prompt_embeds is None) == (g == 1.0)
        torch.testing.assert_close(roll.videos, run_plain(plain, x.clone(), g), atol=1e-5, rtol=0)


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
        assert torch.equal(unpack_conditioning(cast, D)[1], unpack_conditioning(sub.prompt_embeds, D)[1])
    finally:
        perturb_lora(policy, scale=0.0)


COMMON = ["model.family=mochi", "train.max_steps=1", "train.prompts_per_step=1", "train.num_generations=2",
          "train.sample_batch_size=2", "train.learning_rate=5e-3", "sampling.num_inference_steps=3",
          "sampling.num_frames=7", "sampling.height=16", "sampling.width=16", "sampling.guidance_scale=4.5",
          f"sampling.max_sequence_length={SEQ}", "logging.report_to=none", "data.num_eval_prompts=1"]


def test_one_grpo_step_changes_only_lora(tmp_path):
    from pisces_rl.trainer import GRPOTrainer

    cfg = load_config(GRPOConfig, None, [f"output_dir={tmp_path}", *COMMON, "train.train_batch_size=2",
                                         "train.epsilon=0.2"])
    trainer = GRPOTrainer(cfg, rewards={"brightness": brightness})
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/loss"])


def test_one_backprop_step_from_data_changes_only_lora(tmp_path):
    from pisces_rl.trainer import BackpropTrainer

    cfg = load_config(BackpropConfig, None, [f"output_dir={tmp_path}", *COMMON, "train.train_batch_size=1",
                                             "train.teacher_steps=4"])
    trainer = BackpropTrainer(cfg, rewards={"b": brightness}, dataset=video_dataset(2, frames=7))
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/cd_loss"])
    latents = trainer.policy.encode(torch.rand(1, 7, 3, 16, 16))
    assert latents.shape == (1, 12, 2, 2, 2)                           # [B, 12, (F-1)/6+1, H/8, W/8]


def test_saved_lora_loads_into_a_plain_pipeline_and_reproduces_the_policy(policy, tmp_path):
    x = noise(policy)
    pipe = build_tiny_mochi_pipeline(0)
    assert isinstance(pipe, MochiPipeline)
    assert_saved_lora_reproduces_policy(
        policy, tmp_path, lambda: sample_rollout(policy, PROMPTS, sampling(), latents=x).videos,
        pipe, lambda p: run_plain(p, x.clone(), 4.5), atol=1e-5)
