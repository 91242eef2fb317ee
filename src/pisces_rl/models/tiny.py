"""A tiny random Wan text-to-video pipeline built entirely in code (no downloads).

Same classes as a real Wan 2.1 checkpoint, just small: ``WanTransformer3DModel`` (2 blocks, width 24),
``AutoencoderKLWan`` (base width 3, 16 latent channels, 4x temporal / 8x spatial compression), a
2-layer ``UMT5EncoderModel`` (width 32) with a word-piece tokenizer built with the ``tokenizers``
library, and ``FlowMatchEulerDiscreteScheduler``. Every component is seeded separately (the
diffusers ``get_dummy_components`` pattern) inside a forked RNG, so the global torch RNG is left
untouched and the same seed always gives the same weights. The pipeline survives
``save_pretrained`` / ``WanPipeline.from_pretrained``.

Example::

    >>> pipe = build_tiny_wan_pipeline(seed=0)
    >>> out = pipe("two red squares moving left", num_frames=5, height=32, width=32,
    ...            num_inference_steps=2, output_type="pt").frames
    >>> out.shape                                   # [B, F, C, H, W] in [0, 1]
    torch.Size([1, 5, 3, 32, 32])
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["build_tiny_wan_pipeline", "build_tiny_wan22_pipeline", "build_tiny_tokenizer", "TINY_VOCAB_WORDS"]

# Whole-word entries; anything else is spelled with single characters (word-piece fallback).
TINY_VOCAB_WORDS = (
    "a an the one two three four five six some many no and or of in on at to with from by is are "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle circles square squares triangle triangles star stars shape shapes object objects ball balls "
    "box boxes small big large tiny "
    "moving moves move left right up down still static stationary rotating bouncing "
    "above below next beside behind front top bottom center middle corner background "
    "video scene frame camera slowly quickly fast slow bright dark"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_PUNCT = ".,!?;:'\"-()/&+*%#@"
_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5 ids: pad = 0, eos = 1, unk = 2


def build_tiny_tokenizer(model_max_length: int = 512):
    """A T5-style fast tokenizer (pad=0, ``</s>``=1 appended, unk=2) built in code.

    Lower-cased, split on whitespace and punctuation, word-piece over :data:`TINY_VOCAB_WORDS`
    with single-character fallback, so any ASCII prompt is encoded without ``<unk>``. ``model_max_length``: 512
    for T5 (Wan), 77 for a CLIP text encoder (``TextToVideoSDPipeline`` pads to it).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: Dict[str, int] = {}
    for token in (*_SPECIALS, *TINY_VOCAB_WORDS, *_CHARS, *_PUNCT, *("##" + c for c in _CHARS)):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length
    )


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_wan_pipeline(
    seed: int = 0,
    *,
    transformer_kwargs: Optional[Dict[str, Any]] = None,
    vae_kwargs: Optional[Dict[str, Any]] = None,
    text_encoder_kwargs: Optional[Dict[str, Any]] = None,
    shift: float = 3.0,
    transformer_2: bool = False,
    pipeline_kwargs: Optional[Dict[str, Any]] = None,
):
    """Build a tiny random ``WanPipeline`` on CPU in float32.

    Args:
        seed: seeds every component (each built right after ``torch.manual_seed(seed)``).
        transformer_kwargs / vae_kwargs / text_encoder_kwargs: overrides of the tiny configs of
            ``WanTransformer3DModel``, ``AutoencoderKLWan`` and ``UMT5Config`` (e.g. a wider model to
            pretrain on ShapesWorld). The text encoder's ``d_model`` must equal the transformer's
            ``text_dim``.
        shift: the flow-matching scheduler's timestep shift.
        transformer_2: also build a second transformer (seeded ``seed + 1``), the low-noise expert of a
            two-expert Wan 2.2 pipeline (then pass ``pipeline_kwargs={"boundary_ratio": ...}``).
        pipeline_kwargs: extra ``WanPipeline`` arguments (``boundary_ratio``, ``expand_timesteps``).

    Returns:
        ``diffusers.WanPipeline`` with its progress bar disabled. Latents for ``num_frames=4k+1`` at
        ``H x W`` are ``[B, 16, k+1, H/8, W/8]``; H and W must be multiples of 16.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    te_cfg = dict(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        is_encoder_decoder=False, feed_forward_proj="gated-gelu",
    )
    te_cfg.update(text_encoder_kwargs or {})
    tr_cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=te_cfg["d_model"], freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    tr_cfg.update(transformer_kwargs or {})
    vae_cfg = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    vae_cfg.update(vae_kwargs or {})
    if tr_cfg["text_dim"] != te_cfg["d_model"]:
        raise ValueError(
            f"transformer text_dim={tr_cfg['text_dim']} must equal the text encoder d_model={te_cfg['d_model']}; "
            "override both together"
        )
    if tr_cfg["in_channels"] != vae_cfg["z_dim"]:
        raise ValueError(f"transformer in_channels={tr_cfg['in_channels']} must equal the VAE z_dim={vae_cfg['z_dim']}")

    vae = _seeded(seed, lambda: AutoencoderKLWan(**vae_cfg))
    text_encoder = _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(**te_cfg)))
    transformer = _seeded(seed, lambda: WanTransformer3DModel(**tr_cfg))
    expert_2 = _seeded(seed + 1, lambda: WanTransformer3DModel(**tr_cfg)).eval() if transformer_2 else None
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        transformer=transformer.eval(),
        transformer_2=expert_2,
        **(pipeline_kwargs or {}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_wan22_pipeline(variant: str = "a14b", seed: int = 0, boundary_ratio: float = 0.875, *,
                              transformer_kwargs: Optional[Dict[str, Any]] = None,
                              vae_kwargs: Optional[Dict[str, Any]] = None,
                              text_encoder_kwargs: Optional[Dict[str, Any]] = None):
    """A tiny random Wan 2.2 ``WanPipeline`` (CPU, float32), in one of the two Wan 2.2 T2V layouts.

    * ``"a14b"``: two experts, ``transformer`` (high noise, seed ``seed``) and ``transformer_2`` (low noise,
      seed ``seed + 1``), switched at ``boundary_ratio`` (0.875 as in Wan2.2-T2V-A14B's ``model_index.json``);
      the tiny Wan 2.1 VAE (16 latent channels, 8x spatial). Latents ``[B, 16, k+1, H/8, W/8]``.
    * ``"ti2v"``: one transformer with ``expand_timesteps=True`` (one timestep per latent token, as
      Wan2.2-TI2V-5B) and the Wan 2.2 VAE layout: ``z_dim=48``, ``patch_size=2`` (pixel unshuffle before the
      encoder), ``is_residual=True``, ``scale_factor_spatial=16`` (the layout of diffusers'
      ``tests/pipelines/wan/test_wan_22_5B.py`` dummy components). Latents ``[B, 48, k+1, H/16, W/16]``;
      H and W must be multiples of 32.

    ``transformer_kwargs`` / ``vae_kwargs`` / ``text_encoder_kwargs`` override the tiny configs, as in
    :func:`build_tiny_wan_pipeline` (e.g. a published architecture with random weights).
    """
    if variant == "a14b":
        return build_tiny_wan_pipeline(seed, transformer_2=True, pipeline_kwargs={"boundary_ratio": boundary_ratio},
                                       transformer_kwargs=transformer_kwargs, vae_kwargs=vae_kwargs,
                                       text_encoder_kwargs=text_encoder_kwargs)
    if variant == "ti2v":
        vae = dict(z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2, scale_factor_spatial=16,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
        vae.update(vae_kwargs or {})
        return build_tiny_wan_pipeline(seed, vae_kwargs=vae, pipeline_kwargs={"expand_timesteps": True},
                                       transformer_kwargs={"in_channels": 48, "out_channels": 48,
                                                           **(transformer_kwargs or {})},
                                       text_encoder_kwargs=text_encoder_kwargs)
    raise ValueError(f"unknown tiny Wan 2.2 variant {variant!r}; use 'a14b' (two experts) or 'ti2v'")
