"""BLIP image–text matching model adapted to video (the default PISCES reward encoder).

``transformers.BlipForImageTextRetrieval`` has the anatomy of InternVideo2-Stage2's stage-2 tower (PISCES,
arXiv 2602.01624): a ViT vision tower, a BERT text tower whose layers cross-attend to visual tokens, an ITM head
``Linear(d, 2)`` on the fused [CLS] and ITC projections. Video goes through it frame by frame:

* frames ``[B, F, C, H, W]`` in [0, 1] (uniformly subsampled to ``num_frames`` if set) are resized with
  ``F.interpolate`` (bilinear, anti-aliased, differentiable) to the vision image size and normalised with the
  checkpoint's image mean/std, then encoded as ``B*F`` images;
* visual tokens = [visual CLS = mean of the frame CLS tokens] + the ``F*h*w`` patch tokens, in frame-major order;
  they are the cross-attention memory of the fusion (ITM) text tower;
* pooled video embedding = ``normalize(vision_proj(visual CLS))``; text [CLS] / token embeddings =
  ``normalize(text_proj(.))`` of the unimodal text tower.

With ``F = 1`` every output equals the image model's own (``model(input_ids, pixel_values)``).

Attention fusion: BLIP's text attention (transformers 5.24, ``BlipTextSelfAttention``) computes
``softmax(QK^T/sqrt(d) + mask)`` inline and passes the probabilities through its ``dropout`` module right before
multiplying with the values; it does not go through the attention-interface registry. The adapter therefore keeps a
permanent forward hook (one module-level function) on the ``dropout`` of every *cross*-attention module. The hook is
inert unless a ``contextvars.ContextVar``, set only for the duration of a ``match_probability`` call, holds a fuser
together with the modules it targets; so concurrent threads and other encoders (copies included) never see each
other's fusers, nothing needs restoring on error, and autograd flows through the fuser's output. (The encoder is frozen in eval mode, where
that dropout is the identity; do not enable gradient checkpointing on the text tower, whose recomputation would
run outside the fuser's context.)

Layer query/key projections: a fuser with ``wants_layer_qk = True`` (the ``layer_qk`` cost embeddings of the PISCES
code) is called as ``fuser(layer_index, attn, query=Q, key=K)``. Two more permanent, equally inert forward hooks on
each cross-attention module's ``query`` and ``key`` linears record their outputs (``Q = query(text states)``
``[B, N, heads·head_dim]``, ``K = key(visual tokens)`` ``[B, M, heads·head_dim]``, detached) while such a fuser is
active; the dropout hook hands them over.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval

from .base import AttentionFuser, TextFeatures, VideoFeatures, check_videos
from .temporal import TemporalAdapter
from .tokenizer import build_tiny_tokenizer

__all__ = ["BlipVideoTextEncoder", "tiny_blip_config"]

# BLIP's preprocessing defaults (OpenAI CLIP statistics), used when a checkpoint has no preprocessor_config.json.
DEFAULT_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
ADAPTER_CONFIG = "pisces_encoder.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TEMPORAL_WEIGHTS = "pisces_temporal.safetensors"

_ACTIVE_FUSER: contextvars.ContextVar = contextvars.ContextVar("pisces_blip_attention_fuser", default=None)


@dataclass
class _ActiveFusion:
    """What the hooks see during one ``fusing`` context (module ids, so copies of the encoder are not targeted)."""

    sites: dict                        # id(cross-attention dropout) -> text layer index
    projections: dict                  # id(cross-attention query / key linear) -> (layer index, "query" | "key")
    fuser: AttentionFuser
    captured: dict = field(default_factory=dict)   # layer index -> {"query": [B, N, d], "key": [B, M, d]}


def tiny_blip_config(vocab_size: int = 326, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                     image_size: int = 32, patch_size: int = 8, embed_dim: int = 32,
                     initializer_range: float = 0.2) -> BlipConfig:
    """A tiny random ``BlipConfig`` (a few hundred k parameters) for tests and CPU runs.

    ``initializer_range`` is larger than BLIP's 0.02 so that a *random* tiny model still responds to its inputs.
    """
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=2, sep_token_id=3, eos_token_id=3, is_decoder=True,
                initializer_range=initializer_range)
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size,
                  initializer_range=initializer_range)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=embed_dim,
                      projection_dim=embed_dim, initializer_range=initializer_range)


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}
    if str(dtype) not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype")
    return names[str(dtype)]


class BlipVideoTextEncoder(nn.Module):
    """``VideoTextEncoder`` over a ``BlipForImageTextRetrieval`` model (frozen by default).

    Args:
        model: the BLIP image–text retrieval model; its text config must have ``is_decoder=True`` (cross-attention).
        tokenizer: the matching (BERT WordPiece) tokenizer.
        num_frames: frames fed to the vision tower (uniformly subsampled, first and last kept); None = all.
        image_mean, image_std: per-channel normalisation of the vision tower (BLIP/CLIP defaults if None).
        max_text_length: prompts are truncated to this many tokens (incl. [CLS]/[SEP]).
        frozen: put the model in eval mode with ``requires_grad=False`` on all parameters.
        temporal: an optional :class:`~pisces_rl.encoders.temporal.TemporalAdapter` that makes the visual tokens
            frame-order aware (saved beside the BLIP weights; a real BLIP checkpoint has none).

    Construct with :meth:`from_pretrained` (a local checkpoint dir) or :meth:`tiny` (random, built in code).
    """

    supports_layer_qk = True

    def __init__(self, model: BlipForImageTextRetrieval, tokenizer, num_frames: Optional[int] = None,
                 image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN, image_std: Sequence[float] = DEFAULT_IMAGE_STD,
                 max_text_length: int = 64, frozen: bool = True, temporal: Optional[TemporalAdapter] = None):
        super().__init__()
        if num_frames is not None and int(num_frames) < 1:
            raise ValueError(f"num_frames must be >= 1 or None (all frames), got {num_frames}")
        self.model = model
        self.tokenizer = tokenizer
        self.num_frames = None if num_frames is None else int(num_frames)
        self.max_text_length = int(max_text_length)
        vcfg = model.config.vision_config
        if not isinstance(vcfg.image_size, int) or not isinstance(vcfg.patch_size, int):
            raise ValueError("BlipVideoTextEncoder needs square images: int vision_config.image_size / patch_size")
        self.image_size = vcfg.image_size
        self.grid = (vcfg.image_size // vcfg.patch_size,) * 2
        self.embed_dim = model.config.image_text_hidden_size
        if temporal is not None and temporal.hidden_size != vcfg.hidden_size:
            raise ValueError(f"the temporal adapter's width {temporal.hidden_size} does not match the vision "
                             f"tower's hidden_size {vcfg.hidden_size}")
        self.temporal = temporal
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        for dropout in self._fusion_sites():
            if _fusion_hook not in dropout._forward_hooks.values():
                dropout.register_forward_hook(_fusion_hook)
        for linear in self._projection_sites():
            if _capture_hook not in linear._forward_hooks.values():
                linear.register_forward_hook(_capture_hook)
        self.cross_attention_layers = sorted(self._fusion_sites().values())
        if not self.cross_attention_layers:
            raise ValueError("the BLIP text tower has no cross-attention layers; load it from a "
                             "BlipForImageTextRetrieval checkpoint (text_config.is_decoder=True)")
        if frozen:
            self.freeze()

    # ------------------------------------------------------------------ construction / persistence
    def freeze(self) -> "BlipVideoTextEncoder":
        """Eval mode and ``requires_grad=False`` on every parameter (gradients still reach the videos)."""
        self.model.eval()
        self.model.requires_grad_(False)
        if self.temporal is not None:
            self.temporal.eval()
            self.temporal.requires_grad_(False)
        return self

    @classmethod
    def tiny(cls, seed: int = 0, num_frames: Optional[int] = None, temporal_frames: Optional[int] = None,
             **config_kwargs) -> "BlipVideoTextEncoder":
        """A random tiny encoder built in code (tokenizer included); same weights for the same ``seed``.

        ``config_kwargs`` go to :func:`tiny_blip_config` (hidden_size, num_layers, num_heads, image_size, ...).
        ``temporal_frames`` adds a (zero-initialised) :class:`TemporalAdapter` with a table for that many frames.
        """
        tokenizer = build_tiny_tokenizer()
        config = tiny_blip_config(vocab_size=len(tokenizer), **config_kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BlipForImageTextRetrieval(config)
        temporal = None if temporal_frames is None else TemporalAdapter(config.vision_config.hidden_size,
                                                                         temporal_frames)
        return cls(model, tokenizer, num_frames=num_frames, temporal=temporal)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], num_frames: Optional[int] = None, device=None, dtype=None,
                        max_text_length: Optional[int] = None) -> "BlipVideoTextEncoder":
        """Load a local ``BlipForImageTextRetrieval`` checkpoint dir (model + tokenizer [+ preprocessor config]).

        Works for a real checkpoint (e.g. a local copy of ``Salesforce/blip-itm-base-coco``) and for a dir written by
        :meth:`save_pretrained`. Nothing is downloaded. ``dtype`` is a ``torch.dtype`` or fp32/bf16/fp16/fp64.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise FileNotFoundError(
                f"BLIP encoder checkpoint {str(path)!r} {what}. Pass a local directory holding a "
                "BlipForImageTextRetrieval checkpoint (config.json, weights, tokenizer files), e.g. one written by "
                "BlipVideoTextEncoder.save_pretrained, or use encoder='tiny' for the random in-code encoder.")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "blip":
            raise ValueError(f"{str(path)!r} holds a {model_type!r} model, expected a BLIP image-text retrieval "
                             "checkpoint (model_type 'blip'); other encoders need their own adapter "
                             "(see docs/encoders.md)")
        model = BlipForImageTextRetrieval.from_pretrained(path, dtype=_resolve_dtype(dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        options = json.loads((path / ADAPTER_CONFIG).read_text()) if (path / ADAPTER_CONFIG).is_file() else {}
        pre = json.loads((path / PREPROCESSOR_CONFIG).read_text()) if (path / PREPROCESSOR_CONFIG).is_file() else {}
        temporal = None
        if options.get("temporal_frames"):
            from safetensors.torch import load_file

            if not (path / TEMPORAL_WEIGHTS).is_file():
                raise FileNotFoundError(f"{str(path)!r}: {ADAPTER_CONFIG} names a temporal adapter but "
                                        f"{TEMPORAL_WEIGHTS} is missing; re-save the encoder with save_pretrained")
            temporal = TemporalAdapter(model.config.vision_config.hidden_size, options["temporal_frames"])
            temporal.load_state_dict(load_file(str(path / TEMPORAL_WEIGHTS)))
            temporal.to(dtype=next(model.parameters()).dtype)
        encoder = cls(model, tokenizer, temporal=temporal,
                      num_frames=num_frames if num_frames is not None else options.get("num_frames"),
                      image_mean=pre.get("image_mean", DEFAULT_IMAGE_MEAN),
                      image_std=pre.get("image_std", DEFAULT_IMAGE_STD),
                      max_text_length=max_text_length or options.get("max_text_length", 64))
        return encoder.to(device) if device is not None else encoder

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write model, tokenizer, preprocessor config and adapter options; reload with :meth:`from_pretrained`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        pre = {"image_processor_type": "BlipImageProcessor", "do_resize": True, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
               "size": {"height": self.image_size, "width": self.image_size},
               "image_mean": self.image_mean.flatten().tolist(), "image_std": self.image_std.flatten().tolist()}
        (directory / PREPROCESSOR_CONFIG).write_text(json.dumps(pre, indent=2))
        options = {"adapter": "blip", "num_frames": self.num_frames, "max_text_length": self.max_text_length}
        if self.temporal is not None:
            from safetensors.torch import save_file

            options["temporal_frames"] = self.temporal.num_frames
            save_file({k: v.detach().contiguous() for k, v in self.temporal.state_dict().items()},
                      str(directory / TEMPORAL_WEIGHTS))
        (directory / ADAPTER_CONFIG).write_text(json.dumps(options, indent=2))
        return directory

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ text
    def encode_text(self, prompts: list[str]) -> TextFeatures:
        """Encode ``B`` prompts with the unimodal text tower (no cross-attention). Returns :class:`TextFeatures`."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings (wrap a single prompt as [prompt])")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_length,
                               return_special_tokens_mask=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)                     # [B, N]
        attention_mask = batch["attention_mask"].to(self.device)           # [B, N]
        lexical = attention_mask.bool() & ~batch["special_tokens_mask"].to(self.device).bool()
        states = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        tokens = F.normalize(self.model.text_proj(states), dim=-1)         # [B, N, D]
        return TextFeatures(cls_embedding=tokens[:, 0], token_embeddings=tokens, input_ids=input_ids,
                            attention_mask=attention_mask, lexical_mask=lexical, prompts=list(prompts))

    # ------------------------------------------------------------------ video
    def sample_frames(self, videos: Tensor) -> Tensor:
        """Uniformly subsample ``[B, F, C, H, W]`` to ``num_frames`` frames (indices ``round(linspace(0, F-1))``)."""
        frames = videos.shape[1]
        if self.num_frames is None or self.num_frames == frames:
            return videos
        index = torch.linspace(0, frames - 1, self.num_frames).round().long().to(videos.device)
        return videos.index_select(1, index)

    def encode_video(self, videos: Tensor) -> VideoFeatures:
        """Encode ``videos[B, F, C, H, W]`` in [0, 1]; differentiable w.r.t. ``videos``."""
        return self.features_from_states(self.encode_frames(videos))

    def encode_frames(self, videos: Tensor) -> Tensor:
        """Per-frame vision states ``[B, F', 1+h*w, Dv]`` of ``videos[B, F, C, H, W]`` (after frame subsampling)."""
        videos = self.sample_frames(check_videos(videos))
        b, f, c, h, w = videos.shape
        frames = videos.reshape(b * f, c, h, w).to(device=self.device, dtype=self.dtype)
        size = self.image_size
        if (h, w) != (size, size):
            frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        frames = (frames - self.image_mean.to(frames.dtype)) / self.image_std.to(frames.dtype)
        states = self.model.vision_model(pixel_values=frames).last_hidden_state   # [B*F, 1+h*w, Dv]
        return states.reshape(b, f, states.shape[1], states.shape[2])

    def features_from_states(self, states: Tensor) -> VideoFeatures:
        """:class:`VideoFeatures` from per-frame states ``[B, F, 1+h*w, Dv]`` (see :meth:`encode_frames`).

        Without a temporal adapter the visual [CLS] is the mean of the frame [CLS] tokens and the patch tokens are
        the frames' own; with one, both become frame-order aware (:class:`TemporalAdapter`).
        """
        f = states.shape[1]
        if self.temporal is None:
            visual_cls, patches = states[:, :, 0].mean(dim=1, keepdim=True), states[:, :, 1:].flatten(1, 2)
        else:
            visual_cls, patches = self.temporal(states)                          # [B, 1, Dv], [B, F*h*w, Dv]
        tokens = torch.cat([visual_cls, patches], dim=1)                         # [B, 1+F*h*w, Dv]
        embeddings = F.normalize(self.model.vision_proj(tokens), dim=-1)         # [B, M, D]
        frame_index, patch_position = self.token_positions(f, device=tokens.device, dtype=tokens.dtype)
        return VideoFeatures(pooled_embedding=embeddings[:, 0], tokens=tokens, token_embeddings=embeddings,
                             frame_index=frame_index, patch_position=patch_position, num_frames=f, grid=self.grid)

    def token_positions(self, num_frames: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """``(t[M], s[M, 2])`` for ``M = 1 + F*h*w`` tokens, the geometry of the PISCES code.

        Patch tokens get their frame number ``t = 0 .. F-1`` (not rescaled) and their grid position
        ``s = (row, col)`` on ``linspace(0, 1, h) × linspace(0, 1, w)`` ('ij' order); the visual [CLS] gets
        ``t = -1`` and ``s = (-1, -1)``: outside the grid, farther in space than any patch from a text token that
        attends to patches, one frame before frame 0 in time (roar-ai/pisces ``fastvideo/partial_optimal_transport.py`` @f8606b0, ``build_video_token_geometry``).
        """
        gh, gw = self.grid
        t = torch.arange(num_frames, dtype=torch.float32)
        rows, cols = torch.linspace(0, 1, gh), torch.linspace(0, 1, gw)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(gh * gw, 2)
        frame_index = torch.cat([torch.full((1,), -1.0), t.repeat_interleave(gh * gw)])
        patch_position = torch.cat([torch.full((1, 2), -1.0), grid.repeat(num_frames, 1)])
        return frame_index.to(device=device, dtype=dtype), patch_position.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ fusion / matching
    def match_probability(self, text: TextFeatures, video: VideoFeatures,
                          attention_fuser: Optional[AttentionFuser] = None) -> Tensor:
        """VTM positive probability ``softmax(itm_head(fused [CLS]))[:, 1]``, shape ``[B]``.

        The ITM text tower cross-attends from the text tokens to ``video.tokens``; ``attention_fuser(layer_index,
        attn_probs[B, heads, N, M])`` (if given) replaces the attention probabilities of every cross-attention layer
        (``layer_index`` = index of the text layer).
        """
        if len(text) != len(video):
            raise ValueError(f"match_probability pairs text[b] with video[b]: got {len(text)} texts and "
                             f"{len(video)} videos (repeat the prompt features or the videos to match)")
        memory = video.tokens.to(device=self.device, dtype=self.dtype)
        memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        with self.fusing(attention_fuser):
            fused = self.model.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                            encoder_hidden_states=memory,
                                            encoder_attention_mask=memory_mask).last_hidden_state
        logits = self.model.itm_head(fused[:, 0])                              # [B, 2]
        return logits.softmax(dim=-1)[:, 1]

    @contextlib.contextmanager
    def fusing(self, attention_fuser: Optional[AttentionFuser]):
        """Context in which ``attention_fuser`` is applied to this encoder's cross-attention probabilities."""
        if attention_fuser is None:
            yield
            return
        if not callable(attention_fuser):
            raise TypeError(f"attention_fuser must be callable (layer_index, attn_probs) -> attn_probs, "
                            f"got {type(attention_fuser).__name__}")
        sites = {id(module): index for module, index in self._fusion_sites().items()}
        wants_qk = bool(getattr(attention_fuser, "wants_layer_qk", False))
        projections = {id(module): site for module, site in self._projection_sites().items()} if wants_qk else {}
        token = _ACTIVE_FUSER.set(_ActiveFusion(sites, projections, attention_fuser))
        try:
            yield
        finally:
            _ACTIVE_FUSER.reset(token)

    def _fusion_sites(self) -> dict:
        """``{dropout module applied to the cross-attention probabilities: text layer index}``."""
        sites = {}
        for index, layer in enumerate(self.model.text_encoder.encoder.layer):
            cross = getattr(layer, "crossattention", None)
            if cross is not None:
                sites[cross.self.dropout] = index
        return sites

    def _projection_sites(self) -> dict:
        """``{cross-attention query / key linear: (text layer index, "query" | "key")}``."""
        sites = {}
        for index, layer in enumerate(self.model.text_encoder.encoder.layer):
            cross = getattr(layer, "crossattention", None)
            if cross is not None:
                sites[cross.self.query] = (index, "query")
                sites[cross.self.key] = (index, "key")
        return sites


def _capture_hook(module, inputs, output):
    """Forward hook on a cross-attention query / key linear: record its output for a ``wants_layer_qk`` fuser."""
    active = _ACTIVE_FUSER.get()
    if active is None or id(module) not in active.projections:
        return None
    layer_index, name = active.projections[id(module)]
    active.captured.setdefault(layer_index, {})[name] = output.detach()
    return None


def _fusion_hook(module, inputs, attn_probs):
    """Forward hook on a cross-attention dropout: apply the fuser active in this context, if it targets ``module``."""
    active = _ACTIVE_FUSER.get()
    if active is None or id(module) not in active.sites:
        return None
    layer_index = active.sites[id(module)]
    if active.projections:
        got = active.captured.pop(layer_index, {})
        if "query" not in got or "key" not in got:
            raise RuntimeError(f"cross-attention layer {layer_index}: the query/key projections were not recorded "
                               f"before its attention (got {sorted(got)}); a cached or patched attention module "
                               "skips them, use cost_embeddings='itc_proj' there")
        fused = active.fuser(layer_index, attn_probs, query=got["query"], key=got["key"])
    else:
        fused = active.fuser(layer_index, attn_probs)
    if not isinstance(fused, Tensor) or fused.shape != attn_probs.shape:
        got = tuple(fused.shape) if isinstance(fused, Tensor) else type(fused).__name__
        raise ValueError(f"attention_fuser must return attention probabilities of shape "
                         f"{tuple(attn_probs.shape)} [B, heads, N, M] at layer {layer_index}, got {got}")
    return fused
