"""The ShapesWorld text-to-video base model: a tiny Wan 2.1-class ``WanPipeline`` trained from scratch.

Components are the real diffusers / transformers classes, sized for a 2-core CPU:

* ``AutoencoderKLWan`` -- trained first on corpus clips (:mod:`.vae`); ``[B, 3, 9, 32, 32]`` videos <->
  ``[B, 16, 5, 8, 8]`` latents (4x spatial, 2x temporal compression);
* ``UMT5EncoderModel`` (2 layers, width 64) with the word-piece tokenizer of
  :func:`pisces_rl.models.build_tiny_tokenizer`, trained jointly with the transformer;
* ``WanTransformer3DModel`` (4 blocks, width 128, patch ``(1, 2, 2)``: 5 x 4 x 4 = 80 video tokens);
* ``FlowMatchEulerDiscreteScheduler(shift=cfg.shift)``.

Training data: ``shapes_corpus(num_videos, split="train")`` clips and captions (held-out captions never appear).
Flow matching (rectified flow, the Wan / SD3 objective) on normalised latents ``x0 = (z - mean) / std``, with
``z ~ q(z | video)`` drawn from the VAE posterior and (mean, std) the per-channel corpus statistics::

    u ~ LogitNormal(logit_mean, logit_std),   sigma = shift * u / (1 + (shift - 1) * u)
    x_sigma = (1 - sigma) * x0 + sigma * eps,  eps ~ N(0, I)
    loss = || v_theta(x_sigma, t = 1000 * sigma, text) - (eps - x0) ||^2

The shift is the scheduler's, so training noise levels are warped like the sampling grid. Captions are replaced by the
empty prompt with probability ``caption_dropout`` (the unconditional branch of classifier-free guidance, which
``WanPipeline`` encodes as ``""``). The saved transformer / text-encoder weights are an exponential moving
average of the trained ones. Text embeddings are built exactly like ``WanPipeline.encode_prompt``: padded to
``max_sequence_length`` tokens, positions after the prompt set to zero -- sample with the same
``max_sequence_length`` (32, the ``SamplingConfig`` default; ``WanPipeline``'s own default is 512).

Example::

    >>> cfg = ShapesBaseModelConfig.quick()
    >>> path = train_shapes_base_model(cfg, "/tmp/shapes_base", progress=False)
    >>> pipe = load_shapes_pipeline(path)                    # a diffusers WanPipeline
    >>> videos = generate_videos(pipe, ["two red squares moving left"])   # [1, 9, 3, 32, 32] in [0, 1]
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import vae as vae_lib

__all__ = ["ShapesBaseModelConfig", "PROFILES", "train_shapes_base_model", "load_shapes_pipeline",
           "generate_videos", "build_text_encoder", "build_transformer", "encode_text", "sample_sigmas",
           "flow_matching_loss", "METADATA_FILE", "RECOMMENDED_SAMPLING"]

METADATA_FILE = "shapes_base_model.json"
RECOMMENDED_SAMPLING = {"num_inference_steps": 16, "guidance_scale": 3.0, "max_sequence_length": 32}
"""Sampling settings the benchmark reports (``benchmarks/shapes_base_model.py``)."""

PROFILES: Dict[str, Dict[str, Any]] = {
    "full": dict(num_videos=4000, vae_base_dim=8, vae_z_dim=16, vae_steps=2000, vae_batch_size=4, vae_lr=2e-3,
                 text_dim=64, text_layers=2, text_heads=4, text_ff_dim=128, num_layers=4, num_heads=4,
                 head_dim=32, ffn_dim=512, steps=2000, batch_size=16, lr=2e-3, warmup_steps=50),
    "quick": dict(num_videos=24, vae_base_dim=4, vae_z_dim=8, vae_steps=12, vae_batch_size=2, vae_lr=2e-3,
                  text_dim=16, text_layers=1, text_heads=2, text_ff_dim=32, num_layers=1, num_heads=2,
                  head_dim=8, ffn_dim=32, steps=30, batch_size=8, lr=2e-3, warmup_steps=5),
}
"""Values of the profile-dependent fields (those left at ``None`` in :class:`ShapesBaseModelConfig`)."""


@dataclass
class ShapesBaseModelConfig:
    """Everything that determines the trained base model. Fields left at ``None`` take the value of ``profile``
    (:data:`PROFILES`): ``"full"`` (the default world model, ~12 min on 2 CPU cores) or ``"quick"`` (tests,
    seconds)."""

    profile: str = "full"                      # preset for the None fields: "full" | "quick"
    seed: int = 0                              # seeds the corpus, every initialisation and every batch
    # ---- data
    num_videos: Optional[int] = None           # training clips, shapes_corpus(split="train") (full 4000)
    num_frames: int = 9                        # frames per clip, 4k+1 (the VAE reads 1 + 4 + 4 ... frames)
    size: int = 32                             # frame side in pixels (multiple of 8)
    paraphrase: bool = False                   # train on paraphrased captions too
    corpus_cache_dir: Optional[str] = None     # shapes_corpus cache (not part of the config hash)
    # ---- VAE (pisces_rl.worlds.shapes.vae)
    vae_base_dim: Optional[int] = None         # width of the first VAE block (full 8)
    vae_z_dim: Optional[int] = None            # latent channels (full 16)
    vae_steps: Optional[int] = None            # autoencoder AdamW steps (full 2000)
    vae_batch_size: Optional[int] = None       # clips per VAE step (full 4)
    vae_lr: Optional[float] = None             # peak VAE learning rate (full 2e-3), cosine to 10 %
    vae_foreground_weight: float = 10.0        # extra loss weight on object pixels
    vae_kl_weight: float = 1e-4                # weight of the per-element KL term
    # ---- text encoder (UMT5) and transformer (Wan)
    text_dim: Optional[int] = None             # UMT5 d_model = transformer text_dim (full 64)
    text_layers: Optional[int] = None          # UMT5 layers (full 2)
    text_heads: Optional[int] = None           # UMT5 heads (full 4)
    text_ff_dim: Optional[int] = None          # UMT5 gated-GELU width (full 128)
    train_text_encoder: bool = True            # False = frozen random text encoder
    max_sequence_length: int = 32              # text tokens (pad with zeros), also the sampling setting
    num_layers: Optional[int] = None           # Wan transformer blocks (full 4)
    num_heads: Optional[int] = None            # attention heads (full 4)
    head_dim: Optional[int] = None             # per-head width (full 32: model width 128)
    ffn_dim: Optional[int] = None              # feed-forward width (full 512)
    freq_dim: int = 256                        # sinusoidal timestep embedding size
    # ---- flow matching
    steps: Optional[int] = None                # transformer AdamW steps (full 2000)
    batch_size: Optional[int] = None           # clips per step (full 16)
    lr: Optional[float] = None                 # peak learning rate (full 2e-3), cosine to 10 %
    warmup_steps: Optional[int] = None         # linear warm-up steps (full 50)
    weight_decay: float = 0.01                 # AdamW weight decay
    max_grad_norm: float = 1.0                 # gradient clipping
    shift: float = 2.0                         # scheduler shift, also applied to the training sigmas
    logit_mean: float = 0.0                    # u ~ LogitNormal(logit_mean, logit_std) before the shift
    logit_std: float = 1.0
    caption_dropout: float = 0.1               # share of empty prompts (classifier-free guidance)
    ema_decay: float = 0.99                    # EMA of the saved weights (0 = save the raw weights)
    num_threads: Optional[int] = None          # torch threads while training (None = unchanged; not hashed)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        for name, value in PROFILES[self.profile].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.num_frames < 5 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 >= 5 (the Wan VAE encodes 1 + 4k frames), got {self.num_frames}")
        if self.size % 8:
            raise ValueError(f"size must be a multiple of 8 (4x VAE x 2x patch), got {self.size}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    @classmethod
    def quick(cls, **overrides) -> "ShapesBaseModelConfig":
        """The tiny test configuration (trains in seconds)."""
        return cls(profile="quick", **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """sha256 (16 hex digits) of the fields that change the trained weights."""
        fields = {k: v for k, v in self.to_dict().items() if k not in ("profile", "corpus_cache_dir", "num_threads")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ components
def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_text_encoder(cfg: ShapesBaseModelConfig, vocab_size: int, seed: int):
    """A small ``UMT5EncoderModel`` (``[B, L]`` token ids -> ``[B, L, text_dim]``)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, d_model=cfg.text_dim, d_kv=cfg.text_dim // cfg.text_heads,
                        d_ff=cfg.text_ff_dim, num_layers=cfg.text_layers, num_heads=cfg.text_heads,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                        is_encoder_decoder=False, feed_forward_proj="gated-gelu")
    return _seeded(seed, lambda: UMT5EncoderModel(config))


def build_transformer(cfg: ShapesBaseModelConfig, seed: int):
    """A small ``WanTransformer3DModel``: latents ``[B, z, F', h, w]`` + text ``[B, L, text_dim]`` -> velocity."""
    from diffusers import WanTransformer3DModel

    return _seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.vae_z_dim, out_channels=cfg.vae_z_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32))


def tokenize(tokenizer, prompts: Sequence[str], max_sequence_length: int):
    """``(input_ids [B, L], attention_mask [B, L])`` exactly as ``WanPipeline`` tokenizes (padding to L)."""
    out = tokenizer(list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def encode_text(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` prompt embeddings, zero after each prompt's last token (``WanPipeline.encode_prompt``)."""
    hidden = text_encoder(input_ids, attention_mask).last_hidden_state
    return hidden * attention_mask[..., None].to(hidden.dtype)


def sample_sigmas(batch_size: int, shift: float, generator: torch.Generator, logit_mean: float = 0.0,
                  logit_std: float = 1.0) -> torch.Tensor:
    """``[B]`` noise levels: ``u = sigmoid(N(logit_mean, logit_std))``, then the scheduler's shift
    ``sigma = shift * u / (1 + (shift - 1) * u)``."""
    u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator))
    return shift * u / (1.0 + (shift - 1.0) * u)


def flow_matching_loss(transformer, x0: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted velocity and ``noise - x0`` at ``x_sigma``.

    Args:
        x0: clean normalised latents ``[B, C, F', h, w]``; ``noise`` the same shape.
        text: prompt embeddings ``[B, L, D]``; ``sigma``: ``[B]`` in (0, 1) (timestep ``1000 * sigma``).
    """
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_sigma = (1.0 - s) * x0 + s * noise
    velocity = transformer(hidden_states=x_sigma, timestep=sigma * 1000.0, encoder_hidden_states=text,
                           return_dict=False)[0]
    return (velocity.float() - (noise - x0)).pow(2).mean()


# ------------------------------------------------------------------------------------------------ training
@contextmanager
def torch_threads(num_threads: Optional[int]):
    """Run the block with ``num_threads`` torch CPU threads (None/0 = unchanged), restoring the setting after."""
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def _train_denoiser(cfg, transformer, text_encoder, ids, mask, mean, std, generator, progress) -> List[float]:
    """Flow-matching loop (module docstring). ``mean``/``std``: normalised posterior ``[N, z, F', h, w]``;
    ``ids``/``mask``: ``[N + 1, L]`` with the empty prompt last. Returns the loss per step."""
    from tqdm.auto import tqdm

    params = list(transformer.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])
    text_encoder.requires_grad_(cfg.train_text_encoder)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    emas = [copy.deepcopy(m) for m in (transformer, text_encoder)] if cfg.ema_decay > 0 else []
    transformer.train()
    text_encoder.train(cfg.train_text_encoder)
    n, empty, losses = mean.shape[0], ids.shape[0] - 1, []
    bar = tqdm(range(cfg.steps), desc="shapes T2V", disable=not progress, leave=False)
    for step in bar:
        index = torch.randint(0, n, (cfg.batch_size,), generator=generator)
        x0 = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        text_index = torch.where(dropped, torch.full_like(index, empty), index)
        sigma = sample_sigmas(cfg.batch_size, cfg.shift, generator, cfg.logit_mean, cfg.logit_std)
        noise = torch.randn(x0.shape, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = vae_lib._lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            text = encode_text(text_encoder, ids[text_index], mask[text_index])
        loss = flow_matching_loss(transformer, x0, text, sigma, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if emas:  # short warm-up of the decay, so early averages are not dominated by the random init
            decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
            _ema_update(emas[0], transformer, decay)
            _ema_update(emas[1], text_encoder, decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if emas:
        transformer.load_state_dict(emas[0].state_dict())
        text_encoder.load_state_dict(emas[1].state_dict())
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return losses


def _curve(values: Sequence[float], points: int = 50) -> List[float]:
    """``values`` averaged over ``points`` equal windows (a compact loss curve for the metadata)."""
    if not values:
        return []
    k = max(1, len(values) // points)
    return [round(sum(values[i:i + k]) / len(values[i:i + k]), 5) for i in range(0, len(values), k)]


def train_shapes_base_model(cfg: ShapesBaseModelConfig, output_dir: str, progress: bool = True) -> str:
    """Train the VAE, then the text encoder + transformer by flow matching; save a ``WanPipeline``.

    Writes ``output_dir`` with ``pipe.save_pretrained`` (loadable by ``WanPipeline.from_pretrained`` and by
    ``build_policy`` with ``pretrained=output_dir``) plus :data:`METADATA_FILE` (config, config hash, seconds
    per phase, loss curves, recommended sampling settings). Deterministic given ``cfg`` (and the thread count).

    Returns:
        ``output_dir``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from pisces_rl.models import build_tiny_tokenizer

    from .corpus import shapes_corpus

    timings: Dict[str, float] = {}
    with torch_threads(cfg.num_threads):
        start = time.perf_counter()
        corpus = shapes_corpus(cfg.num_videos, seed=cfg.seed, num_frames=cfg.num_frames, size=cfg.size,
                               split="train", paraphrase=cfg.paraphrase, cache_dir=cfg.corpus_cache_dir)
        videos = torch.from_numpy(corpus.with_format("numpy", dtype="uint8")[:]["video"]).permute(0, 1, 4, 2, 3)
        captions = list(corpus["caption"])                                   # videos: [N, F, C, H, W] uint8
        timings["corpus"] = time.perf_counter() - start

        start = time.perf_counter()
        vae = vae_lib.build_shapes_vae(cfg.seed, base_dim=cfg.vae_base_dim, z_dim=cfg.vae_z_dim)
        vae_history = vae_lib.train_shapes_vae(
            vae, videos, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, lr=cfg.vae_lr, seed=cfg.seed + 1,
            foreground_weight=cfg.vae_foreground_weight, kl_weight=cfg.vae_kl_weight, progress=progress)
        timings["vae"] = time.perf_counter() - start

        start = time.perf_counter()
        raw_mean, raw_std = vae_lib.encode_videos(vae, videos)               # [N, z, F', h, w]
        latents_mean, latents_std = vae_lib.set_latent_statistics(vae, raw_mean)
        scale = torch.tensor(latents_std).view(1, -1, 1, 1, 1)
        mean, std = vae_lib.normalise_latents(vae, raw_mean), raw_std / scale
        timings["encode"] = time.perf_counter() - start

        start = time.perf_counter()
        tokenizer = build_tiny_tokenizer()
        text_encoder = build_text_encoder(cfg, len(tokenizer), cfg.seed + 2)
        transformer = build_transformer(cfg, cfg.seed + 3)
        ids, mask = tokenize(tokenizer, captions + [""], cfg.max_sequence_length)
        generator = torch.Generator().manual_seed(cfg.seed + 4)
        losses = _train_denoiser(cfg, transformer, text_encoder, ids, mask, mean, std, generator, progress)
        timings["transformer"] = time.perf_counter() - start

        start = time.perf_counter()
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(), transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift))
        os.makedirs(output_dir, exist_ok=True)
        pipe.save_pretrained(output_dir)
        timings["save"] = time.perf_counter() - start

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    metadata = {
        "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "parameters": {"vae": count(vae), "text_encoder": count(text_encoder), "transformer": count(transformer)},
        "latent_shape": [cfg.vae_z_dim, (cfg.num_frames - 1) // 2 + 1, cfg.size // 4, cfg.size // 4],
        "vae_loss_curve": _curve([h["loss"] for h in vae_history]),
        "transformer_loss_curve": _curve(losses),
        "sampling": {**RECOMMENDED_SAMPLING, "num_frames": cfg.num_frames, "height": cfg.size, "width": cfg.size},
        "versions": _versions(),
    }
    with open(os.path.join(output_dir, METADATA_FILE), "w") as handle:
        json.dump(metadata, handle, indent=2)
    return output_dir


def _versions() -> Dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------------ loading / sampling
def load_shapes_pipeline(path: str, device: Optional[str] = None):
    """``WanPipeline.from_pretrained(path)`` (float32, progress bar off), moved to ``device`` if given."""
    from diffusers import WanPipeline

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path!r} holds no diffusers pipeline (model_index.json); train one with "
                                "train_shapes_base_model or `python benchmarks/shapes_base_model.py`")
    pipe = WanPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


@torch.no_grad()
def generate_videos(pipe, prompts: Sequence[str], *, num_frames: int = 9, size: int = 32, seed: int = 0,
                    num_inference_steps: int = RECOMMENDED_SAMPLING["num_inference_steps"],
                    guidance_scale: float = RECOMMENDED_SAMPLING["guidance_scale"],
                    max_sequence_length: int = RECOMMENDED_SAMPLING["max_sequence_length"],
                    batch_size: int = 64) -> torch.Tensor:
    """Sample one video per prompt with ``pipe(...)``: ``[B, F, C, H, W]`` float32 in [0, 1].

    Batches of ``batch_size`` prompts; batch ``i`` uses ``torch.Generator().manual_seed(seed + i)``.
    """
    out = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start:start + batch_size])
        frames = pipe(chunk, num_frames=num_frames, height=size, width=size, output_type="pt",
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      max_sequence_length=max_sequence_length,
                      generator=torch.Generator().manual_seed(seed + i)).frames
        out.append(frames.float().cpu())
    return torch.cat(out)
