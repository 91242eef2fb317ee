"""VideoPolicy: tiny in-code Wan pipeline, peft LoRA wrapping, full fine-tuning, diffusers-format save/load, errors."""
import logging
import time

import pytest
import torch
from diffusers import WanPipeline

from pisces_rl.models import VideoPolicy, WanFamily, build_policy, build_tiny_tokenizer, build_tiny_wan_pipeline, get_family

from _models import model_cfg, perturb_lora

PROMPTS = ["two red squares moving left", "a blue circle"]
CALL = dict(num_frames=5, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
            max_sequence_length=16, output_type="pt")


def run_pipe(pipe, seed=0):
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **CALL).frames


def velocity_inputs(policy, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(policy.latent_shape(2, 5, 32, 32), generator=gen)
    emb, neg = policy.encode_prompts(PROMPTS, "", do_cfg=True, max_sequence_length=16)
    return x, torch.tensor(700.0), emb, neg


# ------------------------------------------------------------------ tiny pipeline
def test_tiny_pipeline_is_fast_and_deterministic_per_seed():
    start = time.perf_counter()
    a, b, c = build_tiny_wan_pipeline(0), build_tiny_wan_pipeline(0), build_tiny_wan_pipeline(1)
    assert time.perf_counter() - start < 10.0
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs for the same seed"
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), f"{name} identical for different seeds"
    before = torch.random.get_rng_state()
    build_tiny_wan_pipeline(3)
    assert torch.equal(before, torch.random.get_rng_state()), "building must not touch the global RNG"


def test_plain_pipeline_call_produces_videos_in_unit_range():
    pipe = build_tiny_wan_pipeline(0)
    out = run_pipe(pipe)
    assert out.shape == (2, 5, 3, 32, 32)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0
    assert torch.equal(out, run_pipe(pipe)), "same generator seed must give the same video"


def test_tokenizer_is_t5_like_and_spells_unknown_words():
    tok = build_tiny_tokenizer()
    ids = tok("Two RED squares zigzag!", padding="max_length", max_length=16).input_ids
    assert ids[:3] == tok("two red squares").input_ids[:3]
    assert tok.unk_token_id not in ids
    eos = ids.index(tok.eos_token_id)
    assert ids[eos + 1:] == [tok.pad_token_id] * (16 - eos - 1) and tok.pad_token_id == 0


def test_tiny_pipeline_survives_save_and_from_pretrained(tmp_path):
    pipe = build_tiny_wan_pipeline(0)
    pipe.save_pretrained(tmp_path)
    loaded = WanPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    text = "a yellow star bouncing quickly"
    assert loaded.tokenizer(text).input_ids == pipe.tokenizer(text).input_ids
    torch.testing.assert_close(run_pipe(loaded), run_pipe(pipe), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ LoRA policy
def test_initial_policy_equals_base_model():
    policy = build_policy(model_cfg(), device="cpu")
    base = build_tiny_wan_pipeline(0)
    x, t, emb, neg = velocity_inputs(policy)
    with torch.no_grad():
        ours = policy.predict_velocity(x, t, emb, neg, guidance_scale=1.0)
        ref = base.transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(run_pipe(policy.pipeline), run_pipe(base), atol=1e-6, rtol=0)


def test_only_lora_parameters_are_trainable_and_fp32():
    policy = build_policy(model_cfg(lora_rank=2), device="cpu")
    trainable = {n for n, p in policy.transformer.named_parameters() if p.requires_grad}
    params = policy.trainable_parameters()
    assert trainable and len(params) == len(trainable)
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    # 2 blocks x 2 attentions x 4 targets x (A, B)
    assert len(trainable) == 2 * 2 * 4 * 2
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in params)
    for module in (policy.pipeline.vae, policy.pipeline.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_lora_init_is_seeded_and_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    a = build_policy(model_cfg(), device="cpu").lora_state_dict()
    b = build_policy(model_cfg(), device="cpu").lora_state_dict()
    c = build_policy(model_cfg(seed=1), device="cpu").lora_state_dict()
    assert torch.equal(before, torch.random.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    a_keys = [k for k in a if "lora_A" in k]
    assert not all(torch.equal(a[k], c[k]) for k in a_keys)
    assert all(torch.count_nonzero(a[k]) == 0 for k in a if "lora_B" in k)  # B = 0: starts as the base model


def test_lora_disabled_gives_base_outputs_and_restores_adapter():
    policy = build_policy(model_cfg(), device="cpu")
    perturb_lora(policy, scale=0.2)
    base = build_tiny_wan_pipeline(0)
    x, t, emb, neg = velocity_inputs(policy)
    with torch.no_grad():
        tuned = policy.predict_velocity(x, t, emb, neg, 4.0)
        with policy.lora_disabled():
            reference = policy.predict_velocity(x, t, emb, neg, 4.0)
            assert not policy.trainable_parameters()
        again = policy.predict_velocity(x, t, emb, neg, 4.0)
        base_policy_free = base.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(4),
                                            encoder_hidden_states=torch.cat([neg, emb]), return_dict=False)[0]
    uncond, cond = base_policy_free.chunk(2)
    torch.testing.assert_close(reference, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=0)
    assert (tuned - reference).abs().max() > 1e-3
    torch.testing.assert_close(again, tuned, atol=0, rtol=0)
    assert len(policy.trainable_parameters()) == 32


def test_save_lora_loads_into_plain_wan_pipeline(tmp_path):
    # rank != alpha: the loaded pipeline must also get the alpha/rank scaling from the saved metadata
    policy = build_policy(model_cfg(lora_rank=4, lora_alpha=2), device="cpu")
    perturb_lora(policy, scale=0.2)
    policy.save_lora(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()

    plain = build_tiny_wan_pipeline(0)
    without = run_pipe(plain)
    plain.load_lora_weights(str(tmp_path))
    with_lora = run_pipe(plain)
    assert (with_lora - without).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, run_pipe(policy.pipeline), atol=1e-5, rtol=0)


def test_save_lora_accepts_a_gathered_full_state_dict(tmp_path):
    from safetensors.torch import load_file

    policy = build_policy(model_cfg(), device="cpu")
    perturb_lora(policy, scale=0.2)
    policy.save_lora(str(tmp_path / "a"))
    policy.save_lora(str(tmp_path / "b"), state_dict=policy.transformer.state_dict())
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) == 32
    assert all(k.startswith("transformer.") and "lora" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_lora_resumes_and_lora_path_initialises(tmp_path):
    policy = build_policy(model_cfg(), device="cpu")
    perturb_lora(policy, scale=0.2)
    policy.save_lora(str(tmp_path))
    saved = policy.lora_state_dict()

    fresh = build_policy(model_cfg(), device="cpu")
    assert not all(torch.equal(saved[k], v) for k, v in fresh.lora_state_dict().items())
    fresh.load_lora(str(tmp_path))
    assert all(torch.equal(saved[k], v) for k, v in fresh.lora_state_dict().items())

    from_path = build_policy(model_cfg(lora_path=str(tmp_path)), device="cpu")
    assert all(torch.equal(saved[k], v) for k, v in from_path.lora_state_dict().items())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in from_path.trainable_parameters())


def test_load_lora_with_wrong_rank_or_targets_is_a_clear_error(tmp_path):
    build_policy(model_cfg(lora_rank=4), device="cpu").save_lora(str(tmp_path))
    with pytest.raises(ValueError, match="lora_rank"):
        build_policy(model_cfg(lora_rank=2, lora_path=str(tmp_path)), device="cpu")
    with pytest.raises(ValueError, match="lora_target_modules"):
        build_policy(model_cfg(lora_target_modules=["to_q"], lora_path=str(tmp_path)), device="cpu")
    with pytest.raises(FileNotFoundError, match="lora_path"):
        build_policy(model_cfg(lora_path=str(tmp_path / "missing")), device="cpu")


# ------------------------------------------------------------------ full fine-tuning
def perturb_all(policy, seed=2, scale=0.05):
    """Move every trainable weight (full fine-tuning) so the policy differs from the base model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_full_finetune_trains_every_denoiser_weight_in_fp32():
    policy = build_policy(model_cfg(finetune="full"), device="cpu")
    named = dict(policy.transformer.named_parameters())
    assert len(policy.trainable_parameters()) == len(named) == 69     # the whole tiny transformer, no adapter
    assert all(p.requires_grad and p.dtype == torch.float32 for p in named.values())
    assert not any("lora" in n for n in named) and not getattr(policy.transformer, "peft_config", None)
    assert policy.weights_dirname == "transformer" and policy.reference is not None
    assert not any(p.requires_grad for p in policy.reference.parameters())
    for module in (policy.pipeline.vae, policy.pipeline.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_full_finetune_reference_is_the_frozen_base_denoiser():
    policy = build_policy(model_cfg(finetune="full"), device="cpu")
    base = build_tiny_wan_pipeline(0)
    x, t, emb, neg = velocity_inputs(policy)
    with torch.no_grad():
        start = policy.predict_velocity(x, t, emb, neg, 4.0)
        perturb_all(policy)
        tuned = policy.predict_velocity(x, t, emb, neg, 4.0)
        with policy.lora_disabled():
            reference = policy.predict_velocity(x, t, emb, neg, 4.0)
        with policy.reference_model():
            assert torch.equal(policy.predict_velocity(x, t, emb, neg, 4.0), reference)
        again = policy.predict_velocity(x, t, emb, neg, 4.0)
        out = base.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(4),
                               encoder_hidden_states=torch.cat([neg, emb]), return_dict=False)[0]
    uncond, cond = out.chunk(2)
    torch.testing.assert_close(reference, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=0)
    torch.testing.assert_close(start, reference, atol=1e-6, rtol=0)      # the initial policy is the base model
    assert (tuned - reference).abs().max() > 1e-3
    torch.testing.assert_close(again, tuned, atol=0, rtol=0)


def test_full_finetune_keeps_fp32_master_weights_and_a_half_precision_reference():
    pipe = build_tiny_wan_pipeline(0)
    policy = VideoPolicy(pipe, WanFamily(), dtype=torch.bfloat16, device="cpu", finetune="full")
    assert policy.transformer.dtype == torch.float32 and policy.reference.dtype == torch.bfloat16
    x, t, emb, neg = velocity_inputs(policy)                             # text embeddings in bf16
    assert emb.dtype == torch.bfloat16
    with torch.no_grad():
        tuned = policy.predict_velocity(x, t, emb, neg, 4.0)             # fp32 inputs to the fp32 denoiser
        with policy.lora_disabled():
            reference = policy.predict_velocity(x, t, emb, neg, 4.0)     # bf16 inputs to the bf16 copy
    assert tuned.dtype == reference.dtype == torch.float32
    assert (tuned - reference).abs().max() < 0.1                         # same weights, bf16 rounding only


def test_full_finetune_saves_a_diffusers_denoiser(tmp_path):
    from diffusers import WanTransformer3DModel

    policy = build_policy(model_cfg(finetune="full"), device="cpu")
    perturb_all(policy)
    policy.save_weights(str(tmp_path / "a"))
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path / "a"))
    ours = policy.transformer.state_dict()
    assert loaded.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    assert not list((tmp_path / "a").glob("*lora*"))
    # a gathered (e.g. ZeRO-3 / EMA) state dict, keys possibly prefixed by a DDP wrapper, is what gets written
    state = {f"module.{k}": v + 1.0 for k, v in policy.transformer.named_parameters()}
    policy.save_lora(str(tmp_path / "b"), state_dict=state)             # save_lora = save_weights with full FT
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path / "b")).state_dict()
    assert all(torch.equal(loaded[k[len("module."):]], v) for k, v in state.items())
    with pytest.raises(ValueError, match="not WanTransformer3DModel entries"):
        policy.save_weights(str(tmp_path / "c"), state_dict={"no_such.weight": torch.zeros(1)})


def test_full_finetune_rejects_lora_only_operations(tmp_path):
    from pisces_rl.config import ConfigError, GRPOConfig, load_config

    with pytest.raises(ValueError, match="model.lora_path"):
        build_policy(model_cfg(finetune="full", lora_path=str(tmp_path)), device="cpu")
    with pytest.raises(ConfigError, match="model.lora_path: .*finetune=full"):
        load_config(GRPOConfig, overrides=["model.finetune=full", f"model.lora_path={tmp_path}"])
    with pytest.raises(ConfigError, match="model.finetune"):
        load_config(GRPOConfig, overrides=["model.finetune=partial"])
    policy = build_policy(model_cfg(finetune="full"), device="cpu")
    for call in (policy.lora_state_dict, lambda: policy.load_lora(str(tmp_path))):
        with pytest.raises(ValueError, match="finetune='full'"):
            call()


# ------------------------------------------------------------------ configuration errors
def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        build_policy(model_cfg(pretrained=str(tmp_path / "no_such_model")), device="cpu")


def test_pretrained_directory_loads_through_from_pretrained(tmp_path):
    build_tiny_wan_pipeline(5).save_pretrained(tmp_path)
    policy = build_policy(model_cfg(pretrained=str(tmp_path)), device="cpu")
    ref = build_tiny_wan_pipeline(5).transformer.state_dict()
    ours = policy.transformer.state_dict()
    assert torch.equal(ours["proj_out.weight"], ref["proj_out.weight"])


@pytest.mark.parametrize("frames", [4, 6, 0])
def test_bad_num_frames_names_the_4k_plus_1_rule(frames):
    policy = build_policy(model_cfg(), device="cpu")
    with pytest.raises(ValueError, match=r"num_frames=.*4k\+1"):
        policy.latent_shape(1, frames, 32, 32)


def test_bad_size_family_dtype_and_targets_are_clear_errors():
    policy = build_policy(model_cfg(), device="cpu")
    assert policy.latent_shape(3, 9, 48, 32) == (3, 16, 3, 6, 4)
    with pytest.raises(ValueError, match="multiples of 16"):
        policy.latent_shape(1, 5, 24, 32)
    with pytest.raises(ValueError, match="unknown model.family 'cogvideo'"):
        get_family("cogvideo")
    with pytest.raises(ValueError, match="model.dtype"):
        build_policy(model_cfg(dtype="int8"), device="cpu")
    with pytest.raises(ValueError, match="lora_target_modules"):
        build_policy(model_cfg(lora_target_modules=["no_such_layer"]), device="cpu")
    with pytest.raises(ValueError, match="non-empty list"):
        policy.encode_prompts("a single string")


def test_half_precision_on_cpu_falls_back_to_fp32(caplog):
    with caplog.at_level(logging.WARNING):
        policy = build_policy(model_cfg(dtype="bf16"), device="cpu")
    assert policy.dtype == torch.float32 and policy.transformer.dtype == torch.float32
    assert "float32" in caplog.text
