"""A tiny random ``HunyuanVideoPipeline`` built entirely in code (no downloads), for tests.

Same classes as ``hunyuanvideo-community/HunyuanVideo``, sizes from diffusers'
``tests/pipelines/hunyuan_video/test_hunyuan_video.py`` ``get_dummy_components`` (16 latent channels here, as the
real VAE): ``HunyuanVideoTransformer3DModel`` (1 dual + 1 single block, width 20, guidance-distilled),
``AutoencoderKLHunyuanVideo`` (width 8; 4x temporal, 8x spatial), a 3-layer ``LlamaModel`` (width 16) and a
2-layer ``CLIPTextModel`` (width 8), ``FlowMatchEulerDiscreteScheduler(shift=7)``. Both tokenizers are built with
the ``tokenizers`` library: a Llama-3-like one on which the pipeline's ``DEFAULT_PROMPT_TEMPLATE`` has exactly
its ``crop_start`` = 95 tokens before the prompt (so plain ``pipe(prompt)`` crops it right), and a CLIP-like
one (``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>``, 77 tokens).

Example::

    >>> pipe = build_tiny_hunyuan_video_pipeline(seed=0)
    >>> pipe("a red circle", num_frames=5, height=32, width=32, num_inference_steps=2,
    ...      max_sequence_length=16, output_type="pt").frames.shape          # [B, F, C, H, W] in [0, 1]
    torch.Size([1, 5, 3, 32, 32])
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from .tiny import _CHARS, _PUNCT, TINY_VOCAB_WORDS, _seeded

__all__ = ["build_tiny_hunyuan_video_pipeline", "build_tiny_llama_tokenizer", "build_tiny_clip_tokenizer"]

# The words of HunyuanVideoPipeline's DEFAULT_PROMPT_TEMPLATE ("detailing" is spelled "detail ##ing").
_TEMPLATE_WORDS = (
    "system user describe the video by detail following aspects main content and theme of color shape size "
    "texture quantity text spatial relationships objects actions events behaviors temporal physical movement "
    "changes background environment light style atmosphere camera angles movements transitions used in"
).split()
_LLAMA_SPECIALS = ("<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>")
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def _wordpiece(specials: Sequence[str], unk: str, template: str, extra_tokens: Sequence[str] = ()):
    """A lower-casing word-piece ``PreTrainedTokenizerFast`` over the tiny vocabulary (single-character fallback,
    so any ASCII text is encoded without ``unk``); ``template`` is the post-processor's single-sequence rule."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab: Dict[str, int] = {}
    for token in (*specials, *_TEMPLATE_WORDS, "##ing", *TINY_VOCAB_WORDS, *_CHARS, *_PUNCT,
                  *("##" + c for c in _CHARS)):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([AddedToken(s, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, normalized=False) for s in extra_tokens])
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in template])
    tok.decoder = decoders.WordPiece()
    return tok


def build_tiny_llama_tokenizer():
    """Llama-3-like: ``<|begin_of_text|>`` prepended, header/eot special tokens, ``"\\n\\n"`` one token, right
    padding with ``<pad>`` (id 0). ``DEFAULT_PROMPT_TEMPLATE``'s text before ``{}`` is 95 tokens, its
    ``crop_start``."""
    from transformers import PreTrainedTokenizerFast

    tok = _wordpiece(_LLAMA_SPECIALS, "<pad>", "<|begin_of_text|> $A", extra_tokens=("\n\n",))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<pad>", padding_side="right", model_max_length=4096)


def build_tiny_clip_tokenizer():
    """CLIP-like: ``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>``, 77 tokens at most."""
    from transformers import PreTrainedTokenizerFast

    tok = _wordpiece(_CLIP_SPECIALS, "<unk>", "<|startoftext|> $A <|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", padding_side="right",
                                   model_max_length=77)


def build_tiny_hunyuan_video_pipeline(seed: int = 0, *, shift: float = 7.0, transformer_kwargs: Optional[dict] = None,
                                      vae_kwargs: Optional[dict] = None, text_encoder_kwargs: Optional[dict] = None,
                                      text_encoder_2_kwargs: Optional[dict] = None):
    """Build a tiny random ``HunyuanVideoPipeline`` on CPU in float32, every component seeded with ``seed``
    inside a forked RNG (the global torch RNG is untouched).

    ``transformer_kwargs`` / ``vae_kwargs`` / ``text_encoder_kwargs`` (``LlamaConfig``) / ``text_encoder_2_kwargs``
    (``CLIPTextConfig``) override the tiny configs (e.g. a published architecture with random weights, as
    ``benchmarks/gpu_families.py`` builds it); the transformer's text widths follow the text encoders'.

    Returns:
        ``diffusers.HunyuanVideoPipeline`` with its progress bar disabled. Latents for ``num_frames = 4k+1`` at
        ``H x W`` are ``[B, 16, k+1, H/8, W/8]``; H and W must be multiples of 16.
    """
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, tokenizer_2 = build_tiny_llama_tokenizer(), build_tiny_clip_tokenizer()
    llama = LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2), **(text_encoder_kwargs or {})})
    clip = CLIPTextConfig(**{**dict(vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=37, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                    hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1),
                             **(text_encoder_2_kwargs or {})})
    tr_cfg = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                  rope_axes_dim=(2, 4, 4), **(transformer_kwargs or {}))
    tr_cfg.update(text_embed_dim=llama.hidden_size, pooled_projection_dim=clip.hidden_size)
    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                   up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                   act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
                   temporal_compression_ratio=4, mid_block_add_attention=True)
    vae_cfg.update(vae_kwargs or {})
    transformer = _seeded(seed, lambda: HunyuanVideoTransformer3DModel(**tr_cfg))
    vae = _seeded(seed, lambda: AutoencoderKLHunyuanVideo(**vae_cfg))
    text_encoder = _seeded(seed, lambda: LlamaModel(llama))
    text_encoder_2 = _seeded(seed, lambda: CLIPTextModel(clip))
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe
