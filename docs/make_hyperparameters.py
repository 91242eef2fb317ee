"""``python docs/make_hyperparameters.py``: regenerate docs/hyperparameters.md below its marker line.

Each recipes/configs/*.yaml is loaded with ``load_config`` (``backprop_*``: ``BackpropConfig``, else ``GRPOConfig``)
and flattened, class defaults included. A source is ``key -> text`` or ``key -> {scope: text}``, scope = a recipe, an
algorithm (grpo, nft, backprop), a group (tiny, shapes, wan) or ``*``, most specific first. ``missing()`` lists the
values with neither a source nor an engineering role; tests/test_hyperparameters_doc.py needs it empty.
"""
from __future__ import annotations

import functools
import inspect
from collections import Counter
from pathlib import Path

from pisces_rl.config import BackpropConfig, GRPOConfig, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
PAGE, MARKER = ROOT / "docs" / "hyperparameters.md", "<!-- generated below: python docs/make_hyperparameters.py -->"
DEFRUN = ("the default runs (`benchmarks/results/default_runs.md`, fifth follow-up, pre-registered): CFG-free GRPO at "
          "lr 5e-4 for 80 iterations on one summed reward raised the held-out PISCES reward on 6 of 6 seeds above its "
          "null control; the earlier default (CFG 3, per-reward advantages, 1e-3, 40 iterations) on 1 of 3")
GATE = ("the learning gate (`benchmarks/results/learning_gate.md`): GRPO with this setting raised ShapesBench on 3 of 3 seeds above its null control, the default did not")
GROUPS = {"tiny": "tiny CPU", "shapes": "ShapesWorld CPU", "wan": "Wan GPU", "hunyuan": "HunyuanVideo GPU",
          "cogvideox": "CogVideoX GPU", "gpu": "GPU, other families"}
KEPT, TINY = "kept from the earlier recipe; not sourced", "test fixture (no source)"  # TINY: no scope of a tiny recipe
UNUSED = {k: tuple(v.split()) for k, v in {  # key prefixes shown "(in parentheses)": not read by that kind of recipe
    "grpo": "nft.", "backprop": "sampling.train_timestep_fraction", "dataset": "sampling.eta sampling.sde_ "
    "sampling.noise_block data.prompts", "nft": "sampling.eta sampling.sde_ sampling.train_timestep_fraction "
    "sampling.noise_block train.shared_group_noise train.epsilon train.advantage_mode train.scale_rewards train.beta "
    "train.cd_ train.base_anchor_weight"}.items()}
FG, DG, PC, NFT, REL = "Flow-GRPO", "DanceGRPO", "PISCES code", "NVlabs/DiffusionNFT", "`distill_hunyuan.sh` @f8606b0"
TW, REC = "ours: 81 frames as 4 windows of 8, averaged; not sourced", "the base model's recommended sampling"
DECAY, UR = f"type 1: {NFT} `config/nft.py:60`, `train_nft_sd3.py:169-189`", "Measured by `python benchmarks/" \
    "update_ratio.py` (tiny Wan, 10 steps, `benchmarks/results/update_ratio.json`): ‖ΔW‖/‖W‖"
SOURCES = {
    "model.pretrained": {"tiny": "random tiny Wan built in code", "shapes": "the ShapesWorld base model (`make world`, "
        f"DESIGN §3)", "wan": f"the Wan2.1 model of {FG} (`config/grpo.py` `general_ocr_wan2_1`) and {DG} "
        "(`finetune_wan_2_1_grpo.sh`); the paper: VideoCrafter2, HunyuanVideo"},
    "model.family": "the Wan adapter (`models/wan.py`); the tiny and ShapesWorld models are `WanPipeline`s too",
    "model.finetune": {"*": "LoRA (library default)", "wan": f"LoRA as {FG}'s Wan run (`scripts/train_wan2_1.py`); the "
        "paper's GRPO trains fully (`distill_hunyuan_grpo.sh`): deliberate departure"},
    "model.lora_rank": {"shapes": KEPT, "wan": f"{FG} `scripts/train_wan2_1.py` (r 32, α 64, Gaussian init)"},
    "model.lora_alpha": {"shapes": KEPT, "wan": f"{FG} `scripts/train_wan2_1.py` (α/r = 2)"},
    "model.lora_target_modules": f"attention q/k/v/out: {FG}'s Wan list (`scripts/train_wan2_1.py`) less its `add_*` "
        "entries, which only Wan I2V has; PISCES `distill.py`'s diffusers targets",
    "model.lora_path": f"fresh adapters, as every reference ({FG} `train.lora_path = None`)",
    "sampling.num_frames": {"shapes": "the world's clip format (9 frames, 32×32)", "wan": "Wan2.1's default clip "
        f"(diffusers `WanPipeline.__call__`: 81)", "grpo_short_video_wan": f"{FG} `general_ocr_wan2_1` (33)",
        "backprop_short_video_wan": f"{FG} `general_ocr_wan2_1` (33)"},
    "sampling.height": {"shapes": "the world's clip format", "wan": "Wan2.1's 480p (diffusers `WanPipeline.__call__` "
        f"480×832; {FG}'s Wan run: 240×416)"},
    "sampling.num_inference_steps": {"shapes": f"{REC} (`benchmarks/shapes_base_model.py`)", "wan": f"{FG} "
        f"`general_ocr_wan2_1`, {DG} Wan `--sampling_steps 20`"},
    "sampling.guidance_scale": {"shapes": f"{REC} (CFG 3)", "grpo_shapes_cpu": f"CFG-free rollouts, training and "
        f"evaluation (one denoiser pass per step, as DiffusionNFT's rollouts): {DEFRUN}", "nft_shapes_cpu": "evaluation CFG-free, as NVlabs/DiffusionNFT "
        "`scripts/train_nft_sd3.py:274` (its eval samples with `config.sample.guidance_scale`, 1.0 in `config/nft.py:64`); "
        "rollouts: nft.guidance_scale", "wan": f"{DG} Wan `--cfg_infer 5.0`, diffusers `WanPipeline` default ({FG} Wan: 4.5)"},
    "sampling.eta": f"{PC} `distill_grpo.py` (`flux_step(..., eta=0.25)`); {FG} base 0.7, {DG} Wan 0.3",
    "sampling.sde_type": {"*": f"flow_grpo = {FG} `sde_step_with_logprob`, std η·sqrt(σ/(1−σ))·sqrt(Δσ), as these "
        "recipes have been run; total variance at η 0.25 on the shift-2 16-step grid 0.256 vs 0.062 for dance_grpo "
        f"(`sde_std_table`)", "wan": f"dance_grpo = {PC} `distill_grpo.py` ({DG} `flux_step`), std η·sqrt(Δσ)"},
    "sampling.train_timestep_fraction": {"grpo_shapes_cpu": f"all 4 steps of the SDE window: {GATE}",
        "shapes": "4 of the 15 SDE steps, for cost; all 15 lost more reward in the "
        "reward-only sweep (`benchmarks/results/shapes_ablation.md`)", "wan": f"{KEPT} ({FG} Wan 0.99, {DG} Wan 0.6)"},
    "sampling.sde_window": {"grpo_shapes_cpu": f"SDE noise on the first 4 of 16 steps (review Q6): {GATE}",
                            "*": f"every step stochastic, as {FG}'s Wan script, {DG}, {PC} (a window: Flow-GRPO-Fast)"},
    "sampling.noise_block": "i.i.d. noise per latent element, as every reference (block noise: ours, opt-in)",
    "sampling.negative_prompt": f"empty, as {FG}'s Wan run (`compute_text_embeddings([\"\"])`)",
    "sampling.max_sequence_length": {"shapes": f"{REC} (trained on 32 text tokens)", "wan": "diffusers "
        f"`WanPipeline.encode_prompt` default; `WanPipeline.__call__` and {FG} use 512"},
    "rewards.weights.ot_quality": "w_q = w_s = 1.0: paper §4",
    "rewards.encoder": {"tiny": "random tiny BLIP built in code", "shapes": "the ShapesWorld BLIP-class encoder",
        "wan": "our BLIP-ITM stand-in for InternVideo2 (DESIGN §2): deliberate departure"},
    "rewards.ot_map": {"tiny": "none: the random encoder has no fitted map", "shapes": "the world's Neural OT map",
        "wan": "fitted by `pisces-rl fit-ot-map` (last table)"},
    "rewards.use_ot": "paper (false = the 'w/o OT' ablation)", "rewards.mass": "m = 0.9: paper Table 7 / Algorithm 3",
    "rewards.cost_embeddings": "roar-ai/pisces @f8606b0 `partial_optimal_transport.py` `build_partial_ot_prior` "
        "(each fusion layer's query vs key)",
    "rewards.gamma": "γ = η = 0.2: paper Table 7 / Algorithm 3", "rewards.epsilon": "ε = 0.05: paper Algorithm 3",
    "rewards.num_frames": {"shapes": "all 9 (the world's encoder subsamples its own)", "wan": "paper: the OT map's "
        "8-frame clips (WebVid10M); the released backprop scores 26 (`distill.py` @935fa60)"},
    "rewards.temporal_windows": {"tiny": TINY, "*": "one clip, as the paper", "grpo_long_video_wan": TW,
        "backprop_long_video_wan": TW},
    "train.max_steps": {"shapes": "40 iterations × 32 videos = the CPU budget (≤ 15 min on 2 cores)",
        "grpo_shapes_cpu": f"80 CFG-free iterations × 32 videos, about the wall time of 40 at CFG 3: {DEFRUN}", "wan": "PISCES "
        "README \"192–256 optimizer steps\"; `distill_hunyuan_grpo.sh` `--max_train_steps=256`"},
    "train.algorithm": "the recipe's update (GRPO: DESIGN §1(d); NFT: docs/nft.md)",
    "train.prompts_per_step": {"shapes": "4 prompts × 8 videos = 32 per iteration, one optimiser step (8 videos per "
        "step gave a gradient of mostly noise: `grpo_shapes_cpu.yaml`)", "wan": KEPT},
    "train.num_generations": {"shapes": "see prompts_per_step", "wan": f"{KEPT} ({PC}: G = 16)",
        "grpo_short_video_wan": f"{PC}: G = 16"},
    "train.train_batch_size": {"shapes": "× gradient_accumulation_steps = the 32 videos of one optimiser step",
        "wan": f"{KEPT}; × gradient_accumulation_steps = one optimiser step per iteration"},
    "train.gradient_accumulation_steps": {"shapes": "see train_batch_size", "wan": "see train_batch_size"},
    "train.num_iterations": f"{FG} `num_inner_epochs` 1, trl `num_iterations` 1",
    "train.shared_group_noise": {"grpo_shapes_cpu": f"a group shares its initial noise (review Q6; {DG} "
                                                    f"`--init_same_noise`): {GATE}", "*": f"{FG} `same_latent = False` ({DG}'s Wan script shares it: `--init_same_noise`)"},
    "train.learning_rate": {"grpo_shapes_cpu": f"5e-4 with twice the iterations (null drift falls with the step): "
        f"{DEFRUN}", "shapes": "ShapesWorld learning-rate comparison (`benchmarks/results/shapes_ablation.md`):"
        " 3e-3 trades ot_quality for ot_semantic and lowers ShapesBench Total by 4.4 over 3 seeds, 1e-2 collapses; "
        "1e-3 chosen after the judge result was seen", "nft_shapes_cpu": "`grpo_shapes_cpu`'s when the two were first "
        "compared (reference 3e-4 at LoRA α/r = 2 ≈ 6e-4 at ours); not tuned on the judge; with it NFT passed its "
        "pre-registered default run (`benchmarks/results/default_runs.md`)", "wan": f"{FG} "
        f"`config/grpo.py` `general_ocr_wan2_1` (LoRA). The paper's 1e-6 is full fine-tuning (`distill_hunyuan_grpo"
        f".sh`); full-FT alternative 1e-5: {DG} `finetune_wan_2_1_grpo.sh`. {UR} 1.75e-3 here vs 6.85e-6 at the "
        "earlier LoRA r128/α128, lr 1e-6"},
    "train.weight_decay": {"*": f"trl `GRPOConfig` default; not matched to {FG} `config/base.py` 1e-4, {DG} Wan 1e-4, "
        f"{PC} `--weight_decay` 1e-3; not measured here", "nft_shapes_cpu": f"{NFT} `config/base.py:72`"},
    "train.adam_betas": f"{FG} `scripts/train_wan2_1.py` (`config/base.py`), PISCES `distill.py`, trl",
    "train.lr_scheduler": f"{FG} (no scheduler), {PC} `--lr_scheduler constant`",
    "train.warmup_steps": f"{DG} Wan `--lr_warmup_steps 0` ({PC}'s default 10 is unused by its constant schedule)",
    "train.epsilon": {"tiny": TINY, "*": f"{FG} `config/base.py` clip_range, {PC} ({FG}'s Wan config: 1e-3)",
        "shapes": "set when the recipe was written; every run in `benchmarks/results/shapes_ablation.md` used it; no "
        "clip sweep is recorded"},
    "train.adv_clip_max": {"*": f"{PC}, {DG} `--adv_clip_max 5.0`, {FG} `config/base.py`", "nft": "also NFT's loss "
        f"scale, r = 0.5 + clip(A, ±5)/10: {NFT} `config/base.py:84`, `train_nft_sd3.py:960`"},
    "train.advantage_mode": {"grpo_shapes_cpu": f"sum: one summed reward, group-normalised, as trl's GRPOTrainer "
        f"and Flow-GRPO combine rewards (`ot_semantic` is often exactly 0, so its own normalised advantage is mostly "
        f"noise): {DEFRUN}", "*": f"per_reward = {PC}: each reward its own group-normalised advantage, clipped "
        "surrogates summed", "grpo_long_video_tiny_cpu": "sum: DESIGN §1(d)'s other mode, exercised by this fixture"},
    "train.scale_rewards": {"grpo_shapes_cpu": f"batch std (Flow-GRPO SD3 `global_std=True`, review F8): {GATE}",
                            "*": f"trl default; each group's std as {PC} and {FG}'s Wan config (`global_std=False`); eps "
        f"1e-4: trl GRPOTrainer, {FG} `stat_tracking.py`"},
    "train.beta": f"the paper has no KL; when > 0 on {FG}'s scale (mean Δμ²/(2·g²), g² = std²/|dt|)",
    "train.cd_weight": f"paper Eq. 7's L_CD is optional in GRPO ({PC} `distill_grpo.py`)",
    "train.cd_target": "released `distill_grpo.py`/`distill.py` (no `--use_ema`); read when cd_weight > 0",
    "train.cd_ema_decay": "released `--ema_decay` default; read when cd_weight > 0",
    "train.cd_guidance_scale": "released `--not_apply_cfg_solver` (one conditional pass); read when cd_weight > 0",
    "train.base_anchor_weight": "off: not in the paper",
    "train.max_grad_norm": f"{FG} `config/base.py`, {DG} `--max_grad_norm 1.0`, PISCES `distill.py`",
    "data.prompts": {"shapes": "the world's 256 training captions (evaluation: held-out ones)", "wan": f"{KEPT}; "
        "VBench is the paper's evaluation suite (the PISCES scripts train on HD-Mixkit captions)"},
    "nft.beta": f"{NFT} `config/nft.py:61`", "nft.kl_weight": f"{NFT} `config/nft.py:24`",
    "nft.adaptive_weight": f"{NFT} `train_nft_sd3.py:940-957`", "nft.timestep_fraction": f"{NFT} `config/base.py:87`",
    "nft.reward_std": f"global std + 1e-4: {NFT} `config/base.py:57`, `stat_tracking.py:28`",
    "nft.old_decay_start": DECAY, "nft.old_decay_rate": DECAY, "nft.old_decay_max": DECAY,
    "nft.eta": f"ODE sampler: {NFT} `config/nft.py:65`", "nft.guidance_scale": f"CFG-free: {NFT} `config/nft.py:64`"}
W22, A14, TI = "Wan-Video/Wan2.2 `wan/configs/", "grpo_wan22_a14b_video", "grpo_wan22_ti2v_video"
NOT22 = f"not sourced for Wan2.2 TI2V (no Wan2.2 recipe in {FG} or {DG}); "
SOURCES["model.pretrained"].update({A14: "the Wan2.2 T2V MoE (two 14B experts, `boundary_ratio` 0.875 in its "
    "`model_index.json`)", TI: "the Wan2.2 dense 5B T2V/I2V model (text-to-video here)"})
MILES = "radixark/miles_diffusion `scripts/run_diffusion_grpo_wan22_pickscore_low_memory_17gpu.py` (Wan2.2-A14B GRPO"
for _key in ("model.lora_rank", "model.lora_alpha"):
    SOURCES[_key].update({A14: f"{MILES}: r 64, α 128, trains `transformer` only)", TI: NOT22 + SOURCES[_key]["wan"]})
SOURCES["model.family_options.guidance_scale_2"] = f"{W22}wan_t2v_A14B.py` `sample_guide_scale = (3.0, 4.0)` (low, high noise)"
SOURCES["sampling.num_frames"].update({A14: "diffusers `WanPipeline.__call__` default 81 (5 s at A14B's 16 fps)",
                                       TI: f"{W22}wan_ti2v_5B.py` `frame_num = 121` (5 s at 24 fps)"})
SOURCES["sampling.height"].update({A14: "480P: diffusers `WanPipeline.__call__` default 480×832 (A14B card: 480P/720P)",
                                   TI: "720P of the TI2V-5B model card (1280×704)"})
SOURCES["sampling.num_inference_steps"].update({A14: f"{W22}wan_t2v_A14B.py` `sample_steps = 40`",
                                                TI: f"{W22}wan_ti2v_5B.py` `sample_steps = 50`"})
SOURCES["sampling.guidance_scale"].update({A14: f"high-noise expert: {W22}wan_t2v_A14B.py` `sample_guide_scale` 4.0",
                                           TI: f"{W22}wan_ti2v_5B.py` `sample_guide_scale = 5.0`"})
SOURCES["sampling.max_sequence_length"].update({A14: "diffusers `WanPipeline.__call__` default 512",
                                                TI: "diffusers `WanPipeline.__call__` default 512"})
SOURCES["train.learning_rate"].update({A14: f"{MILES}: `--lr 1e-4`), as {FG}'s Wan2.1 LoRA run",
                                       TI: NOT22 + SOURCES["train.learning_rate"]["wan"]})
SOURCES.update({"sampling.width": SOURCES["sampling.height"], "rewards.eta": SOURCES["rewards.gamma"],
                "rewards.weights.ot_semantic": SOURCES["rewards.weights.ot_quality"]})
DGH = f"{DG} HunyuanVideo (`finetune_hunyuan_grpo.sh`, `train_grpo_hunyuan.py`)"
HUNYUAN = {  # the HunyuanVideo GPU recipe's sources (scope "hunyuan")
    "model.pretrained": f"the paper's long-video model; {DGH} and PISCES (`distill_hunyuan_grpo.sh`) train it",
    "model.family": "the HunyuanVideoPipeline adapter (`models/hunyuan_video.py`)",
    "model.finetune": f"LoRA for memory (13B); {DGH} and PISCES (`distill_grpo.py`) train fully: deliberate departure",
    "model.lora_rank": f"not sourced for HunyuanVideo (no reference uses LoRA on it): {FG}'s Wan2.1 r 32, α 64",
    "model.lora_alpha": f"not sourced for HunyuanVideo: {FG}'s Wan2.1 (α/r = 2)",
    "model.scheduler_shift": f"{DGH} `--shift 5` (the checkpoint's scheduler: 7; PISCES 720p: `--shift 17`)",
    "sampling.num_frames": f"{DGH} `--t 53` (the paper: 5 s @ 25 fps; PISCES 125 frames @ 720×1280)",
    "sampling.height": f"{DGH} `--h 480 --w 480`", "sampling.width": f"{DGH} `--h 480 --w 480`",
    "sampling.num_inference_steps": f"{DGH} `--sampling_steps 16`",
    "sampling.guidance_scale": f"embedded guidance (distilled, one branch): {DGH} `guidance=6018` in rollouts and "
        "training, 6016 in bf16 = 6.0×1000 in bf16; `HunyuanVideoPipeline` default 6.0",
    "sampling.eta": f"{DGH} `--eta 0.25`; {PC} `distill_grpo.py` 0.25",
    "sampling.sde_type": f"dance_grpo = {DGH} `flux_step` (`sde_solver=True`), std η·sqrt(Δσ)",
    "sampling.train_timestep_fraction": f"{DGH} `--timestep_fraction 0.6`",
    "sampling.max_sequence_length": "`HunyuanVideoPipeline` default 256 (Llama tokens after the template's crop)",
    "rewards.encoder": "our BLIP-ITM stand-in for InternVideo2 (DESIGN §2): deliberate departure",
    "rewards.ot_map": "fitted by `pisces-rl fit-ot-map` (last table)",
    "rewards.num_frames": "paper: the OT map's 8-frame clips (WebVid10M)",
    "rewards.temporal_windows": "ours: 53 frames as 4 windows of 8, averaged; not sourced",
    "train.max_steps": f"{DGH} `--max_train_steps 202` (PISCES: 256)",
    "train.prompts_per_step": f"one prompt per GPU: {DGH} `--train_batch_size 1`",
    "train.num_generations": f"{DGH} `--num_generations 24` (its `--bestofn 8` subset is not implemented)",
    "train.shared_group_noise": f"{DGH} `--use_same_noise`",
    "train.train_batch_size": "× gradient_accumulation_steps = a process's 24 videos: one optimiser step per iteration",
    "train.gradient_accumulation_steps": "see train_batch_size",
    "train.learning_rate": f"not sourced for HunyuanVideo LoRA: {FG}'s Wan2.1 LoRA lr; full fine-tuning: {DGH} 1e-5, "
        "PISCES `distill_hunyuan_grpo.sh` 1e-6",
    "train.weight_decay": f"{DGH} `--weight_decay 0.0001`", "train.warmup_steps": f"{DGH} `--lr_warmup_steps 0`",
    "train.epsilon": f"{DGH} `clip_range = 1e-4`, {PC}", "train.adv_clip_max": f"{DGH} `adv_clip_max = 5.0`",
    "train.scale_rewards": f"each prompt's group std: {DGH} `--use_group`",
    "train.max_grad_norm": f"{DGH} `--max_grad_norm 1.0`",
    "data.prompts": f"{KEPT}; VBench is the paper's evaluation suite ({DG} trains on its own caption set)"}
for _key, _text in HUNYUAN.items():
    _entry = SOURCES.get(_key, "")
    SOURCES[_key] = {**(_entry if isinstance(_entry, dict) else {"*": _entry} if _entry else {}), "hunyuan": _text}
SOURCES["model.scheduler_shift"] = {**SOURCES["model.scheduler_shift"], "*": "null: the checkpoint's scheduler "
                                    "config, as every reference but DanceGRPO's HunyuanVideo run"}
CG, CVC = "CogVideo `finetune/schemas/args.py`", "the CogVideoX-2b model card"
COGVIDEOX = {  # the CogVideoX GPU recipe's sources (scope "cogvideox"), merged into SOURCES below
    "model.pretrained": "the CogVideoX-2b T2V model card (diffusers `CogVideoXPipeline`, `CogVideoXDDIMScheduler`); "
        "the paper: VideoCrafter2, HunyuanVideo",
    "model.family": "the CogVideoX adapter (`models/cogvideox.py`)",
    "model.lora_rank": f"{FG} `scripts/train_wan2_1.py` (r 32, α 64), the video GRPO LoRA; {CG} LoRA SFT: r 128, α 64",
    "model.lora_target_modules": f"attention q/k/v/out: {CG} `target_modules`",
    "sampling.num_frames": f"{CVC} (49 = 6 s × 8 fps + 1; the transformer's `sample_frames`)",
    "sampling.height": f"{CVC} (720×480 only)",
    "sampling.num_inference_steps": "diffusers `CogVideoXPipeline.__call__` default and the model card example (50)",
    "sampling.guidance_scale": "diffusers `CogVideoXPipeline.__call__` default and the model card example (6; dynamic "
        "CFG off)",
    "sampling.sde_type": "ddim = DDPO's stochastic DDIM step (kvablack/ddpo-pytorch `ddim_with_logprob.py`), the VP "
        "family's own sampler; `rollout/ddim.py`",
    "sampling.eta": "ddpo-pytorch `config/base.py` `sample.eta = 1.0` (DDPM-like noise for the DDIM step)",
    "sampling.train_timestep_fraction": f"not sourced: 15 of the 49 SDE steps, for cost ({FG} Wan 0.99, {DG} Wan 0.6)",
    "sampling.max_sequence_length": "diffusers `CogVideoXPipeline` default = the transformer's `max_text_seq_length`",
    "rewards.encoder": SOURCES["rewards.encoder"]["wan"], "rewards.ot_map": SOURCES["rewards.ot_map"]["wan"],
    "rewards.num_frames": SOURCES["rewards.num_frames"]["wan"],
    "rewards.temporal_windows": "ours: 49 frames as 4 windows of 8, averaged; not sourced",
    "train.max_steps": SOURCES["train.max_steps"]["wan"],
    "train.prompts_per_step": "not sourced: the Wan long-video recipe's batch",
    "train.num_generations": f"not sourced ({PC}: G = 16)",
    "train.train_batch_size": "not sourced; × gradient_accumulation_steps = one optimiser step per iteration",
    "train.gradient_accumulation_steps": "see train_batch_size",
    "train.learning_rate": f"{FG} `config/grpo.py` `general_ocr_wan2_1` (video LoRA r 32, α 64); no video GRPO code "
        f"trains CogVideoX. {CG} LoRA SFT: 2e-5 at r 128, α 64",
    "data.prompts": SOURCES["data.prompts"]["wan"]}
COGVIDEOX.update({"model.lora_alpha": COGVIDEOX["model.lora_rank"], "sampling.width": COGVIDEOX["sampling.height"]})
for _key, _text in COGVIDEOX.items():
    _entry = SOURCES.get(_key, "")
    SOURCES[_key] = {**(_entry if isinstance(_entry, dict) else {"*": _entry}), "cogvideox": _text}
DDPO, MS = "ddpo-pytorch `config/base.py`", "grpo_text_to_video_sd_ms"
T2V = "diffusers `TextToVideoSDPipeline.__call__` default"
for _key, _text in {  # the ModelScope T2V recipe (text_to_video_sd family): DDPO's settings
        "model.pretrained": "ModelScope T2V (diffusers' `TextToVideoSDPipeline` checkpoint), the ε-prediction UNet "
        "stand-in for the paper's VideoCrafter2", "model.family": "the ε-prediction UNet family (`TextToVideoSDPipeline`)",
        "model.finetune": f"LoRA: {DDPO} `use_lora = True`", "model.lora_rank": "ddpo-pytorch `scripts/train.py`: "
        "diffusers `LoRAAttnProcessor` default rank 4, no network_alpha (scale 1)", "model.lora_alpha": "= rank (scale 1), "
        "as ddpo-pytorch's `LoRAAttnProcessor`", "model.lora_target_modules": "the attention projections DDPO's "
        "`LoRAAttnProcessor` adapts", "model.lora_path": "fresh adapters, as DDPO", "sampling.num_frames": f"{T2V} (16)",
        "sampling.height": f"{T2V} (unet sample_size 32 × VAE factor 8 = 256)",
        "sampling.width": f"{T2V} (unet sample_size 32 × VAE factor 8 = 256)",
        "data.prompts": "the VBench prompt suite, as the Wan recipes (DDPO: ImageNet animal names)", "sampling.num_inference_steps":
        f"{DDPO} `sample.num_steps = 50`", "sampling.guidance_scale": f"{DDPO} `sample.guidance_scale = 5.0`",
        "sampling.eta": f"{DDPO} `sample.eta = 1.0`", "sampling.sde_type": "ddim = DDPO `ddim_with_logprob.py` "
        "(`rollout/ddim.py`)", "sampling.train_timestep_fraction": f"{DDPO} `train.timestep_fraction = 1.0`",
        "sampling.sde_window": "every step stochastic, as DDPO", "sampling.negative_prompt": "empty, as DDPO "
        "(`neg_prompt_embed` of \"\")", "sampling.max_sequence_length": "not read: CLIP's 77 tokens",
        "train.max_steps": f"{DDPO} `num_epochs = 100`", "train.num_generations": f"{DDPO} per-prompt stat tracking "
        "buffer 16", "train.prompts_per_step": "not sourced (DDPO samples 2 batches per GPU per epoch)",
        "train.train_batch_size": f"{DDPO} `train.batch_size = 1`", "train.gradient_accumulation_steps":
        "not sourced", "train.num_iterations": f"{DDPO} `train.num_inner_epochs = 1`", "train.learning_rate":
        f"{DDPO} `train.learning_rate = 3e-4` (LoRA)", "train.weight_decay": f"{DDPO} `train.adam_weight_decay = 1e-4`",
        "train.adam_betas": f"{DDPO} `adam_beta1/2`", "train.epsilon": f"{DDPO} `train.clip_range = 1e-4`",
        "train.adv_clip_max": f"{DDPO} `train.adv_clip_max = 5`", "train.max_grad_norm": f"{DDPO} "
        "`train.max_grad_norm = 1.0`", "train.beta": "0: DDPO has no KL", "train.advantage_mode": "one summed reward, "
        "as DDPO's single reward", "train.scale_rewards": "per prompt (group), DDPO's per-prompt stat tracking",
        "train.shared_group_noise": "independent noise per video, as DDPO", "train.lr_scheduler": "constant, as DDPO",
        "train.warmup_steps": "none, as DDPO", "sampling.noise_block": "i.i.d. noise per element, as DDPO",
        "train.algorithm": "GRPO (DDPO's clipped update)", "rewards.encoder": "our BLIP-ITM stand-in for InternVideo2",
        "rewards.ot_map": "fitted by `pisces-rl fit-ot-map`", "rewards.num_frames": "paper: the OT map's 8-frame clips",
        }.items():
    _entry = SOURCES.get(_key)
    SOURCES[_key] = {**_entry, MS: _text} if isinstance(_entry, dict) else {**({"*": _entry} if _entry else {}),
                                                                            MS: _text}
MOCHI, MP = "grpo_mochi_preview", "diffusers `MochiPipeline.__call__` default"
MOCHI_WAN = "not sourced for Mochi (no RL code trains it): as `grpo_short_video_wan.yaml`"
for _key, _text in {  # the Mochi 1 recipe (mochi family): pipeline defaults; LoRA/optimiser from Flow-GRPO's Wan run
        "model.pretrained": "genmo/mochi-1-preview (diffusers `MochiPipeline` checkpoint)",
        "model.family": "the `MochiPipeline` family (inverted flow time)",
        "model.finetune": "LoRA: FastVideo / PISCES distill code \"LoRA is only supported for Mochi\" (`use_lora`)",
        "model.lora_rank": f"not sourced for Mochi RL: {FG}'s Wan2.1 LoRA (`scripts/train_wan2_1.py` r 32, α 64)",
        "model.lora_alpha": f"not sourced for Mochi RL: {FG}'s Wan2.1 LoRA (`scripts/train_wan2_1.py` r 32, α 64)",
        "model.lora_target_modules": "FastVideo's Mochi LoRA targets (`to_k, to_q, to_v, to_out.0`)",
        "sampling.num_frames": f"{MP} (19 = 6k+1)", "sampling.height": f"{MP} (`default_height` 480)",
        "sampling.width": f"{MP} (`default_width` 848)",
        "sampling.num_inference_steps": f"{MP} (64; linear-quadratic schedule, threshold 0.025)",
        "sampling.guidance_scale": f"{MP} (4.5, true CFG)",
        "sampling.eta": MOCHI_WAN, "sampling.sde_type": f"dance_grpo: {PC} `distill_grpo.py` flux_step (from {DG})",
        "sampling.train_timestep_fraction": f"not sourced: 16 of the 64 steps, for cost ({DG} 0.6 of 16)",
        "sampling.max_sequence_length": f"{MP} (256 T5 tokens)",
        "train.learning_rate": f"not sourced for Mochi: {FG}'s Wan2.1 LoRA lr (`config/grpo.py` `general_ocr_wan2_1`)",
        "train.max_steps": MOCHI_WAN, "train.prompts_per_step": MOCHI_WAN, "train.num_generations": MOCHI_WAN,
        "train.train_batch_size": "not sourced; × gradient_accumulation_steps = one optimiser step per iteration",
        "train.gradient_accumulation_steps": "see train_batch_size",
        "rewards.encoder": SOURCES["rewards.encoder"]["wan"], "rewards.ot_map": SOURCES["rewards.ot_map"]["wan"],
        "rewards.num_frames": SOURCES["rewards.num_frames"]["wan"], "data.prompts": MOCHI_WAN}.items():
    _entry = SOURCES.get(_key)
    SOURCES[_key] = {**_entry, MOCHI: _text} if isinstance(_entry, dict) else {**({"*": _entry} if _entry else {}),
                                                                               MOCHI: _text}
LTX, LTXP = "grpo_ltx_video_2b", "diffusers `LTXPipeline.__call__` default and the LTX-Video model card example"
for _key, _text in {  # the LTX-Video GPU recipe (ltx_video family); no GRPO code trains LTX-Video
        "model.pretrained": "the LTX-Video model card (diffusers `LTXPipeline`: T5-XXL, dynamic-shift flow scheduler); "
        "the paper: VideoCrafter2, HunyuanVideo", "model.family": "the LTXPipeline adapter (`models/ltx_video.py`)",
        "model.finetune": "LoRA, as the video GRPO LoRA runs (Flow-GRPO Wan)",
        "model.lora_rank": f"not sourced for LTX-Video: {FG} `scripts/train_wan2_1.py` (r 32, α 64); finetrainers' LTX "
        "LoRA SFT example: r 128, α 128", "model.lora_target_modules": "attention q/k/v/out, as finetrainers' LTX LoRA "
        "example `--target_modules`", "sampling.num_frames": f"{LTXP} (161 = 8k+1)",
        "sampling.height": "the model card / diffusers LTX example (480×704)",
        "sampling.num_inference_steps": f"{LTXP} (50)", "sampling.guidance_scale": f"{LTXP} (3; guidance_rescale 0)",
        "sampling.eta": f"{PC} `distill_grpo.py` (`flux_step(..., eta=0.25)`), as the Wan recipes",
        "rewards.encoder": COGVIDEOX["rewards.encoder"], "rewards.ot_map": COGVIDEOX["rewards.ot_map"],
        "rewards.num_frames": COGVIDEOX["rewards.num_frames"], "data.prompts": COGVIDEOX["data.prompts"],
        "sampling.sde_type": "dance_grpo: the PISCES code's `flux_step` (DanceGRPO), as the Wan recipes",
        "sampling.train_timestep_fraction": f"not sourced: 15 of the 50 SDE steps, for cost ({FG} Wan 0.99, {DG} Wan 0.6)",
        "sampling.max_sequence_length": "`LTXPipeline` default 128 (`convert_ltx_to_diffusers.py` tokenizer length)",
        "rewards.temporal_windows": "ours: 161 frames as 4 windows of 8, averaged; not sourced",
        "train.max_steps": COGVIDEOX["train.max_steps"], "train.prompts_per_step": COGVIDEOX["train.prompts_per_step"],
        "train.num_generations": COGVIDEOX["train.num_generations"],
        "train.train_batch_size": COGVIDEOX["train.train_batch_size"],
        "train.gradient_accumulation_steps": COGVIDEOX["train.gradient_accumulation_steps"],
        "train.learning_rate": f"not sourced for LTX-Video: {FG} `config/grpo.py` `general_ocr_wan2_1` (video LoRA r 32, "
        "α 64); no video GRPO code trains LTX-Video. finetrainers' LTX LoRA SFT: 3e-5 at r 128, α 128",
        }.items():
    _entry = SOURCES.get(_key)
    SOURCES[_key] = {**_entry, LTX: _text} if isinstance(_entry, dict) else {**({"*": _entry} if _entry else {}),
                                                                             LTX: _text}
SOURCES["model.lora_alpha"] = {**SOURCES["model.lora_alpha"], LTX: SOURCES["model.lora_rank"][LTX]}
SOURCES["sampling.width"] = {**SOURCES["sampling.width"], LTX: SOURCES["sampling.height"][LTX]}
BACKPROP = {  # the backprop table's sources where they differ from SOURCES
    "model.finetune": {"*": "LoRA (library default)", "wan": f"LoRA, as the released {REL} (r 256, α 32)"},
    "rewards.weights.ot_quality": f"paper §4; released {REL}: both reward weights and `--consistency_loss_weight` 1",
    "train.max_steps": {"shapes": KEPT, "wan": f"released {REL} `--max_train_steps 256` (README: 192–256)"},
    "train.prompts_per_step": {"shapes": KEPT, "wan": KEPT}, "train.num_generations": {"shapes": KEPT, "wan": KEPT},
    "train.latent_source": "PISCES Algorithm 1: x0 from data (released `LatentDataset`)",
    "train.video_dataset": {"*": "the ShapesWorld corpus clips", "wan": "captioned real videos of the recipe's size "
        "(released: HD-Mixkit latents)"},
    "train.dataset_size": {"shapes": KEPT, "wan": "not read: a dataset directory brings its own size"},
    "train.cd_weight": f"w_cd = 1: released {REL} `--consistency_loss_weight 1.0`",
    "train.huber_c": "PISCES `distill.py` (`huber_c = 0.001`); element-wise mean(sqrt(d²+c²)−c), as diffusers LCM",
    "train.cd_target": {"shapes": KEPT, "wan": f"stopgrad: the released {REL} has no `--use_ema`"},
    "train.teacher_steps": {"shapes": KEPT, "wan": f"released {REL} `--num_euler_timesteps 50`"},
    "train.sigma_range": {"shapes": KEPT, "wan": "every grid level, as released `distill.py` (`randint(0, N)`)"},
    "train.guidance_scale": f"one conditional pass: released {REL} `--not_apply_cfg_solver`",
    "train.teacher_guidance_scale": "= train.guidance_scale: the released teacher is conditional too",
    "train.adaptive_fusion": {"shapes": KEPT, "wan": "off: the paper's weighted sum L_CD − Σ w_r R_r (DESIGN §1(d))"},
    "train.learning_rate": {"shapes": KEPT, "wan": f"the Wan GRPO recipes' LoRA and lr ({FG}); VADER's reward-backprop "
        f"LoRA: 2e-4 (`run_text2video_train.sh`); released {REL}: LoRA r256/α32 at 1e-6. {UR} 1.82e-3 here vs 7.41e-5 "
        "at the earlier LoRA r128/α128, lr 1e-5"},
    "train.weight_decay": "0 as the GRPO recipes (trl default); not matched to PISCES `distill.py` 1e-3; not measured",
    "train.ema_decay": "released `--ema_decay` default", "sampling.guidance_scale": {"shapes": f"evaluation videos: "
        f"{REC}", "wan": f"evaluation videos: {DG} Wan `--cfg_infer 5.0`, diffusers `WanPipeline` default"},
    "sampling.num_inference_steps": {"shapes": f"evaluation videos: {REC}", "wan": f"evaluation videos: {FG} / {DG} "
        "Wan (20)"}}
BACKPROP["rewards.weights.ot_semantic"] = BACKPROP["rewards.weights.ot_quality"]
EVAL, OUT = "evaluation prompts: measured, never optimised", "output and upload"
ENGINEERING = {"model.dtype": "memory/speed: dtype of the frozen weights", "model.gradient_checkpointing": "memory",
    "model.seed": "which random tiny model (fixture)", "sampling.decode_chunk_size": "memory", "rewards.max_batch_size":
    "memory", "rewards.max_frames_per_call": "memory", "rewards.on_error": "robustness", "train.sample_batch_size":
    "memory/speed", "train.decode_checkpointing": "memory", "train.mixed_precision": "speed/memory", "train.seed":
    f"randomness (42 as {FG}, {DG}, PISCES)", "train.push_to_hub": OUT, "train.hub_model_id": OUT, "data.prompt_column":
    "data format", "train.caption_column": "data format", "data.eval_prompts": EVAL, "data.eval_source": EVAL,
    "data.num_eval_prompts": EVAL, "logging.": "logging and evaluation cadence", "checkpoint.": "checkpoints",
    "output_dir": OUT, "overwrite_output_dir": OUT, "backprop:train.train_batch_size": "memory: a backprop step's "
    "micro-batches make one optimiser step"}


def group(name: str) -> str:
    if name.endswith("_wan") or name.startswith(("grpo_wan", "backprop_wan")):
        return "wan"
    return ("hunyuan" if "hunyuan" in name else "cogvideox" if "_cogvideox" in name else "shapes" if "shapes" in name
            else "tiny" if "tiny" in name else "gpu")


@functools.lru_cache(maxsize=None)
def recipes() -> dict:
    """``{table: {recipe: config}}``, tables 'grpo' (GRPO and NFT) and 'backprop', recipes in group order."""
    out: dict = {"grpo": {}, "backprop": {}}
    for path in sorted((ROOT / "recipes/configs").glob("*.yaml"), key=lambda f: (list(GROUPS).index(group(f.stem)), f)):
        table = "backprop" if path.stem.startswith("backprop_") else "grpo"
        out[table][path.stem] = load_config(BackpropConfig if table == "backprop" else GRPOConfig, path)
    return out


def flatten(data: dict, prefix: str = "") -> dict:
    return {k: v for key, val in data.items()
            for k, v in (flatten(val, f"{prefix}{key}.") if isinstance(val, dict) else {prefix + key: val}).items()}


def fmt(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return '""' if value == "" else f"{value:g}" if isinstance(value, float) else str(value)


def role(key: str, table: str) -> str:
    """Engineering role of ``key`` in ``table`` ('' = a hyperparameter); ENGINEERING has keys, table:keys, prefixes."""
    return next((r for n, r in ENGINEERING.items()
                 if n in (key, f"{table}:{key}") or (n.endswith(".") and key.startswith(n))), "")


def unused(key: str, table: str, cfg) -> bool:
    kinds = [cfg.train.algorithm] if table == "grpo" else [table, "dataset" * (cfg.train.latent_source == "dataset")]
    return any(key.startswith(prefix) for kind in kinds for prefix in UNUSED.get(kind, ()))


def source(key: str, table: str, name: str, cfg) -> str:
    """The source of ``key`` in recipe ``name``: scopes recipe, algorithm, group, '*', then TINY for tiny recipes."""
    entry = (BACKPROP if table == "backprop" and key in BACKPROP else SOURCES).get(key, "")
    if isinstance(entry, dict):
        scopes = (name, cfg.train.algorithm if table == "grpo" else table, group(name), "*")
        entry = next((entry[s] for s in scopes if s in entry), TINY if group(name) == "tiny" else "")
    return entry


def cell(values: dict, lead: bool) -> str:
    """``{recipe: text}`` as one cell: '**groups or recipes**: text' lines (``lead``) or 'text (recipes); ...'."""
    if not values:
        return "(no such recipe)"
    by_text: dict = {}
    for name, text in values.items():
        by_text.setdefault(text, []).append(name)
    top, parts, others = Counter(values.values()).most_common(1)[0][0], [], []
    for text, names in by_text.items():
        groups, who = [g for g in GROUPS if any(group(n) == g for n in names)], ", ".join(f"`{n}`" for n in names)
        if len(by_text) == 1 or (not lead and text == top):
            parts.insert(0, text)
        elif not lead:
            parts.append(f"{text} ({who})")
        elif all(n in names for n in values if group(n) in groups):
            parts.append(f"**{', '.join(GROUPS[g] for g in groups)}**: {text}")
        else:
            (others if text == top else parts).append(f"**{'others' if text == top else who}**: {text}")
    return ("<br>" if lead else "; ").join(parts + others)


def table_rows(table: str, engineering: dict) -> dict:
    """``{section: [[`key`, value per recipe..., source]]}`` of ``table``; engineering values go to ``engineering``."""
    cfgs, rows = recipes()[table], {}
    flat = {name: flatten(to_dict(cfg)) for name, cfg in cfgs.items()}
    for key in dict.fromkeys(k for f in flat.values() for k in f):
        if role(key, table):
            engineering.setdefault(key, {}).update({n: fmt(f[key]) for n, f in flat.items()})
            continue
        used = [n for n in flat if not unused(key, table, cfgs[n])]
        text = cell({n: source(key, table, n, cfgs[n]) for n in used}, True) if used else "not read as shipped"
        used = [n for n in used if key in flat[n]]  # a key only some recipes have (e.g. model.family_options.*)
        text = cell({n: source(key, table, n, cfgs[n]) for n in used}, True) if used else "not read as shipped"
        values = ["—" if key not in f else fmt(f[key]) if n in used else f"({fmt(f[key])})" for n, f in flat.items()]
        rows.setdefault(key.split(".")[0], []).append([f"`{key}`", *values, text.replace("|", "\\|")])
    return rows


def ot_rows() -> list:
    from pisces_rl.ot import neural_map as nm
    from pisces_rl.ot.fit import fit_ot_map
    from pisces_rl.worlds.shapes.build import WorldConfig

    d, w = {k: v.default for k, v in inspect.signature(fit_ot_map).parameters.items()}, WorldConfig()
    p, t = "PISCES README", "PISCES `train_OT_map.py`"
    return [["map T and critic f", "Linear–ReLU–LayerNorm ×2, Linear", "same", f"{p}, `optimal_transport.py`"],
            ["embedding dim", "the encoder's", fmt(w.encoder.embed_dim), "PISCES: 512 (InternVideo2)"],
            ["hidden width", fmt(d["hidden"]), fmt(w.ot_hidden), f"{p} (1024); ShapesWorld: not sourced"],
            ["outer steps", fmt(d["steps"]), fmt(w.ot_steps), "not sourced (the released map: `OT_map_156000.pt`)"],
            ["batch", fmt(d["batch_size"]), fmt(w.ot_batch_size), f"{p} (128)"], ["Adam learning rate", fmt(d["lr"]),
             fmt(w.ot_lr), f"{p} (1e-4); ShapesWorld: `worlds/shapes/build.py` (at 64-d, 1e-4 stays below the unmapped "
             "text)"], ["K_T map steps per critic step", fmt(d["k_t"]), fmt(w.ot_k_t), t], ["Adam weight decay",
             fmt(nm.WEIGHT_DECAY), "same", f"{t} `--weight-decay`"], ["gradient clip, each network", fmt(nm.GRAD_CLIP),
             "same", f"{t} `--grad-clip`"], ["cosine LR floor", f"{fmt(nm.MIN_LR_RATIO)}·lr", "same", f"{t} `eta_min`"],
            ["text input", "L2-normalised", "same", "DESIGN §1(a): deliberate departure"]]


def markdown_table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(head: str) -> str:
    """The page: ``head`` (the hand-written text down to the marker line), then the generated tables."""
    if MARKER not in head:
        raise ValueError(f"{PAGE} lacks the line {MARKER!r}; the generated tables go below it")
    out, eng = [head.split(MARKER)[0].rstrip("\n"), "", MARKER, ""], {}
    for table, title in (("grpo", "GRPO and DiffusionNFT recipes"), ("backprop", "Direct reward-backprop recipes")):
        header = ["key", *[f"`{n}`" for n in recipes()[table]], "source"]
        out += [f"## {title}", ""] + [line for section, rows in table_rows(table, eng).items()
                                      for line in [f"### {section}", "", *markdown_table(header, rows), ""]]
    eng_rows = [[f"`{k}`", role(k, "backprop"), *[cell(of_group, False) if of_group else "—" for of_group in
                                                   ({n: t for n, t in v.items() if group(n) == g} for g in GROUPS)]]
                for k, v in eng.items()]  # "—": no recipe of that group has the key
    return "\n".join(out + [
        "## Engineering settings", "", "These change memory, speed, logging or output, not what is optimised.", "",
        *markdown_table(["key", "what it changes", *GROUPS.values()], eng_rows), "", "## OT map fitting", "",
        "`pisces-rl fit-ot-map` (the map of the Wan recipes' `rewards.ot_map`) and the ShapesWorld build "
        "(`make world`); not recipe keys.", "",
        *markdown_table(["setting", "`fit-ot-map` default", "ShapesWorld build", "source"], ot_rows())]) + "\n"


def missing() -> list:
    """``table:recipe:key`` of every value with neither a source nor an engineering role (must be empty)."""
    return [f"{table}:{name}:{key}" for table, cfgs in recipes().items() for name, cfg in cfgs.items()
            for key in flatten(to_dict(cfg)) if not (role(key, table) or unused(key, table, cfg)
                                                     or source(key, table, name, cfg).strip())]


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}; values without a source: {missing() or 'none'}")
