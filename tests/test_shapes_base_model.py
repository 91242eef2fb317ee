"""ShapesWorld base model: quick training, save -> WanPipeline / build_policy, determinism, latent conventions."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

from pisces_rl.models import build_policy, get_family
from pisces_rl.rollout import sample_rollout
from pisces_rl.worlds.shapes import render_videos, sample_scene
from pisces_rl.worlds.shapes import vae as vae_lib
from pisces_rl.worlds.shapes.base_model import (METADATA_FILE, PROFILES, ShapesBaseModelConfig, encode_text,
                                                generate_videos, load_shapes_pipeline, sample_sigmas, tokenize,
                                                train_shapes_base_model)

COMPONENTS = ("transformer", "vae", "text_encoder")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = ShapesBaseModelConfig.quick()
    path = train_shapes_base_model(cfg, str(tmp_path_factory.mktemp("shapes_base") / "a"), progress=False)
    return cfg, path


def weights(path, component):
    folder = os.path.join(path, component)
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    out = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def test_config_profiles_and_hash():
    full, quick = ShapesBaseModelConfig(), ShapesBaseModelConfig.quick(steps=7)
    assert full.steps == PROFILES["full"]["steps"] and full.vae_steps == PROFILES["full"]["vae_steps"]
    assert quick.steps == 7 and quick.num_layers == PROFILES["quick"]["num_layers"]
    assert full.config_hash() == ShapesBaseModelConfig(num_threads=2).config_hash()   # threads are not hashed
    assert full.config_hash() != ShapesBaseModelConfig(seed=1).config_hash()
    with pytest.raises(ValueError, match="4k\\+1"):
        ShapesBaseModelConfig(num_frames=8)
    with pytest.raises(ValueError, match="profile"):
        ShapesBaseModelConfig(profile="huge")


def test_sigmas_follow_the_scheduler_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = sample_sigmas(1000, 1.0, torch.Generator().manual_seed(0))
    shifted = sample_sigmas(1000, 3.0, torch.Generator().manual_seed(0))
    assert 0 < plain.min() and plain.max() < 1 and abs(plain.median().item() - 0.5) < 0.05
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))        # same u, shifted like the scheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    sigma = sched.sigmas[:6]
    u = sigma / (3 - 2 * sigma)                                          # undo the shift -> an even grid
    assert torch.allclose(u.diff(), u.diff()[:1].expand(5), atol=1e-4) and u[0] == 1


def test_foreground_weights_mark_object_pixels():
    video = torch.from_numpy(render_videos([sample_scene(3)], num_frames=5, size=32))   # [1, F, C, H, W]
    x = video.permute(0, 2, 1, 3, 4) * 2 - 1
    w = vae_lib.foreground_weights(x, 10.0)
    assert w.shape == (1, 1, 5, 32, 32) and set(w.unique().tolist()) == {1.0, 11.0}
    share = (w > 1).float().mean().item()
    assert 0.01 < share < 0.4                                            # objects, not the background


def test_quick_training_writes_metadata_and_losses_decrease(trained):
    cfg, path = trained
    meta = json.load(open(os.path.join(path, METADATA_FILE)))
    assert meta["config_hash"] == cfg.config_hash() and meta["config"]["profile"] == "quick"
    assert set(meta["seconds"]) >= {"corpus", "vae", "encode", "transformer"}
    assert sum(meta["seconds"].values()) < 60                            # the quick profile trains in seconds
    vae_curve, t2v_curve = meta["vae_loss_curve"], meta["transformer_loss_curve"]
    assert sum(vae_curve[-3:]) < 0.9 * sum(vae_curve[:3]), vae_curve
    assert sum(t2v_curve[-3:]) < 0.95 * sum(t2v_curve[:3]), t2v_curve
    assert meta["latent_shape"] == [cfg.vae_z_dim, 5, 8, 8]


def test_saved_pipeline_loads_with_diffusers_and_samples(trained):
    cfg, path = trained
    pipe = WanPipeline.from_pretrained(path)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (2, 4)
    assert any(abs(m) > 0 for m in pipe.vae.config.latents_mean)        # corpus statistics were stored
    videos = generate_videos(load_shapes_pipeline(path), ["a red circle moving left", "two blue squares staying still"],
                             num_inference_steps=2)
    assert videos.shape == (2, 9, 3, 32, 32) and 0 <= videos.min() and videos.max() <= 1
    # the training text path is the pipeline's prompt encoding
    prompts = ["a red circle moving left", ""]
    ids, mask = tokenize(pipe.tokenizer, prompts, cfg.max_sequence_length)
    with torch.no_grad():
        ours = encode_text(pipe.text_encoder, ids, mask)
        theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=cfg.max_sequence_length)
    torch.testing.assert_close(ours, theirs)


def test_latent_normalisation_matches_the_policy_decode(trained):
    _, path = trained
    pipe = load_shapes_pipeline(path)
    videos = torch.from_numpy(render_videos([sample_scene(i) for i in range(2)], num_frames=9, size=32))
    raw, _ = vae_lib.encode_videos(pipe.vae, videos)
    direct = vae_lib.decode_latents(pipe.vae, raw)
    with torch.no_grad():
        via_pipeline = get_family("wan").decode(pipe, vae_lib.normalise_latents(pipe.vae, raw))
    torch.testing.assert_close(direct, via_pipeline, atol=1e-5, rtol=1e-5)


def test_build_policy_loads_the_directory_and_rolls_out(trained):
    _, path = trained
    cfg = SimpleNamespace(pretrained=path, family="wan", dtype="fp32", lora_rank=4, lora_alpha=4,
                          lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_path=None,
                          gradient_checkpointing=False, seed=0)
    policy = build_policy(cfg, device="cpu")
    lora = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    for target in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(f".{target}.lora_A" in n for n in lora), target
    sampling = SimpleNamespace(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=3.0,
                               eta=0.5, train_timestep_fraction=1.0, decode_chunk_size=0, negative_prompt="",
                               max_sequence_length=32)
    rollout = sample_rollout(policy, ["a green triangle moving up"] * 2, sampling, torch.Generator().manual_seed(0))
    assert rollout.videos.shape == (2, 9, 3, 32, 32)
    assert rollout.latents.shape[2:] == (8, 5, 8, 8) and torch.isfinite(rollout.log_probs).all()


def test_training_is_deterministic(trained, tmp_path):
    cfg, path = trained
    again = train_shapes_base_model(ShapesBaseModelConfig.quick(), str(tmp_path / "b"), progress=False)
    for component in COMPONENTS:
        a, b = weights(path, component), weights(again, component)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{component} differs between two runs with one seed"
    assert json.load(open(os.path.join(again, "vae", "config.json")))["latents_mean"] == \
        json.load(open(os.path.join(path, "vae", "config.json")))["latents_mean"]
