"""The CogVideoX family (``CogVideoXPipeline``, a v-prediction VP model) on tiny random pipelines built in code:
η = 0 sampling equals ``pipe(...)``, ratio 1 when re-scored, GRPO / direct-backprop steps move only the LoRA, the
saved LoRA loads into the plain pipeline, and the 2-process ZeRO-2 recipe."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline
from safetensors.torch import load_file

from _launch import ROOT, accelerate_launch
from _models import brightness, model_cfg, train_moves_only_lora, video_dataset
from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
from pisces_rl.models import CogVideoXFamily, build_policy, build_tiny_cogvideox_pipeline, get_family
from pisces_rl.models.base import VideoPolicy
from pisces_rl.models.cogvideox import COGVIDEOX_2B_SCHEDULER
from pisces_rl.models.vp import sigma_from_alpha_bar
from pisces_rl.rollout import rescore_log_prob, sample_rollout
from pisces_rl.trainer import BackpropTrainer, GRPOTrainer

PROMPTS = ["two red squares moving left", "a blue circle"]
SIZE = dict(num_frames=9, height=32, width=32)  # 9 = 8k+1 frames: 3 latent frames (4 with CogVideoX 1.5's padding)


def sampling_cfg(**overrides):
    cfg = dict(**SIZE, num_inference_steps=4, guidance_scale=6.0, eta=0.5, sde_type="dance_grpo",
               train_timestep_fraction=1.0, decode_chunk_size=0, negative_prompt="", max_sequence_length=32)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def tuned_policy(version="1.0", dtype=torch.float32):
    """A tiny CogVideoX policy whose LoRA is perturbed (B != 0), so the adapter changes the model."""
    policy = VideoPolicy(build_tiny_cogvideox_pipeline(0, version=version), CogVideoXFamily(), lora_rank=4,
                         lora_alpha=8, dtype=dtype)
    perturb(policy.transformer)
    return policy


def perturb(transformer, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def pipe_call(pipe, noise, output_type="pt"):
    """The plain pipeline on the same initial noise (ours ``[B, C, F, h, w]``, the pipeline's ``[B, F, C, h, w]``):
    ``(frames, final latents [B, C, F, h, w])``."""
    final = {}

    def keep(pipe_, i, t, kwargs):
        final["latents"] = kwargs["latents"].permute(0, 2, 1, 3, 4)
        return kwargs

    frames = pipe(PROMPTS, **SIZE, num_inference_steps=4, guidance_scale=6.0, max_sequence_length=32,
                  latents=noise.permute(0, 2, 1, 3, 4), output_type=output_type, callback_on_step_end=keep).frames
    return frames, final["latents"]


# --------------------------------------------------------------------------------- sampling = pipe(...)
@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_eta_zero_sampling_equals_the_pipeline(version):
    """CogVideoX-2b layout (sin-cos positions) and 1.5 layout (rotary, patch_size_t=2 padding): our flow-coordinate
    Euler sampler with η = 0 reproduces CogVideoXDDIMScheduler's loop with CFG 6, on the same initial noise.
    Tolerance: 1e-4 absolute on latents and on [0, 1] pixels (measured ~5e-6: float32 rounding of the flow <-> VP
    rescaling)."""
    policy = tuned_policy(version)
    pipe = policy.pipeline
    shape = policy.latent_shape(2, **SIZE)
    assert shape == (2, 4, 3 if version == "1.0" else 4, 4, 4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(policy, PROMPTS, sampling_cfg(eta=0.0), latents=noise)
    pipe.scheduler.set_timesteps(4)
    assert torch.equal(r.timesteps.long(), pipe.scheduler.timesteps)              # 999, 749, 499, 249 (trailing)
    assert float(r.sigmas[0]) == 1.0 and float(r.sigmas[-1]) == 0.0              # zero terminal SNR, alpha_prev = 1
    frames, latents = pipe_call(pipe, noise)
    torch.testing.assert_close(r.latents[:, -1], latents, atol=1e-4, rtol=0)
    assert r.videos.shape == (2, 9, 3, 32, 32)
    torch.testing.assert_close(r.videos, frames, atol=1e-4, rtol=0)
    assert torch.equal(r.log_probs, torch.zeros(2, 4)) and r.train_step_indices.shape == (2, 0)
    with policy.lora_disabled():  # the adapter is in the comparison: without it the result differs
        base = sample_rollout(policy, PROMPTS, sampling_cfg(eta=0.0), latents=noise, decode=False)
    assert (base.latents[:, -1] - r.latents[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("sde_type,version,dtype", [("dance_grpo", "1.0", torch.float32),
                                                     ("flow_grpo", "1.5", torch.bfloat16)])
def test_rescore_with_the_same_weights_gives_ratio_one(sde_type, version, dtype):
    """Both flow noise types; the 1.5 layout with a bf16 base (LoRA, latents and log-probs stay float32)."""
    policy = tuned_policy(version, dtype)
    r = sample_rollout(policy, PROMPTS, sampling_cfg(sde_type=sde_type), generator=torch.Generator().manual_seed(2),
                       decode=False)
    assert r.latents.dtype == r.log_probs.dtype == torch.float32 and r.prompt_embeds.dtype == dtype
    assert r.train_step_indices.shape == (2, 3)  # the last step (to sigma = 0) is deterministic
    for step in range(r.num_steps - 1):
        new = rescore_log_prob(policy, r, step)
        assert torch.equal(new.log_prob, r.log_probs[:, step]), "same weights, same batch: bit-identical log-prob"
        ratio = torch.exp(rescore_log_prob(policy, r, step, batch_indices=[1]).log_prob - r.log_probs[1, step])
        # a sub-batch may round differently: 1e-5 in float32, 1e-3 with bf16 matmuls
        torch.testing.assert_close(ratio, torch.ones(1), atol=1e-5 if dtype == torch.float32 else 1e-3, rtol=0)
    with policy.lora_disabled():
        ref = rescore_log_prob(policy, r, 1)
    assert (ref.log_prob - r.log_probs[:, 1]).abs().max() > 1e-4, "the reference (LoRA off) must score differently"


def test_the_5b_dpm_scheduler_keeps_its_alpha_bars():
    """CogVideoX-5b ships CogVideoXDPMScheduler (snr_shift_scale=1): the schedule is the DDIM grid on *its* ᾱ's."""
    config = dict(COGVIDEOX_2B_SCHEDULER, snr_shift_scale=1.0)
    dpm = CogVideoXDPMScheduler(**config)
    pipe = SimpleNamespace(scheduler=dpm)
    timesteps, sigmas = CogVideoXFamily().flow_schedule(pipe, 50, torch.device("cpu"))
    ddim = CogVideoXDDIMScheduler(**config)
    ddim.set_timesteps(50)
    assert torch.equal(timesteps.long(), ddim.timesteps)
    expected = sigma_from_alpha_bar(dpm.alphas_cumprod[timesteps.long()].float())
    torch.testing.assert_close(sigmas[:-1], expected, atol=1e-6, rtol=0)
    _, s3 = CogVideoXFamily().flow_schedule(SimpleNamespace(scheduler=CogVideoXDDIMScheduler(
        **COGVIDEOX_2B_SCHEDULER)), 50, torch.device("cpu"))
    assert bool((s3[1:-1] > sigmas[1:-1] + 1e-3).all()), "snr_shift_scale=3 (2b) must give noisier levels than 1 (5b)"


def test_shapes_text_length_and_the_vae_maps():
    """8k+1 frames, multiples of 16, the 2b's fixed text length, and encode = posterior mean x scaling_factor
    (1.5: one leading copy of the first latent frame, which decode drops)."""
    family = get_family("cogvideox")
    assert family.sde_type == "ddim"
    pipe = build_tiny_cogvideox_pipeline(0, version="1.5")
    for frames in (5, 8, 13):
        with pytest.raises(ValueError, match="8k\\+1"):
            family.latent_shape(pipe, 1, frames, 32, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        family.latent_shape(pipe, 1, 9, 24, 32)
    tiny_2b = build_tiny_cogvideox_pipeline(0)
    with pytest.raises(ValueError, match="sampling.max_sequence_length=32"):
        family.encode_prompts(tiny_2b, PROMPTS, "", True, 16, torch.device("cpu"), torch.float32)
    videos = torch.rand(2, 9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = family.encode(pipe, videos)
        mean = pipe.vae.encode(videos.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean
        assert latents.shape == family.latent_shape(pipe, 2, 9, 16, 16) == (2, 4, 4, 2, 2)
        torch.testing.assert_close(latents[:, :, 1:], mean * pipe.vae.config.scaling_factor, atol=1e-6, rtol=0)
        assert torch.equal(latents[:, :, 0], latents[:, :, 1])
        decoded = family.decode(pipe, latents)
        assert decoded.shape == videos.shape and 0 <= decoded.min() and decoded.max() <= 1
        torch.testing.assert_close(decoded, family.decode(pipe, torch.cat([latents[:, :, 1:2] * 0 + 7,
                                                                           latents[:, :, 1:]], 2)), atol=0, rtol=0)


# --------------------------------------------------------------------------------- trainers and LoRA
COG = ["model.family=cogvideox", "sampling.num_frames=9", "sampling.height=16", "sampling.width=16",
       "sampling.num_inference_steps=4", "sampling.sde_type=dance_grpo", "logging.report_to=none",
       "train.max_steps=1", "train.prompts_per_step=1", "train.num_generations=2", "train.sample_batch_size=2",
       "train.learning_rate=5e-3", "data.num_eval_prompts=1"]


def test_grpo_and_backprop_steps_move_only_the_lora(tmp_path):
    cfg = load_config(GRPOConfig, None, [*COG, f"output_dir={tmp_path / 'grpo'}", "train.train_batch_size=2",
                                         "train.epsilon=0.2"])
    trainer = GRPOTrainer(cfg, rewards={"brightness": brightness})
    assert isinstance(trainer.policy.family, CogVideoXFamily)
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/loss"])
    card = (tmp_path / "grpo" / "lora" / "README.md").read_text()  # the model card's snippet runs for this family
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(compile("\n".join(ln for ln in code.splitlines() if not ln.startswith("export_to_video")), "card", "exec"),
         scope)  # noqa: S102
    assert isinstance(scope["pipe"], CogVideoXPipeline) and scope["pipe"].get_list_adapters()["transformer"]
    assert len(scope["video"]) == 9

    # direct backprop from data: videos -> encode -> one-step jump -> decode -> reward
    cfg = load_config(BackpropConfig, None, [*COG, f"output_dir={tmp_path / 'bp'}", "train.train_batch_size=1",
                                             "train.teacher_steps=4", "train.dataset_size=2"])
    trainer = BackpropTrainer(cfg, rewards={"b": brightness}, dataset=video_dataset(2, frames=9))
    perturb(trainer.policy.transformer)  # LoRA B = 0 at init would leave the A matrices without gradient
    metrics = train_moves_only_lora(trainer)
    assert np.isfinite(metrics["train/cd_loss"]) and np.isfinite(metrics["reward/b/mean"])


def test_saved_lora_loads_into_the_plain_pipeline(tmp_path):
    policy = build_policy(model_cfg(family="cogvideox"), device="cpu")
    perturb(policy.transformer)
    policy.save_lora(str(tmp_path))
    noise = torch.randn(policy.latent_shape(2, **SIZE), generator=torch.Generator().manual_seed(0))
    plain = build_tiny_cogvideox_pipeline(0)
    before = pipe_call(plain, noise, "latent")[1]
    plain.load_lora_weights(str(tmp_path))
    after = pipe_call(plain, noise, "latent")[1]
    assert (after - before).abs().max() > 1e-3, "the loaded LoRA does not change the output"
    ours = sample_rollout(policy, PROMPTS, sampling_cfg(eta=0.0), latents=noise, decode=False)
    torch.testing.assert_close(after, ours.latents[:, -1], atol=1e-4, rtol=0)


@pytest.mark.distributed
def test_recipe_two_processes_deepspeed_zero2(tmp_path):
    """The long-video GRPO recipe on 2 CPU processes under DeepSpeed ZeRO-2 with the tiny CogVideoX (a family
    other than Wan): two iterations, the saved LoRA moved away from its B = 0 start, and the checkpoint's two ZeRO-2
    optimiser shards (one per rank, each half of the fp32 LoRA) hold exactly the weights rank 0 saved."""
    args = ["--config", "recipes/configs/grpo_long_video_tiny_cpu.yaml", "model.family=cogvideox",
            "train.max_steps=2", "train.prompts_per_step=2", "train.num_generations=2", "train.sample_batch_size=1",
            "train.train_batch_size=1", "sampling.num_inference_steps=4", "sampling.num_frames=9",
            "sampling.height=16", "sampling.width=16", "sampling.sde_type=dance_grpo", "rewards.num_frames=2",
            "logging.report_to=none", "data.num_eval_prompts=1", "model.lora_rank=4", "model.lora_alpha=8",
            "train.learning_rate=1e-2", f"output_dir={tmp_path}"]
    proc = accelerate_launch("zero2", ROOT / "recipes" / "grpo_long_video.py", args, num_processes=2, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 2
    assert summary["batch"]["prompts_per_process"] == 1
    weights = load_file(str(next((tmp_path / "lora").glob("*.safetensors"))))
    assert weights and all(4 in t.shape for t in weights.values())
    moved = [k for k, t in weights.items() if "lora_B" in k and t.abs().max() > 0]
    assert moved, "the saved LoRA B matrices are still zero: training did not move the adapter"
    # ZeRO-2: each rank's optimiser updated its own half of the fp32 LoRA; together they are the weights rank 0 saved
    ckpt = tmp_path / "checkpoints" / "checkpoint-000002" / "pytorch_model"
    shards = [torch.load(ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu",
                         weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"] for r in (0, 1)]
    saved = torch.cat([t.flatten() for t in weights.values()])
    master = torch.cat([part.detach() for shard in shards for part in shard])[:saved.numel()]
    assert all(part.abs().max() > 0 for shard in shards for part in shard), "a rank's shard is empty"
    assert torch.equal(master.sort().values, saved.sort().values), "the ranks' shards disagree with the saved LoRA"
