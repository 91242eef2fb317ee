"""The ``text_to_video_sd`` family (diffusers ``TextToVideoSDPipeline``: ε-prediction UNet3D, per-frame 2D VAE, CLIP)
on a tiny random pipeline built in code: its own DDIM loop equals ``sample_rollout`` at eta 0, the ``ddim`` noise
type re-scores with ratio 1, GRPO and backprop steps move only the LoRA, and the saved LoRA loads into a plain
pipeline."""
from types import SimpleNamespace

import pytest
import torch

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
from pisces_rl.models import build_policy, build_tiny_text_to_video_sd_pipeline
from pisces_rl.models.text_to_video_sd import TextToVideoSDFamily, enable_unet_lora
from pisces_rl.rollout import rescore_log_prob, sample_rollout
from pisces_rl.trainer import BackpropTrainer, GRPOTrainer
from _models import brightness, train_moves_only_lora

PROMPTS = ["a red circle moving left", "two blue squares"]
FAMILY = "model.family=text_to_video_sd"
SIZE = ["sampling.num_frames=2", "sampling.height=8", "sampling.width=8", "sampling.num_inference_steps=3"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tuned_policy():
    """The tiny policy with a perturbed LoRA (B != 0), so the adapter changes the model."""
    cfg = SimpleNamespace(pretrained="tiny", family="text_to_video_sd", dtype="fp32", lora_rank=4, lora_alpha=4,
                          lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_path=None,
                          gradient_checkpointing=False, seed=0)
    policy = build_policy(cfg, device="cpu")
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen(1)) * 0.3)
    return policy


def sampling(**overrides):
    cfg = dict(num_frames=4, height=16, width=16, num_inference_steps=4, guidance_scale=4.0, eta=0.0, sde_type="auto",
               train_timestep_fraction=1.0, decode_chunk_size=0, negative_prompt="", max_sequence_length=16)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def policy():
    return tuned_policy()


def test_eta_zero_rollout_is_the_pipelines_ddim_loop(policy):
    """``pipe(...)`` (its DDIMScheduler loop, eta 0, CFG 4 with the empty negative prompt) and ``sample_rollout`` with
    the ddim type at eta 0 on the same generator: the same videos within 1e-5 (measured 4e-7); "auto" is ddim."""
    r = sample_rollout(policy, PROMPTS, sampling(), generator=gen(3))
    frames = policy.pipeline(PROMPTS, num_frames=4, height=16, width=16, num_inference_steps=4, guidance_scale=4.0,
                             eta=0.0, generator=gen(3), output_type="pt").frames
    assert r.sde_type == "ddim" and float(r.sigmas[-1]) == 0.0
    assert frames.shape == r.videos.shape == (2, 4, 3, 16, 16)
    torch.testing.assert_close(r.videos, frames, atol=1e-5, rtol=0)
    assert torch.equal(r.log_probs, torch.zeros(2, 4))


def test_ddim_rescore_gives_ratio_one_and_the_reference_differs(policy):
    r = sample_rollout(policy, PROMPTS, sampling(eta=1.0, sde_type="ddim"), generator=gen(4), decode=False)
    assert r.train_step_indices.shape == (2, 3)                     # the last step (to sigma 0) is deterministic
    for step in range(r.num_steps):
        new = rescore_log_prob(policy, r, step)
        torch.testing.assert_close(torch.exp(new.log_prob - r.log_probs[:, step]), torch.ones(2), atol=1e-6, rtol=0)
    with policy.lora_disabled():
        ref = rescore_log_prob(policy, r, 1)
    assert (ref.log_prob - r.log_probs[:, 1]).abs().max() > 1e-4


def test_encode_decode_and_refused_scheduler_settings(policy):
    videos = torch.rand(1, 2, 3, 8, 8)
    latents = policy.encode(videos)
    assert latents.shape == policy.latent_shape(1, 2, 8, 8) == (1, 4, 2, 8, 8)
    assert policy.decode(latents).shape == videos.shape
    pipe = build_tiny_text_to_video_sd_pipeline()
    pipe.scheduler.register_to_config(clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample=False"):
        TextToVideoSDFamily().validate(pipe)
    with pytest.raises(ValueError, match="multiples of 2"):
        policy.latent_shape(1, 2, 9, 8)


def test_saved_lora_loads_into_a_plain_pipeline(policy, tmp_path):
    """``policy.save_lora`` writes diffusers' ``unet.``-prefixed file. diffusers 0.42's UNet3DConditionModel lacks
    PeftAdapterMixin, so a plain pipeline's ``load_lora_weights`` raises AttributeError until
    ``enable_unet_lora(pipe)``; then it loads, changes the output and reproduces the policy's."""
    policy.save_lora(str(tmp_path))
    plain = build_tiny_text_to_video_sd_pipeline()
    kwargs = dict(num_frames=2, height=8, width=8, num_inference_steps=2, guidance_scale=4.0, output_type="pt")
    before = plain(PROMPTS, generator=gen(5), **kwargs).frames
    with pytest.raises(AttributeError, match="load_lora_adapter"):
        plain.load_lora_weights(str(tmp_path))
    enable_unet_lora(plain).load_lora_weights(str(tmp_path))
    after = plain(PROMPTS, generator=gen(5), **kwargs).frames
    ours = policy.pipeline(PROMPTS, generator=gen(5), **kwargs).frames
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, ours, atol=1e-5, rtol=0)
    assert type(plain.unet).__name__ == "UNet3DConditionModel"        # what save_pretrained writes as _class_name
    import pickle
    assert type(pickle.loads(pickle.dumps(plain.unet))) is type(plain.unet)


def test_grpo_step_changes_only_lora(tmp_path):
    cfg = load_config(GRPOConfig, None, [
        f"output_dir={tmp_path}", FAMILY, *SIZE, "train.max_steps=1", "train.prompts_per_step=1",
        "train.num_generations=2", "train.sample_batch_size=2", "train.train_batch_size=2",
        "train.learning_rate=5e-3", "train.epsilon=0.2", "sampling.eta=1.0", "train.beta=0.01",
        "logging.report_to=none"])
    assert cfg.sampling.sde_type == "auto"
    trainer = GRPOTrainer(cfg, rewards={"bright": brightness})
    metrics = train_moves_only_lora(trainer)
    assert "train/kl" in metrics or "train/loss" in metrics


def test_backprop_step_changes_only_lora(tmp_path):
    cfg = load_config(BackpropConfig, None, [
        f"output_dir={tmp_path}", FAMILY, *SIZE, "sampling.height=16", "sampling.width=16", "train.max_steps=1",
        "train.prompts_per_step=1", "train.num_generations=2", "train.sample_batch_size=2",
        "train.train_batch_size=2", "train.teacher_steps=3",
        "train.learning_rate=5e-3", "train.dataset_size=2", "logging.report_to=none", "data.num_eval_prompts=1"])
    trainer = BackpropTrainer(cfg, rewards={"bright": brightness})
    train_moves_only_lora(trainer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_policy_on_cuda(dtype):
    """fp16 (the recipe's, DDPO's) and bf16 UNet with fp32 LoRA on CUDA: ddim rollout, ratio 1, LoRA gradients."""
    cfg = SimpleNamespace(pretrained="tiny", family="text_to_video_sd", dtype=dtype, lora_rank=4, lora_alpha=4,
                          lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_path=None,
                          gradient_checkpointing=False, seed=0)
    policy = build_policy(cfg, device="cuda")
    r = sample_rollout(policy, PROMPTS, sampling(eta=1.0), generator=torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(r.latents).all() and torch.isfinite(r.log_probs).all() and r.videos.dtype == torch.float32
    new = rescore_log_prob(policy, r, 1)
    torch.testing.assert_close(torch.exp(new.log_prob - r.log_probs[:, 1]), torch.ones(2, device="cuda"),
                               atol=1e-4, rtol=0)
    new.log_prob.sum().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
