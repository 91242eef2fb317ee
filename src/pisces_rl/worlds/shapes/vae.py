"""The ShapesWorld video autoencoder: a small ``AutoencoderKLWan`` trained from scratch on corpus clips.

A random Wan VAE decodes noise, so the world's VAE is trained, briefly, as an autoencoder with a small KL
term. To make that cheap it uses the Wan 2.2 layout (``is_residual=True``: parameter-free space/time-to-channel
shortcuts around every down/up block, which carry the signal from the first step) with a 2x2 pixel patchify in
front, and a single down stage that halves space and time:

* pixels ``[B, 3, F, 32, 32]`` in [-1, 1] -> patchify ``[B, 12, F, 16, 16]`` -> one down block (2x space,
  2x time) -> latents ``[B, z, (F-1)/2 + 1, 8, 8]`` (4x spatial, 2x temporal compression, ``F = 4k+1``);
* config ``scale_factor_spatial=4`` and ``scale_factor_temporal=2`` tell ``WanPipeline`` the latent grid.

Training loss (per element, videos in [-1, 1]): ``w * (|x_hat - x| + (x_hat - x)^2)`` averaged with the
weights ``w = 1 + foreground_weight * [pixel differs from its frame's median colour by > 0.1]`` (objects cover
~5-10 % of a frame; without the weight the autoencoder settles on the background first), plus
``kl_weight * KL(q(z|x) || N(0, I))`` averaged over latent elements. The log-variance bias starts at
``logvar_init`` so the posterior noise is small from the start.

After training, :func:`set_latent_statistics` stores the per-channel mean and std of the corpus latents as
``latents_mean`` / ``latents_std`` in the VAE config, which is how ``WanPipeline`` (and the policy's decode)
normalise latents: ``z_model = (z - mean) / std``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["shapes_vae_config", "build_shapes_vae", "vae_loss", "train_shapes_vae", "encode_videos",
           "decode_latents", "reconstruct_videos", "set_latent_statistics", "normalise_latents", "foreground_weights"]


def shapes_vae_config(base_dim: int = 8, z_dim: int = 16, num_res_blocks: int = 1) -> Dict:
    """``AutoencoderKLWan`` keyword arguments of the world's VAE (4x spatial, 2x temporal compression).

    The block widths are ``[base_dim, 2 base_dim, 2 base_dim]``; the residual shortcuts need the second width to
    divide ``8 x`` the first, which ``dim_mult=[2, 2]`` satisfies for any ``base_dim``.
    """
    return dict(
        base_dim=base_dim, z_dim=z_dim, dim_mult=[2, 2], num_res_blocks=num_res_blocks, attn_scales=[],
        temperal_downsample=[True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_spatial=4, scale_factor_temporal=2, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )


def build_shapes_vae(seed: int, logvar_init: float = -6.0, **config) -> "AutoencoderKLWan":  # noqa: F821
    """A freshly initialised world VAE (seeded in a forked RNG; the global torch RNG is untouched).

    Args:
        seed: initialisation seed.
        logvar_init: initial bias of the posterior log-variance channels (posterior std ``exp(logvar_init / 2)``).
        **config: overrides of :func:`shapes_vae_config` arguments (``base_dim``, ``z_dim``, ``num_res_blocks``).
    """
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**shapes_vae_config(**config))
    z_dim = vae.config.z_dim
    with torch.no_grad():
        vae.quant_conv.bias[z_dim:].fill_(logvar_init)
    return vae


def foreground_weights(x: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights ``[B, 1, F, H, W]``: ``1 + weight`` on object pixels, 1 on the background.

    Args:
        x: videos ``[B, C, F, H, W]`` in [-1, 1]; a pixel is foreground when some channel differs from the frame's
            per-channel median (the background colour) by more than ``threshold`` (in [0, 1] units).
    """
    background = x.flatten(3).median(dim=3).values[..., None, None]
    foreground = ((x - background).abs().amax(dim=1, keepdim=True) > 2 * threshold).to(x.dtype)
    return 1.0 + weight * foreground


def vae_loss(vae, x: torch.Tensor, *, foreground_weight: float = 10.0, kl_weight: float = 1e-4,
             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Autoencoder loss of a batch (see the module docstring).

    Args:
        vae: an ``AutoencoderKLWan``.
        x: videos ``[B, C, F, H, W]`` in [-1, 1], ``F = 4k+1``.
        generator: for the posterior sample (reproducible training).
    Returns:
        ``(loss, {"recon": ..., "kl": ..., "mse": ...})`` (floats are detached, ``mse`` in [-1, 1] units).
    """
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, dtype=x.dtype)
    x_hat = vae.decode(z).sample
    err = x_hat - x
    w = foreground_weights(x, foreground_weight)
    recon = ((err.abs() + err.pow(2)) * w).mean() / w.mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = recon + kl_weight * kl
    return loss, {"recon": recon.item(), "kl": kl.item(), "mse": err.pow(2).mean().item()}


def _lr_at(step: int, total: int, lr: float, warmup: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_fraction * lr``."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))
    return lr * warm * (final_fraction + (1.0 - final_fraction) * cosine)


def train_shapes_vae(vae, videos: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
                     warmup_steps: int = 20, foreground_weight: float = 10.0, kl_weight: float = 1e-4,
                     max_grad_norm: float = 1.0, progress: bool = True,
                     callback: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
    """Train ``vae`` in place with AdamW on random batches of ``videos``; deterministic given ``seed``.

    Args:
        videos: the corpus ``[N, F, C, H, W]`` in [0, 1] (uint8 is accepted and scaled).
        steps / batch_size / lr / warmup_steps: optimisation (cosine decay to 10 % of ``lr``).
    Returns:
        per-step history ``[{"step", "loss", "recon", "kl", "mse", "lr"}]``.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    history: List[Dict[str, float]] = []
    bar = tqdm(range(steps), desc="shapes VAE", disable=not progress, leave=False)
    for step in bar:
        index = torch.randint(0, videos.shape[0], (batch_size,), generator=generator)
        x = _to_model_space(videos[index])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup_steps)
        loss, stats = vae_loss(vae, x, foreground_weight=foreground_weight, kl_weight=kl_weight,
                               generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), max_grad_norm)
        optimizer.step()
        record = {"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"], **stats}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if callback is not None:
            callback(step, record)
    vae.eval()
    return history


def _to_model_space(videos: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, H, W]`` in [0, 1] (or uint8) -> ``[B, C, F, H, W]`` float32 in [-1, 1]."""
    v = videos.float() / 255.0 if videos.dtype == torch.uint8 else videos.float()
    return v.permute(0, 2, 1, 3, 4) * 2.0 - 1.0


@torch.no_grad()
def encode_videos(vae, videos: torch.Tensor, batch_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, std)`` of raw (un-normalised) latents, each ``[N, z, F', h, w]``.

    Args:
        videos: ``[N, F, C, H, W]`` in [0, 1] (or uint8).
    """
    means, stds = [], []
    for start in range(0, videos.shape[0], batch_size):
        posterior = vae.encode(_to_model_space(videos[start:start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Raw latents ``[N, z, F', h, w]`` -> videos ``[N, F, C, H, W]`` in [0, 1]."""
    out = []
    for start in range(0, latents.shape[0], batch_size):
        video = vae.decode(latents[start:start + batch_size]).sample
        out.append((video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))
    return torch.cat(out)


def reconstruct_videos(vae, videos: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Encode (posterior mean) and decode: ``[N, F, C, H, W]`` in [0, 1] -> the same shape in [0, 1]."""
    mean, _ = encode_videos(vae, videos, batch_size)
    return decode_latents(vae, mean, batch_size)


def set_latent_statistics(vae, latents: torch.Tensor) -> Tuple[List[float], List[float]]:
    """Store the per-channel mean / std of raw ``latents [N, z, F', h, w]`` as the VAE's
    ``latents_mean`` / ``latents_std`` (saved with the config, used by ``WanPipeline`` to (de)normalise)."""
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    stats = ([round(float(v), 6) for v in mean], [round(float(v), 6) for v in std])
    vae.register_to_config(latents_mean=stats[0], latents_std=stats[1])
    return stats


def normalise_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents -> the model's latent space ``(z - latents_mean) / latents_std`` (what the transformer sees)."""
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=latents.dtype).view(shape)
    return (latents - mean) / std

