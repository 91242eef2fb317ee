"""The ltx_video family on a tiny random LTXPipeline built in code: η=0 sampling equals ``pipe(...)`` (packed
latents, T5 mask, dynamic shift), the resolution-dependent schedule, ratio 1, GRPO and backprop steps that move only
LoRA, LoRA that loads into the plain pipeline, and a timestep-conditioned decoder."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
from pisces_rl.models import build_policy, build_tiny_ltx_video_pipeline
from pisces_rl.models.ltx_video import LTXVideoFamily, unpack_prompt
from pisces_rl.rollout import Rollout, rescore_log_prob, sample_rollout

from _models import (assert_saved_lora_reproduces_policy, brightness, model_cfg, perturb_lora, train_moves_only_lora,
                     video_dataset)

PROMPTS = ["two red squares moving left", "a blue circle"]   # different lengths: the mask matters
SIZE = dict(num_frames=9, height=32, width=32)               # 8k+1 frames, multiples of 32
SEQ = 16


def sampling(**kw):
    cfg = dict(**SIZE, num_inference_steps=3, guidance_scale=3.0, eta=0.0, sde_type="flow_grpo",
               max_sequence_length=SEQ, negative_prompt="")
    cfg.update(kw)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def policy():
    return build_policy(model_cfg(family="ltx_video"), device="cpu")


def noise(policy, seed=0):
    return torch.randn(policy.latent_shape(len(PROMPTS), **SIZE), generator=torch.Generator().manual_seed(seed))


def run_plain(pipe, latents, guidance_scale=3.0, **kw):
    """``pipe(latents=...)`` takes the packed noise ``[B, F*h*w, C]``."""
    return pipe(PROMPTS, latents=pipe._pack_latents(latents, 1, 1), guidance_scale=guidance_scale,
                num_inference_steps=3, **SIZE, max_sequence_length=SEQ, output_type="pt", **kw).frames


def test_latent_shape_sizes_and_prompt_mask(policy):
    assert policy.latent_shape(2, **SIZE) == (2, 8, 2, 4, 4)        # [B, C, (F-1)/8+1, H/8, W/8]
    with pytest.raises(ValueError, match="8k\\+1"):
        policy.latent_shape(1, 5, 32, 32)
    with pytest.raises(ValueError, match="multiples of 32"):
        policy.latent_shape(1, 9, 48, 32)
    packed, negative = policy.encode_prompts(PROMPTS, "", do_cfg=True, max_sequence_length=SEQ)
    assert packed.shape == negative.shape == (2, SEQ, 32 + 1)         # [B, L, D + 1]
    assert unpack_prompt(packed, 32)[1].sum(1).tolist() == [6.0, 4.0]  # words + </s>
    assert unpack_prompt(negative, 32)[1].sum(1).tolist() == [1.0, 1.0]


def test_eta0_rollout_equals_plain_pipeline_with_and_without_cfg(policy):
    """Tolerance: 1e-6 on videos in [0, 1] (measured: bitwise equal on CPU float32, g = 3 and 1)."""
    plain = build_tiny_ltx_video_pipeline(0)
    x = noise(policy)
    for g in (3.0, 1.0):
        roll = sample_rollout(policy, PROMPTS, sampling(guidance_scale=g), latents=x)
        torch.testing.assert_close(roll.videos, run_plain(plain, x.clone(), g), atol=1e-6, rtol=0)


def test_schedule_is_the_pipelines_dynamic_shift_of_the_token_count(policy):
    """``LTXPipeline.__call__`` step 5: ``linspace(1, 1/T, T)`` with ``mu = calculate_shift(F' h w, ...)``, the
    checkpoint's ``shift_terminal`` 0.1; a larger video gets a larger shift."""
    sched = policy.pipeline.scheduler
    for size in ((9, 32, 32), (33, 256, 256)):              # 32 and 5120 latent tokens
        _, _, f, h, w = policy.latent_shape(1, *size)
        c = sched.config
        mu = calculate_shift(f * h * w, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        ref = type(sched).from_config(c)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
        timesteps, sigmas = policy.flow_schedule(8, size)
        torch.testing.assert_close(sigmas, ref.sigmas.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(timesteps, ref.timesteps.float(), atol=1e-3, rtol=0)
        assert sigmas[-2].item() == pytest.approx(0.1) and sigmas[-1] == 0
    assert (policy.flow_schedule(8, (33, 256, 256))[1][1:-2] > policy.flow_schedule(8, (9, 32, 32))[1][1:-2]).all()
    with pytest.raises(ValueError, match="video_size"):
        policy.flow_schedule(8)


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
        cast = sub.prompt_embeds.to(torch.bfloat16)                     # the mask column survives any cast exactly
        assert torch.equal(unpack_prompt(cast, 32)[1].float(), unpack_prompt(sub.prompt_embeds, 32)[1])
    finally:
        perturb_lora(policy, scale=0.0)


COMMON = ["model.family=ltx_video", "train.max_steps=1", "train.prompts_per_step=1", "train.num_generations=2",
          "train.sample_batch_size=2", "train.learning_rate=5e-3", "sampling.num_inference_steps=3",
          "sampling.num_frames=9", "sampling.height=32", "sampling.width=32", "sampling.guidance_scale=3.0",
          f"sampling.max_sequence_length={SEQ}", "logging.report_to=none", "data.num_eval_prompts=1"]


def test_one_grpo_step_changes_only_lora(tmp_path):
    """With denoiser gradient checkpointing on (as the GPU recipe)."""
    from pisces_rl.trainer import GRPOTrainer

    cfg = load_config(GRPOConfig, None, [f"output_dir={tmp_path}", *COMMON, "train.train_batch_size=2",
                                         "train.epsilon=0.2", "model.gradient_checkpointing=true"])
    trainer = GRPOTrainer(cfg, rewards={"brightness": brightness})
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/loss"])


def test_one_backprop_step_from_data_changes_only_lora(tmp_path):
    from pisces_rl.trainer import BackpropTrainer

    cfg = load_config(BackpropConfig, None, [f"output_dir={tmp_path}", *COMMON, "train.train_batch_size=1",
                                             "train.teacher_steps=4"])
    trainer = BackpropTrainer(cfg, rewards={"b": brightness}, dataset=video_dataset(2, frames=9, size=32))
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/cd_loss"])
    assert trainer.policy.encode(torch.rand(1, 9, 3, 32, 32)).shape == (1, 8, 2, 4, 4)


def test_saved_lora_loads_into_a_plain_pipeline_and_reproduces_the_policy(policy, tmp_path):
    x = noise(policy)
    pipe = build_tiny_ltx_video_pipeline(0)
    assert isinstance(pipe, LTXPipeline)
    assert_saved_lora_reproduces_policy(
        policy, tmp_path, lambda: sample_rollout(policy, PROMPTS, sampling(), latents=x).videos,
        pipe, lambda p: run_plain(p, x.clone()), atol=1e-6)


def test_timestep_conditioned_decoder_uses_decode_timestep_without_noise():
    """A 0.9.1-style VAE (``timestep_conditioning=True``): ``decode_timestep=0.05`` equals
    ``pipe(decode_timestep=0.05, decode_noise_scale=0)`` (tolerance 1e-6) and differs from ``decode_timestep=0``."""
    pipe = build_tiny_ltx_video_pipeline(0, vae_kwargs={"timestep_conditioning": True})
    lat = torch.randn(2, 8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    fam = LTXVideoFamily(decode_timestep=0.05)
    with torch.no_grad():
        ours, zero = fam.decode(pipe, lat), LTXVideoFamily().decode(pipe, lat)
    assert (ours - zero).abs().max() > 1e-4, "decode_timestep must reach the decoder"
    out = run_plain(pipe, lat.clone(), decode_timestep=0.05, decode_noise_scale=0.0)
    roll_pol = build_policy(model_cfg(family="ltx_video", family_options={"decode_timestep": 0.05}), device="cpu")
    roll_pol.pipeline.vae = pipe.vae
    roll = sample_rollout(roll_pol, PROMPTS, sampling(), latents=lat)
    torch.testing.assert_close(roll.videos, out, atol=1e-6, rtol=0)
