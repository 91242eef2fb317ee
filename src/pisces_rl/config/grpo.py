"""The GRPO run config (schema in docs/architecture.md) and its batch arithmetic.

Sections (``ModelConfig``, ``SamplingConfig``, ``RewardsConfig``, ``DataConfig``, ``LoggingConfig``,
``CheckpointConfig``) are meant to be reused by other paradigms' top-level configs.

``rewards:`` in YAML accepts two forms. If *every* key is a :class:`RewardsConfig` field name it is the
full form (``{weights: {ot_quality: 1.0}, encoder: tiny, use_ot: true}``); if *no* key is, the mapping is
the reward weights themselves (``{ot_quality: 1.0, "my_pkg.rewards:sharpness": 0.5}``). A mix is an
error. A reward whose name equals a field name (``eta``, ``mass``...) therefore needs the full form.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from .base import ConfigBase, ConfigError, option, require, section
from .nft import NFTConfig

__all__ = ["check_video_shape", "train_timesteps_per_video", "ModelConfig", "SamplingConfig", "RewardsConfig", "TrainConfig", "DataConfig", "LoggingConfig",
           "CheckpointConfig", "GRPOConfig", "batch_arithmetic", "MODEL_SOURCES", "ENCODER_SOURCES", "OT_MAP_SOURCES"]

MODEL_SOURCES = ("tiny",)  # model.pretrained names built in code; worlds register more (pisces_rl.registry, 'shapes')
ENCODER_SOURCES = ("tiny",)  # rewards.encoder names built in code; worlds register more
OT_MAP_SOURCES = ()  # rewards.ot_map: only registered names (ShapesWorld: 'shapes', 'shapes:l2' = its L2 baseline)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_REPO = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")  # train.hub_model_id: 'user/name' or 'name'


def _check_source(key: str, value: Optional[str], names: tuple = (), what: str = "directory",
                  kind: Optional[str] = None) -> None:
    """``value`` must be a built-in name, a name registered for ``kind`` (:mod:`pisces_rl.registry`), an existing
    path, or look like a hub id ``org/name``."""
    if kind is not None:
        from pisces_rl import registry

        names = (*names, *registry.names(kind))
    if value is None or value in names or os.path.exists(os.path.expanduser(value)) or _HUB_ID.match(value):
        return
    builtin = f"one of {', '.join(repr(n) for n in names)}, " if names else ""
    raise ConfigError(f"{value!r} is not {builtin}an existing {what}, or a hub id like 'org/name' "
                      f"(working directory: {os.getcwd()}); fix the path", key)


def train_timesteps_per_video(sampling) -> int:
    """K = ceil(fraction * T_s): the stochastic steps trained per video.

    ``T_s`` is ``T - 1`` (all but the last, noise-free step), or the steps of ``sde_window`` below ``T - 1``.
    Same rule as :func:`pisces_rl.rollout.select_train_steps`.
    """
    last = sampling.num_inference_steps - 1
    window = getattr(sampling, "sde_window", None)
    stochastic = last if window is None else max(0, min(window[1], last) - window[0])
    return math.ceil(sampling.train_timestep_fraction * stochastic)


def _positive(obj: object, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = value >= 0 if zero_ok else value > 0
        require(ok and math.isfinite(value), name, f"must be {'>= 0' if zero_ok else '> 0'}, got {value}")


@dataclass
class ModelConfig(ConfigBase):
    """The policy: a diffusers text-to-video pipeline whose denoiser is trained by LoRA or in full."""

    pretrained: str = option("tiny", "diffusers pipeline directory or hub id; 'tiny' = a random tiny Wan built in "
                                     "code, 'shapes' = the ShapesWorld base model")
    family: str = option("wan", "pipeline adapter (module pisces_rl.models.<family>)")
    family_options: dict[str, Any] = option({}, "keyword options of the family adapter, e.g. Wan 2.2 A14B: "
                                                "{experts: [transformer_2], guidance_scale_2: 3.0} (docs/architecture.md)")
    finetune: str = option("lora", "what is trained: lora = a LoRA adapter on the frozen denoiser; full = every "
                                   "denoiser weight, in fp32 master weights (shard them with ZeRO-2/3), with a frozen "
                                   "copy of the base denoiser as KL/teacher reference (lora_* are then ignored)",
                           choices=("lora", "full"))
    dtype: str = option("fp32", "dtype of the frozen weights: the base denoiser (or, with finetune=full, its frozen "
                                "reference copy) and the text encoder; trained parameters stay fp32",
                        choices=("fp32", "bf16", "fp16"))
    lora_rank: int = option(8, "LoRA rank r")
    lora_alpha: int = option(8, "LoRA scaling alpha (update scaled by alpha / r)")
    lora_target_modules: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"],
                                            "names of the denoiser's linear layers that get LoRA adapters")
    lora_path: Optional[str] = option(None, "saved LoRA weights to start from (null = fresh adapters)")
    gradient_checkpointing: bool = option(False, "recompute denoiser activations in backward to save memory")
    scheduler_shift: Optional[float] = option(None, "flow-matching timestep shift of the pipeline's scheduler "
                                                    "(null = the checkpoint's scheduler config)")
    seed: int = option(0, "seed of the tiny in-code model's random weights")

    def _check(self) -> None:
        require(self.pretrained.strip() != "", "pretrained", "is empty; use 'tiny' or a pipeline directory")
        _check_source("pretrained", self.pretrained, MODEL_SOURCES, "pipeline directory", kind="model")
        _check_source("lora_path", self.lora_path, (), "LoRA directory or file")
        require(self.family.strip() != "", "family", "is empty; use 'wan'")
        s = self.scheduler_shift
        require(s is None or (math.isfinite(s) and s > 0), "scheduler_shift", f"must be > 0 or null, got {s}")
        _positive(self, "lora_rank", "lora_alpha")
        require(bool(self.lora_target_modules) and all(m.strip() for m in self.lora_target_modules),
                "lora_target_modules", "must list at least one non-empty module name, e.g. [to_q,to_k,to_v]")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.finetune != "full" or self.lora_path is None, "lora_path",
                "loads LoRA weights, but model.finetune=full trains the whole denoiser; set model.lora_path=null "
                "(or model.finetune=lora)")


@dataclass
class SamplingConfig(ConfigBase):
    """How rollouts are sampled (flow-matching SDE sampler)."""

    num_frames: int = option(5, "frames per video (Wan: 4k+1)")
    height: int = option(32, "video height in pixels (Wan: multiple of 16)")
    width: int = option(32, "video width in pixels (Wan: multiple of 16)")
    num_inference_steps: int = option(6, "denoising steps per rollout")
    guidance_scale: float = option(4.0, "classifier-free guidance scale (<= 1 disables the unconditional pass); for a "
                                        "guidance-distilled family (hunyuan_video) the embedded guidance fed to the "
                                        "denoiser, one pass")
    eta: float = option(0.25, "SDE noise level of the sampler (> 0; larger = more exploration)")
    sde_type: str = option("auto", "SDE noise per step: auto = the model family's choice (Wan: flow_grpo, VP "
                                   "families: ddim); flow_grpo = eta*sqrt(sigma/(1-sigma))*sqrt(dsigma) (Flow-GRPO), "
                                   "dance_grpo = eta*sqrt(dsigma) (DanceGRPO, the PISCES code), ddim = DDPO's "
                                   "stochastic DDIM step (eta <= 1, 1 = DDPM)",
                           choices=("auto", "flow_grpo", "dance_grpo", "ddim"))
    train_timestep_fraction: float = option(1.0, "fraction of the denoising steps trained on (a random subset "
                                                 "per rollout), in (0, 1]")
    sde_window: Optional[list[int]] = option(None, "[start, stop]: only denoising steps start <= i < stop inject SDE "
                                                   "noise, the rest are ODE steps (Flow-GRPO-Fast); null = all")
    noise_block: int = option(1, "SDE noise drawn once per k x k latent block (1 = every element): exploration of the "
                                 "coarse layout, fewer action dimensions, a less noisy policy gradient")
    decode_chunk_size: int = option(0, "videos per VAE decode call (0 = all at once)")
    negative_prompt: str = option("", "negative prompt for classifier-free guidance")
    max_sequence_length: int = option(32, "text tokens given to the text encoder")

    def _check(self) -> None:
        _positive(self, "num_frames", "height", "width", "num_inference_steps", "eta", "max_sequence_length")
        _positive(self, "guidance_scale", "decode_chunk_size", zero_ok=True)
        _positive(self, "noise_block")
        f = self.train_timestep_fraction
        require(0 < f <= 1, "train_timestep_fraction", f"must be in (0, 1], got {f}")
        require(self.num_inference_steps >= 2, "num_inference_steps",
                "must be >= 2: the last (noise-free) step is never trained on")
        w = self.sde_window
        if w is not None:
            require(len(w) == 2 and 0 <= w[0] < w[1] <= self.num_inference_steps - 1, "sde_window",
                    f"must be [start, stop] with 0 <= start < stop <= num_inference_steps - 1 = "
                    f"{self.num_inference_steps - 1} (the last step is noise-free), got {w}")


@dataclass
class RewardsConfig(ConfigBase):
    """Reward functions, their weights and the options of the built-in PISCES rewards."""

    _shorthand_field = "weights"  # YAML ``rewards: {name: weight}`` means ``rewards: {weights: {...}}``

    weights: dict[str, float] = option({"ot_quality": 1.0, "ot_semantic": 1.0},
                                       "reward name or 'pkg.module:function' -> weight in the total reward")
    encoder: str = option("tiny", "BLIP-ITM video-text encoder directory or hub id; 'tiny' = random in-code encoder, "
                                  "'shapes' = the ShapesWorld encoder (`make world`)")
    ot_map: Optional[str] = option(None, "NeuralOTMap directory for ot_quality (null = raw text [CLS], no map); "
                                         "'shapes' / 'shapes:l2' = the ShapesWorld neural OT / L2 map")
    use_ot: bool = option(True, "false = raw [CLS] cosine and vanilla attention (the 'w/o OT' ablation)")
    cost_embeddings: str = option("layer_qk", "token embeddings of the semantic OT cost: each cross-attention "
                                              "layer's query/key projections (layer_qk, the PISCES code) or the ITC "
                                              "projections text_proj/vision_proj (itc_proj)",
                                  choices=("layer_qk", "itc_proj"))
    gamma: float = option(0.2, "weight of the temporal term of the token-level OT cost")
    eta: float = option(0.2, "weight of the spatial term of the token-level OT cost")
    epsilon: float = option(0.05, "entropic regularisation of the token-level OT")
    mass: float = option(0.9, "the paper's 'transported fraction' m: sets the KL marginal relaxation rho = "
                              "epsilon*m/(1-m) of the token OT, not the plan's total mass (>= 0.999 = balanced)")
    num_frames: Optional[int] = option(None, "frames given to the reward, uniformly subsampled (null = all)")
    temporal_windows: int = option(1, "> 1: score that many windows of num_frames frames and average")
    max_batch_size: int = option(8, "videos per reward call")
    max_frames_per_call: Optional[int] = option(None, "at most this many frames (videos x frames) per reward call; "
                                                      "long videos then go in smaller chunks (null = no cap)")
    on_error: str = option("raise", "a failing reward stops the run (raise) or scores NaN and is counted (skip)",
                           choices=("raise", "skip"))

    def _check(self) -> None:
        require(bool(self.weights), "weights", "no reward configured; add one, e.g. rewards.weights.ot_quality=1.0")
        for name, weight in self.weights.items():
            require(name.strip() != "", "weights", "has an empty reward name")
            require(math.isfinite(weight), f"weights.{name}", f"must be a finite number, got {weight}")
        _check_source("encoder", self.encoder, ENCODER_SOURCES, "encoder directory", kind="encoder")
        _check_source("ot_map", self.ot_map, OT_MAP_SOURCES, "OT map directory", kind="ot_map")
        _positive(self, "gamma", "eta", zero_ok=True)
        _positive(self, "epsilon", "temporal_windows", "max_batch_size")
        require(0 < self.mass <= 1, "mass", f"must be in (0, 1], got {self.mass}")
        require(self.num_frames is None or self.num_frames >= 1, "num_frames", f"must be >= 1 or null, got "
                f"{self.num_frames}")
        require(self.max_frames_per_call is None or self.max_frames_per_call >= 1, "max_frames_per_call",
                f"must be >= 1 or null, got {self.max_frames_per_call}")
        require(self.temporal_windows == 1 or self.num_frames is not None, "temporal_windows",
                "> 1 needs rewards.num_frames (the window length)")


@dataclass
class TrainConfig(ConfigBase):
    """GRPO optimisation: iterations, batch sizes, optimiser and loss.

    Knobs shared with ``trl.GRPOConfig`` carry its names and meaning (``num_generations``, ``num_iterations``,
    ``epsilon``, ``beta``, ``scale_rewards``, ``learning_rate``, ``max_grad_norm``, ...). The old names
    ``group_size``, ``num_inner_epochs``, ``clip_range`` and ``kl_beta`` still work, with a FutureWarning.
    """

    _renamed = {"group_size": "num_generations", "num_inner_epochs": "num_iterations", "clip_range": "epsilon",
                "kl_beta": "beta"}

    max_steps: int = option(2, "GRPO iterations (sample -> score -> num_iterations passes of updates)")
    algorithm: str = option("grpo", "online update: grpo = clipped policy gradient on SDE rollouts; nft = DiffusionNFT "
                                    "negative-aware flow matching on ODE samples (options in nft:)", choices=("grpo", "nft"))
    prompts_per_step: int = option(2, "distinct prompts per iteration, all processes together")
    num_generations: int = option(4, "videos sampled per prompt (G, trl's num_generations; was group_size); "
                                     "advantages use the group's mean as baseline")
    sample_batch_size: int = option(4, "videos per rollout forward, per process")
    train_batch_size: int = option(2, "videos per update micro-batch, per process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimiser step")
    num_iterations: int = option(1, "passes over each iteration's rollouts (trl's num_iterations, mu; ddpo/Flow-GRPO "
                                    "num_inner_epochs)")
    shared_group_noise: bool = option(False, "the videos of a group start from the same initial noise, so they "
                                             "differ only by the SDE steps that the policy gradient credits")
    learning_rate: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    lr_scheduler: str = option("constant", "learning-rate schedule over the optimiser steps",
                               choices=("constant", "cosine", "linear"))
    warmup_steps: int = option(0, "linear warm-up optimiser steps")
    epsilon: float = option(1e-4, "PPO clip: the ratio is clipped to [1 - epsilon, 1 + epsilon] (trl's epsilon, "
                                  "Flow-GRPO's clip_range)")
    adv_clip_max: float = option(5.0, "advantages clipped to [-adv_clip_max, adv_clip_max]")
    advantage_mode: str = option("sum", "sum = weighted reward sum, then group-normalise; per_reward = normalise "
                                        "each reward and sum their clipped surrogates",
                                 choices=("sum", "per_reward"))
    scale_rewards: str = option("group", "advantage = (reward - group mean) / (S + 1e-4), trl's scale_rewards: "
                                         "group = S is the group's std; batch = S is the std of the whole batch, "
                                         "all processes (Flow-GRPO global_std), near-tied groups get ~0 instead "
                                         "of +-1; none = no scaling (Dr. GRPO)",
                                choices=("group", "batch", "none"))
    beta: float = option(0.0, "weight of the KL penalty to the LoRA-disabled model (0 = off); Flow-GRPO's KL scale "
                              "(mean (mu - mu_ref)^2 / (2 g^2), g^2 = std^2 / |dt|), so its beta values transfer")
    cd_weight: float = option(0.0, "weight of the consistency-distillation loss L_CD (PISCES Eq. 7) at the trained "
                                   "rollout states: the one-step jump to x0 against the target network's jump "
                                   "after one teacher step (LoRA disabled) to the next sampling level (0 = off)")
    cd_target: str = option("stopgrad", "target network of the CD term: stopgrad = the current LoRA without "
                                        "gradient; ema = an EMA of the LoRA weights", choices=("stopgrad", "ema"))
    cd_ema_decay: float = option(0.95, "lambda of the CD term's EMA target: ema <- lambda * ema + (1 - lambda) * theta")
    cd_guidance_scale: Optional[float] = option(1.0, "CFG scale of the student, teacher and target velocities of "
                                                     "the CD term: 1 = one conditional pass, as PISCES (null = the "
                                                     "sampling guidance_scale)")
    base_anchor_weight: float = option(0.0, "weight of pseudo_huber(mean_theta, mean_ref), which anchors the SDE "
                                            "transition mean to the LoRA-disabled base model (not Eq. 7; 0 = off)")
    max_grad_norm: float = option(1.0, "gradient-norm clipping threshold")
    mixed_precision: str = option("no", "autocast dtype of forward passes", choices=("no", "bf16", "fp16"))
    seed: int = option(42, "seed of prompt order, sampling noise and timestep subsets")
    push_to_hub: bool = option(False, "at the end, upload output_dir/lora (weights, model card, before/after video) "
                                      "to the Hugging Face Hub (needs `huggingface-cli login` or HF_TOKEN)")
    hub_model_id: Optional[str] = option(None, "Hub repo of push_to_hub, 'user/name' or 'name' (null = the name of "
                                               "output_dir)")

    def _check(self) -> None:
        _positive(self, "max_steps", "prompts_per_step", "sample_batch_size", "train_batch_size",
                  "gradient_accumulation_steps", "num_iterations", "learning_rate", "epsilon",
                  "adv_clip_max", "max_grad_norm")
        _positive(self, "weight_decay", "warmup_steps", "beta", "cd_weight", "base_anchor_weight", "seed",
                  zero_ok=True)
        require(self.num_generations >= 2, "num_generations", f"must be >= 2 to compare videos within a group, "
                f"got {self.num_generations}")
        require(0 <= self.cd_ema_decay < 1, "cd_ema_decay", f"must be in [0, 1), got {self.cd_ema_decay}")
        g = self.cd_guidance_scale
        require(g is None or (math.isfinite(g) and g >= 0), "cd_guidance_scale", f"must be >= 0 or null, got {g}")
        for i, beta in enumerate(self.adam_betas):
            require(0 <= beta < 1, f"adam_betas[{i}]", f"must be in [0, 1), got {beta}")
        require(self.hub_model_id is None or bool(_HUB_REPO.match(self.hub_model_id)), "hub_model_id",
                f"{self.hub_model_id!r} is not a Hub repo name; use 'user/name' or 'name' (letters, digits, -_.)")


@dataclass
class DataConfig(ConfigBase):
    """Training prompts and the fixed prompts of sample videos."""

    prompts: str = option("builtin:tiny", "prompt source: .txt/.jsonl/.json/.csv/.parquet file, 'vbench', "
                                          "'vbench:<dimension>' or 'builtin:<name>'")
    prompt_column: str = option("prompt", "column holding the prompt in table files")
    eval_prompts: list[str] = option([], "fixed prompts for evaluation and sample videos ([] = taken from "
                                         "eval_source, else the first prompts of the dataset)")
    eval_source: Optional[str] = option(None, "prompt source (as `prompts`) of the evaluation prompts when "
                                              "eval_prompts is empty, e.g. a held-out split")
    num_eval_prompts: int = option(2, "how many prompts to take from eval_source / the dataset")

    def _check(self) -> None:
        require(self.prompts.strip() != "", "prompts", "is empty; use e.g. 'builtin:tiny' or a .txt file")
        require(self.prompt_column.strip() != "", "prompt_column", "is empty")
        require(all(p.strip() for p in self.eval_prompts), "eval_prompts", "contains an empty prompt")
        require(self.eval_source is None or self.eval_source.strip() != "", "eval_source",
                "is empty; use null or a prompt source such as 'builtin:tiny'")
        _positive(self, "num_eval_prompts")


@dataclass
class LoggingConfig(ConfigBase):
    """Metrics and sample videos."""

    report_to: str = option("tensorboard", "experiment tracker", choices=("tensorboard", "wandb", "none"))
    log_every: int = option(1, "iterations between metric logs")
    sample_every: int = option(0, "iterations between sample videos (0 = only at the end)")
    video_format: str = option("gif", "file format of sample videos", choices=("gif", "mp4"))
    project_name: str = option("pisces_rl", "tracker project name")
    judge: str = option("none", "programmatic judge of the evaluation videos, never seen by a reward: 'none', "
                                "'shapesbench' (ShapesWorld) or 'package.module:function'")
    eval_every: int = option(0, "iterations between evaluations on the held-out prompts during training (0 = only "
                                "before and after); each logs eval/reward/... (and eval/judge/...) and adds a "
                                "point to reward_curve.png")
    curve_smoothing: float = option(0.6, "EMA weight of the smoothed training curves in reward_curve.png, in "
                                         "[0, 1) (TensorBoard's debiased EMA and default; 0 = raw)")
    video_cell_size: int = option(256, "before_after video: each video upscaled (nearest neighbour) to at least "
                                       "this many pixels per side")

    def _check(self) -> None:
        from pisces_rl import registry

        require(self.judge == "none" or registry.lookup("judge", self.judge) is not None or ":" in self.judge, "judge",
                f"{self.judge!r} is not 'none', a registered judge ({', '.join(registry.names('judge')) or 'none'}) "
                "or an import path 'package.module:function'")
        _positive(self, "log_every")
        _positive(self, "sample_every", zero_ok=True)
        require(self.project_name.strip() != "", "project_name", "is empty")
        _positive(self, "eval_every", zero_ok=True)
        require(0 <= self.curve_smoothing < 1, "curve_smoothing", f"must be in [0, 1), got {self.curve_smoothing}")
        _positive(self, "video_cell_size")


@dataclass
class CheckpointConfig(ConfigBase):
    """Checkpoint saving and resuming."""

    save_every: int = option(0, "iterations between checkpoints (0 = only at the end)")
    keep_last: int = option(2, "checkpoints kept on disk (older ones are deleted)")
    resume_from: Optional[str] = option(None, "null, 'latest' (newest in output_dir) or a checkpoint directory")

    def _check(self) -> None:
        _positive(self, "save_every", zero_ok=True)
        _positive(self, "keep_last")
        if self.resume_from not in (None, "latest"):
            require(os.path.isdir(self.resume_from), "resume_from",
                    f"{self.resume_from!r} is not a directory; use null, 'latest' or a checkpoint directory")


@dataclass
class GRPOConfig(ConfigBase):
    """A GRPO post-training run."""

    model: ModelConfig = section(ModelConfig, "the policy model and its LoRA adapters")
    sampling: SamplingConfig = section(SamplingConfig, "rollout sampling")
    rewards: RewardsConfig = section(RewardsConfig, "rewards and weights (YAML may give {name: weight} directly)")
    train: TrainConfig = section(TrainConfig, "optimisation")
    data: DataConfig = section(DataConfig, "prompts")
    logging: LoggingConfig = section(LoggingConfig, "metrics and sample videos")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints")
    nft: NFTConfig = section(NFTConfig, "DiffusionNFT update (train.algorithm=nft)")
    output_dir: str = option("runs/grpo", "run directory: resolved config, logs, samples, checkpoints, LoRA")
    overwrite_output_dir: bool = option(False, "start over in an output_dir that holds a previous run, removing "
                                               "that run's files (otherwise such a run stops with an error, unless "
                                               "checkpoint.resume_from continues it)")

    def _check(self) -> None:
        require(self.output_dir.strip() != "", "output_dir", "is empty; use e.g. runs/grpo")
        check_video_shape(self)
        batch_arithmetic(self, 1)


def check_video_shape(cfg) -> None:
    """Cross-section checks shared by every run config: the model family's frame count and size, and the
    reward's frames within the sampled ones."""
    s = cfg.sampling
    if cfg.model.family == "wan":
        lower = (s.num_frames - 1) // 4 * 4 + 1
        require(s.num_frames % 4 == 1, "sampling.num_frames",
                f"the wan family needs 4k+1 frames, got {s.num_frames}; use {max(1, lower)} or {lower + 4}")
        for name in ("height", "width"):
            value = getattr(s, name)
            require(value % 16 == 0, f"sampling.{name}",
                    f"the wan family needs a multiple of 16, got {value}; use {max(16, round(value / 16) * 16)}")
    r = cfg.rewards
    if r.num_frames is not None:
        require(r.num_frames <= s.num_frames, "rewards.num_frames",
                f"{r.num_frames} exceeds the {s.num_frames} frames per video (sampling.num_frames)")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def videos_per_process(t, num_processes: int, unit: str, sampled: Optional[str]) -> int:
    """Videos per process per ``unit`` (iteration/step) when ``t.prompts_per_step`` whole groups of
    ``t.num_generations`` are split over ``num_processes``; ConfigError if the groups or, when ``sampled`` names the
    verb ("samples", "generates"), the rollout forwards of ``t.sample_batch_size`` do not divide."""
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(f"num_processes must be a positive integer, got {num_processes!r}")
    P = t.prompts_per_step
    if P % num_processes:
        raise ConfigError(f"{P} prompts per {unit} cannot be split into whole groups over {num_processes} "
                          f"processes; set train.prompts_per_step to a multiple of {num_processes}",
                          "train.prompts_per_step")
    per_process = P // num_processes * t.num_generations
    if sampled and per_process % t.sample_batch_size:
        raise ConfigError(f"each process {sampled} {per_process} videos per {unit} (prompts_per_step / "
                          f"{num_processes} processes x num_generations), not divisible by {t.sample_batch_size}; use a "
                          f"divisor of {per_process}: {_divisors(per_process)}", "train.sample_batch_size")
    return per_process


def batch_arithmetic(cfg: GRPOConfig, num_processes: int = 1) -> dict[str, int]:
    """Derived per-iteration counts for ``num_processes`` processes; ConfigError if they do not divide.

    Each process gets whole prompt groups (``prompts_per_step`` divisible by the process count), samples
    its videos in rollout forwards of ``sample_batch_size`` and trains on them in micro-batches of
    ``train_batch_size``, ``gradient_accumulation_steps`` micro-batches per optimiser step.
    """
    t, s = cfg.train, cfg.sampling
    P, G = t.prompts_per_step, t.num_generations
    per_process = videos_per_process(t, num_processes, unit="iteration", sampled="samples")
    step = t.train_batch_size * t.gradient_accumulation_steps
    if per_process % step:
        raise ConfigError(f"each process trains on {per_process} videos per inner epoch, not divisible by "
                          f"train_batch_size x gradient_accumulation_steps = {step}; choose them so that their "
                          f"product divides {per_process} (divisors: {_divisors(per_process)})",
                          "train.train_batch_size")
    micro = per_process // t.train_batch_size
    opt_per_epoch = micro // t.gradient_accumulation_steps
    return {
        "num_processes": num_processes,
        "prompts_per_iteration": P,
        "prompts_per_process": P // num_processes,
        "num_generations": G,
        "videos_per_iteration": P * G,
        "videos_per_process": per_process,
        "rollout_forwards_per_process": per_process // t.sample_batch_size,
        "micro_batches_per_epoch": micro,
        "optimizer_steps_per_epoch": opt_per_epoch,
        "optimizer_steps_per_iteration": opt_per_epoch * t.num_iterations,
        "total_optimizer_steps": opt_per_epoch * t.num_iterations * t.max_steps,
        "videos_per_optimizer_step": step * num_processes,
        "train_timesteps_per_video": train_timesteps_per_video(s),
    }
