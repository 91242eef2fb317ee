"""Shared test helpers for building tiny policies."""
from types import SimpleNamespace


def model_cfg(**overrides):
    """A ``model:`` section for ``build_policy``: the tiny in-code Wan with a rank-4 LoRA, overridable."""
    cfg = dict(pretrained="tiny", family="wan", dtype="fp32", lora_rank=4, lora_alpha=8,
               lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_path=None,
               gradient_checkpointing=False, seed=0)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def brightness(videos, prompts, **kwargs):
    """A differentiable toy reward: mean pixel value, ``[B, F, C, H, W]`` -> ``[B]``."""
    return videos.mean(dim=(1, 2, 3, 4))


brightness.differentiable = True


def perturb_lora(policy, seed=1, scale=0.3):
    """Make every LoRA B non-zero (seeded) so the adapter changes the model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def split_state(module):
    """``(trainable, frozen)``: copies of ``module``'s parameters by ``requires_grad``, keyed by name."""
    named = dict(module.named_parameters())
    return ({n: p.detach().clone() for n, p in named.items() if p.requires_grad},
            {n: p.detach().clone() for n, p in named.items() if not p.requires_grad})


def assert_only_lora_moved(before, module):
    """``before = split_state(module)`` taken before a step: some LoRA parameter moved, no frozen one did."""
    import torch

    (t0, f0), (t1, f1) = before, split_state(module)
    assert t0 and all("lora" in n for n in t0) and f0
    assert any(not torch.equal(t0[k], t1[k]) for k in t0), "no LoRA parameter moved"
    assert all(torch.equal(f0[k], f1[k]) for k in f0), "a frozen base parameter moved"


def video_dataset(n=3, frames=5, size=16, seed=0):
    """A tiny in-memory dataset of captioned random videos (uint8 [F, H, W, 3]), for backprop from data."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({"video": rng.integers(0, 256, (n, frames, size, size, 3), dtype=np.uint8),
                                       "caption": [f"clip number {i}" for i in range(n)]})


def train_moves_only_lora(trainer):
    """``trainer.train()``, asserting that some LoRA parameter and no frozen one moved; returns its metrics."""
    before = split_state(trainer.policy.transformer)
    metrics = trainer.train()
    assert_only_lora_moved(before, trainer.policy.transformer)
    return metrics


def assert_saved_lora_reproduces_policy(policy, tmp_path, ours, pipe, run, atol):
    """With a perturbed LoRA, ``ours()`` is the policy's output and the LoRA is saved to ``tmp_path`` (then B = 0
    again); ``run(pipe)`` on a plain pipeline before and after ``pipe.load_lora_weights`` must change and match
    ``ours()`` to ``atol``."""
    import torch

    perturb_lora(policy)
    try:
        trained = ours()
        policy.save_lora(str(tmp_path))
    finally:
        perturb_lora(policy, scale=0.0)
    base = run(pipe)
    pipe.load_lora_weights(str(tmp_path))
    loaded = run(pipe)
    assert (loaded - base).abs().max() > 1e-3, "the LoRA did not change the plain pipeline's output"
    torch.testing.assert_close(loaded, trained, atol=atol, rtol=0)
