"""One GRPO iteration of every model family at its recipe's size: time split and peak memory, on one GPU.

    python benchmarks/gpu_families.py                          # --size recipe on CUDA: < 8 min on one H100
    python benchmarks/gpu_families.py --size tiny              # CPU: the families' tiny test configs, seconds each
    python benchmarks/gpu_families.py --families wan --output gpu_families.json --time-budget 420

For each entry of :data:`ARCHITECTURES` (a published architecture: its denoiser and VAE configs, quoted from the
diffusers conversion script with their commit), ``--size recipe`` builds the pipeline with **random weights**
(nothing is downloaded) through ``family.build_tiny_pipeline(seed, transformer_kwargs=..., vae_kwargs=...,
text_encoder_kwargs=..., **options)``, in bf16 directly on the GPU, and runs one iteration of the real
:class:`~pisces_rl.trainer.GRPOTrainer` (``sample`` -> ``rewards`` -> ``advantages`` -> ``update``) with the
family's shipped recipe (``recipes/configs/...``): its resolution, frames, CFG scale, LoRA, SDE type, train
timestep fraction and micro-batch, with these changes so that all families fit the 8-minute budget:

* ``train.num_generations = sample_batch_size = 2``, ``prompts_per_step = 1``: one rollout forward of 2 videos;
* ``sampling.num_inference_steps = --steps`` (default 4; CogVideoX's trailing DDIM grid needs a divisor of 1000), ``sde_window`` scaled to it: with the recipe's
  ``train_timestep_fraction`` the update trains ``K`` timesteps of one micro-batch.

Measured: ``sample`` (prompt encoding, denoising with log-probs, VAE decode; ``decode`` is the policy's decode
call inside it), ``reward``, ``update`` (forward + backward + optimiser step), and the peak of
``torch.cuda.max_memory_allocated`` over the iteration, with and without denoiser gradient checkpointing (the
"off" row re-runs only the update on the same rollout: sampling has no gradients, its columns are shared). Per
unit: ``s/step`` = one denoising step of one rollout forward (CFG included), ``s/train`` = one trained timestep
of one micro-batch (forward + backward). ``est. recipe it.`` extrapolates to the recipe's whole iteration per
process on ``--processes`` GPUs (linear in the batch: a rough guide, not a measurement).

Not benchmarked: the text encoder (a 1-layer random encoder of the real output width replaces T5/UMT5/Llama/CLIP)
and the reward model (a mean-brightness callable; ``bench_rewards.py`` times the PISCES rewards).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import inspect
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSERS = "huggingface/diffusers@2843b3d37ad7c83b44cdcd098b9c064e1569457d"   # last commit of the scripts below
PROMPTS = ["a red panda eating bamboo in the rain", "two kites flying over a beach at sunset"]
TINY = {"sampling.height": 32, "sampling.width": 32, "sampling.num_frames": 9,   # 9 = 4k+1 (Wan) = 8k+1 (CogVideoX)
        "rewards.temporal_windows": 1}


def _wan(layers, heads, ffn, in_ch=16):
    """``get_transformer_config(model_type)["diffusers_config"]`` of scripts/convert_wan_to_diffusers.py."""
    return dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6, ffn_dim=ffn,
                freq_dim=256, in_channels=in_ch, num_attention_heads=heads, num_layers=layers, out_channels=in_ch,
                patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", text_dim=4096)


_UMT5_XXL = {"d_model": 4096, "num_layers": 1}   # google/umt5-xxl's width; 1 layer (not benchmarked)
_WAN22_VAE = dict(base_dim=160, z_dim=48, is_residual=True, in_channels=12, out_channels=12, decoder_base_dim=256,
                  scale_factor_temporal=4, scale_factor_spatial=16, patch_size=2, clip_output=False,
                  latents_mean=[0.0] * 48, latents_std=[1.0] * 48)  # statistics 0/1 here: they do not change cost
_COG = dict(patch_size=2, patch_size_t=None, patch_bias=True, sample_height=60, sample_width=90, sample_frames=49)

# Each entry: the family adapter and the shipped GPU recipe (a glob under recipes/configs) it mirrors; the
# diffusers classes and the published kwargs (over the classes' defaults, exactly as ``from_config`` in the
# conversion script builds them); the text-encoder width; extra ``build_tiny_pipeline`` options; the source.
ARCHITECTURES: List[Dict[str, Any]] = [
    dict(name="Wan2.1-T2V-1.3B", family="wan", recipe="grpo_short_video_wan.yaml",
         transformer=("WanTransformer3DModel", _wan(30, 12, 8960)), vae=("AutoencoderKLWan", {}),
         text_encoder=_UMT5_XXL, options={},
         source=f"{DIFFUSERS} scripts/convert_wan_to_diffusers.py get_transformer_config('Wan-T2V-1.3B'); "
                "convert_vae(): AutoencoderKLWan() defaults"),
    dict(name="Wan2.1-T2V-14B", family="wan", recipe="grpo_short_video_wan.yaml",
         transformer=("WanTransformer3DModel", _wan(40, 40, 13824)), vae=("AutoencoderKLWan", {}),
         text_encoder=_UMT5_XXL, options={},
         source=f"{DIFFUSERS} scripts/convert_wan_to_diffusers.py get_transformer_config('Wan-T2V-14B'); "
                "the 1.3B recipe's size (no 14B recipe is shipped)"),
    dict(name="Wan2.2-T2V-A14B", family="wan", recipe="grpo_*a14b*.yaml",
         transformer=("WanTransformer3DModel", _wan(40, 40, 13824)), vae=("AutoencoderKLWan", {}),
         text_encoder=_UMT5_XXL, options={"variant": "a14b"},  # two such experts, boundary_ratio 0.875
         source=f"{DIFFUSERS} scripts/convert_wan_to_diffusers.py get_transformer_config('Wan2.2-T2V-A14B') "
                "(transformer and transformer_2), __main__: boundary_ratio=0.875"),
    dict(name="Wan2.2-TI2V-5B", family="wan", recipe="grpo_*ti2v*.yaml",
         transformer=("WanTransformer3DModel", _wan(30, 24, 14336, in_ch=48)), vae=("AutoencoderKLWan", _WAN22_VAE),
         text_encoder=_UMT5_XXL, options={"variant": "ti2v"},  # expand_timesteps=True
         source=f"{DIFFUSERS} scripts/convert_wan_to_diffusers.py get_transformer_config('Wan2.2-TI2V-5B'), "
                "vae22_diffusers_config"),
    dict(name="HunyuanVideo", family="hunyuan_video", recipe="grpo_hunyuan*.yaml",
         transformer=("HunyuanVideoTransformer3DModel", dict(
             in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
             num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
             qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
             rope_theta=256.0, rope_axes_dim=(16, 56, 56), image_condition_type=None)),
         vae=("AutoencoderKLHunyuanVideo", {}),
         text_encoder={"hidden_size": 4096, "num_hidden_layers": 1},          # Llava-Llama-3-8B's width
         options={"text_encoder_2_kwargs": {"hidden_size": 768, "num_hidden_layers": 1}},  # CLIP-L pooled
         source=f"{DIFFUSERS} scripts/convert_hunyuan_video_to_diffusers.py TRANSFORMER_CONFIGS"
                "['HYVideo-T/2-cfgdistill'], convert_vae(): AutoencoderKLHunyuanVideo() defaults"),
    dict(name="CogVideoX-2b", family="cogvideox", recipe="grpo_cogvideox*.yaml",
         tiny={"sampling.max_sequence_length": 32},   # the tiny transformer's max_text_seq_length
         transformer=("CogVideoXTransformer3DModel", dict(_COG, in_channels=16, num_layers=30, num_attention_heads=30,
                                                          use_rotary_positional_embeddings=False)),
         vae=("AutoencoderKLCogVideoX", {"scaling_factor": 1.15258426}),
         text_encoder={"d_model": 4096, "num_layers": 1}, options={"version": "1.0"},   # T5-XXL's width
         source=f"{DIFFUSERS} scripts/convert_cogvideox_to_diffusers.py get_transformer_init_kwargs('1.0'), "
                "argparse comments (2B: 30 layers, 30 heads, no RoPE, VAE scaling 1.15258426)"),
    dict(name="CogVideoX-5b", family="cogvideox", recipe="grpo_cogvideox*.yaml", tiny={"sampling.max_sequence_length": 32},
         transformer=("CogVideoXTransformer3DModel", dict(_COG, in_channels=16, num_layers=42, num_attention_heads=48,
                                                          use_rotary_positional_embeddings=True)),
         vae=("AutoencoderKLCogVideoX", {"scaling_factor": 0.7}),
         text_encoder={"d_model": 4096, "num_layers": 1}, options={"version": "1.0"},
         source=f"{DIFFUSERS} scripts/convert_cogvideox_to_diffusers.py (5B: 42 layers, 48 heads, RoPE, 0.7)"),
    dict(name="Mochi-1-preview", family="mochi", recipe="grpo_mochi*.yaml",
         tiny={"sampling.num_frames": 7},   # 6k+1 frames (the Mochi VAE decodes 6(f-1)+1)
         transformer=("MochiTransformer3DModel", {}), vae=("AutoencoderKLMochi", {}),
         text_encoder={"d_model": 4096, "num_layers": 1}, options={},   # T5-XXL's width
         source="huggingface/diffusers@0a542307296aec403912abc53397328581abed7c scripts/convert_mochi_to_diffusers.py "
                "main(): MochiTransformer3DModel() defaults (48 layers, 24 heads x 128); VAE: AutoencoderKLMochi() "
                "defaults (the script's VAE conversion is commented out)"),
    dict(name="LTX-Video-2B-0.9.0", family="ltx_video", recipe="grpo_ltx_video*.yaml",
         transformer=("LTXVideoTransformer3DModel", {}),       # convert_transformer(): LTXVideoTransformer3DModel()
         vae=("AutoencoderKLLTXVideo", {}),   # get_vae_config("0.9.0") = the class defaults (0.42.1: with the
                                               # mid block's decoder_inject_noise entry, 5 flags)
         text_encoder={"d_model": 4096, "num_layers": 1}, options={},   # google/t5-v1_1-xxl's width
         source="huggingface/diffusers@0871dc6edadd1f4ddd6d674252cbf344d7dffe9f scripts/convert_ltx_to_diffusers.py "
                "convert_transformer(): LTXVideoTransformer3DModel() defaults; get_vae_config('0.9.0'); scheduler "
                "use_dynamic_shifting, base/max shift 0.95/2.05, shift_terminal 0.1"),
    dict(name="text-to-video-ms-1.7b", family="text_to_video_sd", recipe="grpo_text_to_video_sd*.yaml",
         transformer=("UNet3DConditionModel", {}),
         vae=("AutoencoderKL", dict(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2,
                                    down_block_types=["DownEncoderBlock2D"] * 4,
                                    up_block_types=["UpDecoderBlock2D"] * 4,
                                    scaling_factor=0.18215)),
         text_encoder={"hidden_size": 1024, "num_hidden_layers": 1}, options={},   # OpenCLIP ViT-H text width
         source="huggingface/diffusers@4ace7d0483d9b5016575a2d51119c33172c005ed scripts/convert_ms_text_to_video_"
                "to_diffusers.py: UNet3DConditionModel() defaults; VAE: the Stable Diffusion first stage (ch 128, "
                "ch_mult [1,2,4,4], 2 res blocks, z 4)"),
]

NO_CKPT = "n/a: the denoiser has no gradient checkpointing"
COLUMNS = ["architecture", "family", "recipe", "H x W x F", "grad ckpt", "status", "denoiser B params",
           "weights GiB", "peak GiB", "sample s", "decode s", "reward s", "update s", "s/step", "s/train",
           "est. recipe it. s"]


def class_defaults(class_name: str, published: Dict[str, Any]) -> Dict[str, Any]:
    """``published`` over every default of ``diffusers.<class_name>.__init__``: the config ``from_config`` builds."""
    import diffusers

    sig = inspect.signature(getattr(diffusers, class_name).__init__)
    out = {k: p.default for k, p in sig.parameters.items()
           if k != "self" and p.default is not inspect.Parameter.empty and p.kind == p.POSITIONAL_OR_KEYWORD}
    out.update(published)
    return out


def build_kwargs(arch: Dict[str, Any], size: str) -> Dict[str, Any]:
    """The keyword arguments of ``family.build_tiny_pipeline`` for ``arch`` (tiny: only its options)."""
    if size == "tiny":
        return dict(arch["options"])
    (tr_cls, tr), (vae_cls, vae) = arch["transformer"], arch["vae"]
    return dict(arch["options"], transformer_kwargs=class_defaults(tr_cls, tr), vae_kwargs=class_defaults(vae_cls, vae),
                text_encoder_kwargs=dict(arch["text_encoder"]))


def unavailable(arch: Dict[str, Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """Why ``arch`` cannot run in this checkout (family not registered, builder lacks a keyword, no recipe)."""
    from pisces_rl.models import get_family

    try:
        family = get_family(arch["family"])
    except (KeyError, ValueError):
        return f"family not available ({arch['family']!r} is not registered)"
    params = inspect.signature(family.build_tiny_pipeline).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        missing = [k for k in kwargs if k not in params]
        if missing:
            return f"family not available ({arch['family']}.build_tiny_pipeline takes no {', '.join(missing)})"
    if not recipe_path(arch):
        return f"recipe not available (recipes/configs/{arch['recipe']})"
    return None


def recipe_path(arch: Dict[str, Any]) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(ROOT, "recipes", "configs", arch["recipe"])))
    return found[0] if found else None


@contextlib.contextmanager
def build_on(device: torch.device, dtype: torch.dtype):
    """Create modules directly on ``device`` in ``dtype`` (CUDA: a 14B model never exists in fp32 on the CPU)."""
    if device.type == "cpu" and dtype == torch.float32:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def bench_config(path: str, size: str, steps: int, out: str, resolution: Optional[List[int]] = None,
                 tiny: Optional[Dict[str, Any]] = None):
    """The recipe with the overrides of the module docstring (``--size tiny``: also 32x32, 5 frames, fp32)."""
    from pisces_rl.config import GRPOConfig, load_config

    recipe = load_config(GRPOConfig, path)
    s, t = recipe.sampling, recipe.train
    o: Dict[str, Any] = {"output_dir": out, "logging.report_to": "none", "sampling.num_inference_steps": steps,
                         "train.prompts_per_step": 1, "train.num_generations": 2, "train.sample_batch_size": 2,
                         "train.train_batch_size": min(2, t.train_batch_size), "train.gradient_accumulation_steps": 1,
                         "train.max_steps": 1, "rewards.weights": {"brightness": 1.0}, "data.eval_prompts": PROMPTS[:1]}
    if s.sde_window is not None:   # the same fraction of the trajectory
        scale = (steps - 1) / (s.num_inference_steps - 1)
        start = min(steps - 2, round(s.sde_window[0] * scale))
        o["sampling.sde_window"] = [start, max(start + 1, min(steps - 1, round(s.sde_window[1] * scale)))]
    if resolution:
        o.update(dict(zip(("sampling.height", "sampling.width", "sampling.num_frames"), resolution)))
    if size == "tiny":
        o.update(TINY)
        o.update({"train.mixed_precision": "no", "model.dtype": "fp32", **(tiny or {})})
    if size == "tiny" or resolution is not None:
        o["rewards.num_frames"] = min(recipe.rewards.num_frames, o["sampling.num_frames"])
    return recipe, load_config(GRPOConfig, path, o)


def brightness(videos: torch.Tensor, prompts: List[str]) -> torch.Tensor:
    """Mean pixel value of each video ``[B, F, C, H, W]`` in [0, 1] -> ``[B]`` (a cheap real reward)."""
    return videos.float().mean(dim=(1, 2, 3, 4))


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM (Linux)


def _peak_gib(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated``; CPU: the process's peak resident set (``VmHWM``), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20


def run_arch(arch: Dict[str, Any], kwargs: Dict[str, Any], args, rows: List[Dict[str, Any]]) -> None:
    """Build ``arch`` with gradient checkpointing, run one GRPO iteration (the "on" row), then the update again on
    the same rollout with checkpointing off (the "off" row: sampling has no gradients, so it is shared). Appends
    the measured columns to ``rows[-2]`` (on) and ``rows[-1]`` (off); OOM and other failures propagate."""
    from accelerate.state import AcceleratorState, GradientState

    from pisces_rl.models import VideoPolicy, get_family, resolve_dtype
    from pisces_rl.trainer import GRPOTrainer

    device, on, off = torch.device(args.device), rows[-2], rows[-1]
    recipe, cfg = bench_config(recipe_path(arch), args.size, args.steps, tempfile.mkdtemp(dir=args.workdir),
                               args.resolution, arch.get("tiny"))
    on["H x W x F"] = off["H x W x F"] = f"{cfg.sampling.height} x {cfg.sampling.width} x {cfg.sampling.num_frames}"
    dtype = resolve_dtype(cfg.model.dtype) if device.type == "cuda" else torch.float32
    family = get_family(arch["family"])
    with build_on(device, dtype):
        pipe = family.build_tiny_pipeline(seed=0, **kwargs)
    m = cfg.model
    ckpt_ok = getattr(family.denoiser(pipe), "_supports_gradient_checkpointing", True)   # UNet3D: no
    policy = VideoPolicy(pipe, family, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                         lora_target_modules=m.lora_target_modules, dtype=dtype, device=device,
                         gradient_checkpointing=ckpt_ok, finetune=m.finetune)
    AcceleratorState._reset_state(reset_partial_state=True)   # each row may use its recipe's mixed precision
    GradientState._reset_state()
    trainer = GRPOTrainer(cfg, rewards={"brightness": brightness}, policy=policy, prompts=PROMPTS)
    on["denoiser B params"] = sum(p.numel() for p in policy.transformer.parameters()) / 1e9
    if device.type == "cuda":
        on["weights GiB"] = torch.cuda.memory_allocated(device) / 2 ** 30
    decode_s: List[float] = []
    real_decode = policy.decode

    def timed_decode(*a, **k):   # the policy's own decode, timed inside trainer.sample
        begin = _sync(device)
        out = real_decode(*a, **k)
        decode_s.append(_sync(device) - begin)
        return out

    policy.decode = timed_decode
    _reset_peak(device)
    start = _sync(device)
    rollout, group_ids = trainer.sample(0)
    sampled = _sync(device)
    del policy.decode
    scores = trainer.rewards(rollout.videos, rollout.prompts)
    advantages = trainer.advantages(scores, group_ids)
    rewarded = _sync(device)
    sample_peak = _peak_gib(device)
    on.update({"sample s": sampled - start, "decode s": sum(decode_s), "reward s": rewarded - sampled})
    for row, checkpointing in ((on, True), (off, False)):
        if not checkpointing:
            off.update({k: on[k] for k in ("denoiser B params", "weights GiB", "sample s", "decode s", "reward s")
                        if k in on})
            _set_checkpointing(policy.transformer, False)
            trainer.optimizer.zero_grad(set_to_none=True)
        elif not ckpt_ok:
            row["status"] = NO_CKPT
            continue
        _reset_peak(device)
        begin = _sync(device)
        metrics = trainer.update(rollout, advantages)
        row["update s"] = _sync(device) - begin
        row["peak GiB"] = max(sample_peak, _peak_gib(device))
        _per_unit(row, rollout, cfg, recipe, args)
        row["status"] = "ok" if all(math.isfinite(v) for v in metrics.values()) else "ok (non-finite metrics)"


def _set_checkpointing(model: torch.nn.Module, enable: bool) -> None:
    """``disable_gradient_checkpointing`` of diffusers' ModelMixin, or its flags on any other module (a wrapper)."""
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = enable


def _per_unit(row: Dict[str, Any], rollout, cfg, recipe, args) -> None:
    """``s/step``, ``s/train`` and (recipe size) the recipe's estimated iteration per process."""
    from pisces_rl.config import batch_arithmetic
    from pisces_rl.config.grpo import train_timesteps_per_video

    s, t = cfg.sampling, cfg.train
    forwards = len(rollout) // t.sample_batch_size
    trained = t.num_iterations * math.ceil(len(rollout) / t.train_batch_size) * rollout.train_step_indices.shape[1]
    row["s/step"] = (row["sample s"] - row["decode s"]) / (s.num_inference_steps * forwards)
    row["s/train"] = row["update s"] / trained
    if args.size == "tiny":
        return
    try:   # the recipe's iteration per process, linear in videos per forward / micro-batch
        b, rs, rt = batch_arithmetic(recipe, args.processes), recipe.sampling, recipe.train
        row["est. recipe it. s"] = (
            b["videos_per_process"] * (rs.num_inference_steps * row["s/step"] / t.sample_batch_size
                                       + row["decode s"] / len(rollout))
            + b["micro_batches_per_epoch"] * rt.num_iterations * train_timesteps_per_video(rs)
            * row["s/train"] * rt.train_batch_size / t.train_batch_size)
    except Exception:  # noqa: BLE001 - the recipe's batch does not divide over --processes: no estimate
        pass


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args) -> List[Dict[str, Any]]:
    """Every selected architecture x gradient checkpointing on/off -> one row each (failures become rows)."""
    rows: List[Dict[str, Any]] = []
    start, device = time.perf_counter(), torch.device(args.device)
    work = tempfile.TemporaryDirectory(prefix="gpu_families_")   # the trainers' (unused) output directories
    args.workdir = work.name
    wanted = set(args.families or ())
    for arch in [a for a in ARCHITECTURES if not wanted or {a["family"], a["name"]} & wanted]:
        kwargs = build_kwargs(arch, args.size)
        path = recipe_path(arch)
        base = {"architecture": arch["name"], "family": arch["family"],
                "recipe": os.path.relpath(path, ROOT) if path else f"recipes/configs/{arch['recipe']}"}
        reason = unavailable(arch, kwargs)
        if reason is not None:
            rows.append(dict(base, **{"grad ckpt": "on, off", "status": reason}))
        elif time.perf_counter() - start > args.time_budget:
            rows += [dict(base, **{"grad ckpt": c, "status": "skipped (budget)"}) for c in ("on", "off")]
        else:
            rows += [dict(base, **{"grad ckpt": c}) for c in ("on", "off")]
            try:
                run_arch(arch, kwargs, args, rows)
            except torch.OutOfMemoryError:
                _mark(rows, "OOM", "OOM (already with checkpointing)")
            except Exception as err:  # noqa: BLE001 - one failing family must not end the benchmark
                message = str(err).splitlines()[0][:120] if str(err) else ""
                _mark(rows, f"error: {type(err).__name__}: {message}", "not run (error above)")
            _free(device)
        for row in rows[-2:] if reason is None else rows[-1:]:
            print(f"  {row['architecture']} ckpt={row['grad ckpt']}: {row['status']}", file=sys.stderr, flush=True)
    work.cleanup()
    return rows


def _mark(rows: List[Dict[str, Any]], failure: str, after_on: str) -> None:
    """The failed row gets ``failure``: the "off" row if the "on" row finished, else both (off: ``after_on``)."""
    on, off = rows[-2], rows[-1]
    if "status" in on:
        off["status"] = "OOM" if failure == "OOM" else failure
    else:
        on["status"], off["status"] = failure, after_on


def markdown(rows: List[Dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=None, help="family or architecture names (default: all)")
    parser.add_argument("--size", choices=("tiny", "recipe"), default=None,
                        help="recipe: published architectures at the recipe's size (default on CUDA); tiny: the "
                             "families' tiny test configs at 32x32x5 (default on CPU)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps sampled (the recipe's are extrapolated)")
    parser.add_argument("--resolution", type=lambda v: [int(x) for x in v.lower().split("x")], default=None,
                        help="HxWxF instead of the recipe's (e.g. 240x416x17 for a smaller GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--processes", type=int, default=8, help="GPUs of the recipe's launch, for the estimate")
    parser.add_argument("--time-budget", type=float, default=360.0,
                        help="seconds; rows not started by then are 'skipped (budget)' (360 leaves the last "
                             "row ~2 min of the 8-minute goal)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--output", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.size = args.size or ("recipe" if args.device.startswith("cuda") else "tiny")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(threads)
    what = (f"published architectures, random weights, {'bf16' if args.device.startswith('cuda') else 'fp32'}"
            if args.size == "recipe" else "the families' tiny test configs, fp32")
    print(f"One GRPO iteration per row ({what}; device {args.device}; {args.steps} denoising steps, 2 videos, "
          f"1 micro-batch x K trained steps). Text encoders: 1 random layer of the real width (not benchmarked); "
          f"reward: mean brightness (the reward model is not benchmarked: see bench_rewards.py). Memory: "
          f"{'torch.cuda.max_memory_allocated' if args.device.startswith('cuda') else 'peak RSS (VmHWM)'}.\n")
    print(markdown(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"size": args.size, "device": args.device, "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
