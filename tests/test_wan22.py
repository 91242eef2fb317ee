"""Wan 2.2 through ``model.family=wan``: the two-expert A14B layout and TI2V-5B (tiny random pipelines built in code).

A14B: ``transformer`` denoises ``t >= boundary_ratio * 1000``, ``transformer_2`` the rest (diffusers
``WanPipeline.__call__``); the policy trains both as one module (``WanExperts``), LoRA on both or on the expert
named in ``model.family_options.experts``. TI2V: one transformer with per-token timesteps and the 48-channel VAE.
Tolerances: videos 1e-4 (the plain pipeline runs CFG as two calls, we run one batched call), log-prob ratios 1e-5.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
from pisces_rl.models import VideoPolicy, build_tiny_wan22_pipeline, get_family
from pisces_rl.models.wan22 import LORA_WEIGHT_NAMES, WanExperts
from pisces_rl.rollout import rescore_log_prob, sample_rollout
from pisces_rl.trainer import BackpropTrainer, GRPOTrainer

from test_policy import perturb_lora
from _models import brightness

PROMPTS = ["two red squares moving left", "a blue circle"]
STEPS = 4           # tiny schedule (shift 3): timesteps 1000, 857.7, 602.2, 8.9 -> boundary 875 after step 0
CALL = dict(num_frames=5, height=32, width=32, num_inference_steps=STEPS, guidance_scale=4.0, max_sequence_length=16)
TI2V = dict(height=32, width=32)    # the 16x-spatial VAE and 2x2 patches: multiples of 32


def sampling(**overrides):
    """Sampler settings (eta = 0: the deterministic sampler that must equal ``pipe(...)``)."""
    return SimpleNamespace(**{**CALL, "eta": 0.0, **overrides})


def policy(variant="a14b", seed=0, **options):
    return VideoPolicy(build_tiny_wan22_pipeline(variant, seed), get_family("wan", options), lora_rank=2, lora_alpha=4)


def run_plain(pipe, latents, **kw):
    return pipe(PROMPTS, latents=latents.clone(), output_type="pt", **{**CALL, **kw}).frames


def noise(pol, seed=0, height=32, width=32):
    return torch.randn(pol.latent_shape(2, 5, height, width), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny A14B and TI2V pipelines saved with ``save_pretrained`` (what ``model.pretrained=DIR`` loads)."""
    root = tmp_path_factory.mktemp("wan22")
    for variant in ("a14b", "ti2v"):
        build_tiny_wan22_pipeline(variant).save_pretrained(root / variant)
    return root


# ------------------------------------------------------------------ A14B: sampling, switch step, guidance_scale_2
def test_a14b_eta0_rollout_equals_pipeline_with_lora_saved_and_loaded(tmp_path):
    pol = policy(guidance_scale_2=2.0)
    assert isinstance(pol.transformer, WanExperts) and pol.transformer.boundary_timestep == 875.0
    timesteps, _ = pol.flow_schedule(STEPS)
    assert (timesteps >= 875.0).tolist() == [True, False, False, False]      # the expert switches after step 0
    x = noise(pol)
    plain = build_tiny_wan22_pipeline("a14b")
    base = run_plain(plain, x, guidance_scale_2=2.0)
    torch.testing.assert_close(sample_rollout(pol, PROMPTS, sampling(), latents=x).videos, base, atol=1e-4, rtol=0)
    # the switch step and guidance_scale_2 matter: a different boundary / scale gives another video
    assert (run_plain(plain, x) - base).abs().max() > 1e-3                   # guidance_scale_2 = guidance_scale
    plain.register_to_config(boundary_ratio=0.5)                            # switch after step 1
    assert (run_plain(plain, x, guidance_scale_2=2.0) - base).abs().max() > 1e-3
    plain.register_to_config(boundary_ratio=0.875)

    perturb_lora(pol)                                                       # LoRA on both experts
    tuned = sample_rollout(pol, PROMPTS, sampling(), latents=x).videos
    pol.save_lora(str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(LORA_WEIGHT_NAMES.values())
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / LORA_WEIGHT_NAMES["transformer_2"]))
    plain.load_lora_weights(str(tmp_path))
    plain.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAMES["transformer_2"], load_into_transformer_2=True)
    loaded = run_plain(plain, x, guidance_scale_2=2.0)
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, tuned, atol=1e-4, rtol=0)


def test_a14b_ratio_is_one_for_batches_that_mix_experts():
    pol = policy(guidance_scale_2=2.0)
    perturb_lora(pol)
    r = sample_rollout(pol, PROMPTS, sampling(eta=0.5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for step in range(STEPS - 1):                                       # the whole batch on one expert
            new = rescore_log_prob(pol, r, step)
            torch.testing.assert_close(torch.exp(new.log_prob - r.log_probs[:, step]), torch.ones(2), atol=1e-5, rtol=0)
        steps = torch.tensor([0, 2])                                        # video 0: transformer, video 1: transformer_2
        assert pol.transformer.route(r.timesteps[steps]).tolist() == [True, False]
        new = rescore_log_prob(pol, r, steps)
    ratio = torch.exp(new.log_prob - r.log_probs[torch.arange(2), steps])
    torch.testing.assert_close(ratio, torch.ones(2), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ A14B: training through the configs
def grpo_config(tmp_path, pretrained, *overrides):
    base = [f"output_dir={tmp_path}", f"model.pretrained={pretrained}", "model.lora_rank=2", "train.max_steps=1",
            "train.prompts_per_step=1", "train.num_generations=2", "train.sample_batch_size=2",
            "train.train_batch_size=2", "train.learning_rate=5e-3", "train.epsilon=0.2",
            "sampling.num_inference_steps=3", "sampling.num_frames=5", "sampling.height=16", "sampling.width=16",
            "logging.report_to=none", "data.num_eval_prompts=1"]
    return load_config(GRPOConfig, None, [*base, *overrides])


def params(trainer, trainable):
    return {n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters()
            if p.requires_grad == trainable}


def moved(before, after, prefix):
    return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]


def test_a14b_grpo_step_trains_both_experts_lora_only(tmp_path, saved):
    trainer = GRPOTrainer(grpo_config(tmp_path, saved / "a14b"), rewards={"brightness": brightness})
    lora0, base0 = params(trainer, True), params(trainer, False)
    assert {k.split(".")[0] for k in lora0} == {"transformer", "transformer_2"}
    trainer.train()
    lora1, base1 = params(trainer, True), params(trainer, False)
    assert moved(lora0, lora1, "transformer.") and moved(lora0, lora1, "transformer_2.")
    assert not moved(base0, base1, "")
    resumed = VideoPolicy(build_tiny_wan22_pipeline("a14b"), get_family("wan"), lora_rank=2, lora_alpha=8)
    resumed.load_lora(str(tmp_path / "lora"))                               # resume restores both experts
    ours = trainer.policy.lora_state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in resumed.lora_state_dict().items()) and len(ours) == 64

    # `pisces-rl generate --lora` fuses both experts' files into the plain pipeline: same videos as the policy
    from pisces_rl.cli import generate_videos

    perturb_lora(trainer.policy)
    trainer.policy.save_lora(str(tmp_path / "perturbed"))
    cfg, prompts = trainer.config, ["a blue circle"]
    fused = generate_videos(prompts, cfg.model, cfg.sampling, lora=str(tmp_path / "perturbed"), seed=3)
    plain = generate_videos(prompts, cfg.model, cfg.sampling, seed=3)
    with torch.no_grad():
        ours = sample_rollout(trainer.policy, prompts, dataclasses.replace(cfg.sampling, eta=0.0),
                              generator=torch.Generator().manual_seed(3)).videos
    torch.testing.assert_close(fused, ours, atol=1e-4, rtol=0)
    assert (fused - plain).abs().max() > 1e-3


def test_a14b_lora_on_one_chosen_expert(tmp_path, saved):
    cfg = grpo_config(tmp_path, saved / "a14b", "model.family_options={experts: [transformer_2]}")
    trainer = GRPOTrainer(cfg, rewards={"brightness": brightness})
    lora0, base0 = params(trainer, True), params(trainer, False)
    assert lora0 and all(k.startswith("transformer_2.") for k in lora0)
    assert not any("lora" in n for n, _ in trainer.policy.transformer.transformer.named_parameters())
    trainer.train()
    lora1, base1 = params(trainer, True), params(trainer, False)
    assert moved(lora0, lora1, "transformer_2.") and not moved(base0, base1, "")
    assert [p.name for p in (tmp_path / "lora").glob("*.safetensors")] == [LORA_WEIGHT_NAMES["transformer_2"]]
    with pytest.raises(FileNotFoundError, match="family_options.experts"):
        policy().load_lora(str(tmp_path / "lora"))                          # a both-experts policy: clear error


def test_a14b_backprop_step_changes_only_lora(tmp_path, saved):
    base = [f"output_dir={tmp_path}", f"model.pretrained={saved / 'a14b'}", "model.lora_rank=2", "train.max_steps=1",
            "train.prompts_per_step=1", "train.num_generations=2", "train.sample_batch_size=2",
            "train.train_batch_size=2", "train.teacher_steps=3", "train.learning_rate=5e-3", "train.dataset_size=2",
            "sampling.num_inference_steps=3", "sampling.height=16", "sampling.width=16", "logging.report_to=none",
            "data.num_eval_prompts=1", "train.latent_source=generated"]
    trainer = BackpropTrainer(load_config(BackpropConfig, None, base), rewards={"brightness": brightness})
    with torch.no_grad():
        for p in trainer.policy.trainable_parameters():                     # B = 0 would leave A without gradient
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    lora0, base0 = params(trainer, True), params(trainer, False)
    trainer.train()
    lora1, base1 = params(trainer, True), params(trainer, False)
    assert moved(lora0, lora1, "") and not moved(base0, base1, "")


def test_a14b_full_finetune_of_one_expert_saves_it_in_diffusers_format(tmp_path):
    from diffusers import WanTransformer3DModel

    pol = VideoPolicy(build_tiny_wan22_pipeline("a14b"), get_family("wan", {"experts": ["transformer_2"]}),
                      finetune="full")
    trainable = {n for n, p in pol.transformer.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer_2.{n}" for n, _ in pol.transformer.transformer_2.named_parameters()}
    with torch.no_grad():
        pol.transformer.transformer_2.proj_out.weight.add_(1.0)
    pol.save_weights(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer_2"]
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path / "transformer_2"))
    assert torch.equal(loaded.proj_out.weight, pol.transformer.transformer_2.proj_out.weight)
    assert not torch.equal(loaded.proj_out.weight, pol.reference.transformer_2.proj_out.weight)


def test_family_option_errors_name_the_fix(saved):
    from pisces_rl.models import build_tiny_wan_pipeline

    with pytest.raises(ValueError, match="not options of model.family='wan'"):
        get_family("wan", {"guidance_scale_3": 1.0})
    with pytest.raises(ValueError, match="single transformer"):
        VideoPolicy(build_tiny_wan_pipeline(0), get_family("wan", {"guidance_scale_2": 3.0}))
    with pytest.raises(ValueError, match="non-empty subset"):
        policy(experts=["transformer_3"])
    assert load_config(GRPOConfig, None, [f"model.pretrained={saved / 'a14b'}",
                                          "model.family_options={guidance_scale_2: 3.0}"]).model.family_options == \
        {"guidance_scale_2": 3.0}


# ------------------------------------------------------------------ TI2V-5B (text-to-video)
def test_ti2v_rollout_ratio_and_lora_into_plain_pipeline(tmp_path):
    pol = policy("ti2v")
    assert pol.latent_shape(2, 5, 32, 32) == (2, 48, 2, 2, 2)
    with pytest.raises(ValueError, match="multiples of 32"):
        pol.latent_shape(1, 5, 16, 16)
    x = noise(pol, **TI2V)
    plain = build_tiny_wan22_pipeline("ti2v")
    base = run_plain(plain, x, **TI2V)
    torch.testing.assert_close(sample_rollout(pol, PROMPTS, sampling(**TI2V), latents=x).videos, base, atol=1e-4, rtol=0)
    perturb_lora(pol)
    r = sample_rollout(pol, PROMPTS, sampling(eta=0.5, **TI2V), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for step in range(STEPS - 1):
            new = rescore_log_prob(pol, r, step)
            torch.testing.assert_close(torch.exp(new.log_prob - r.log_probs[:, step]), torch.ones(2), atol=1e-5, rtol=0)
    tuned = sample_rollout(pol, PROMPTS, sampling(**TI2V), latents=x).videos
    pol.save_lora(str(tmp_path))
    plain.load_lora_weights(str(tmp_path))
    loaded = run_plain(plain, x, **TI2V)
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, tuned, atol=1e-4, rtol=0)


def test_ti2v_grpo_step_changes_only_lora(tmp_path, saved):
    trainer = GRPOTrainer(grpo_config(tmp_path, saved / "ti2v", "sampling.height=32", "sampling.width=32"),
                          rewards={"brightness": brightness})
    lora0, base0 = params(trainer, True), params(trainer, False)
    trainer.train()
    lora1, base1 = params(trainer, True), params(trainer, False)
    assert moved(lora0, lora1, "") and not moved(base0, base1, "")
