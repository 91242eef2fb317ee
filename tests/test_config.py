"""Typed configs: YAML + overrides, coercion, error messages, validation, batch arithmetic, CLI."""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Optional

import pytest

from pisces_rl.config import (ConfigBase, ConfigError, GRPOConfig, RewardsConfig, TrainConfig, batch_arithmetic,
                              config_keys, describe, load_config, option, parse_cli, save_yaml, section)
from pisces_rl.config.grpo import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_follow_schema_and_validate():
    cfg = GRPOConfig().validate()
    assert [f.name for f in dataclasses.fields(cfg)] == ["model", "sampling", "rewards", "train", "data",
                                                         "logging", "checkpoint", "nft", "output_dir",
                                                         "overwrite_output_dir"]
    assert cfg.rewards.weights == {"ot_quality": 1.0, "ot_semantic": 1.0}
    assert cfg.model.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.train.adam_betas == (0.9, 0.999) and cfg.sampling.num_frames == 5
    cfg.model.lora_target_modules.append("x")  # mutable defaults are per instance
    assert GRPOConfig().model.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_every_field_has_help_and_describe_lists_it():
    text = describe(GRPOConfig)
    for key in config_keys(GRPOConfig):
        assert f"  {key}: " in text, key

    def walk(obj):
        for f in dataclasses.fields(obj):
            assert f.metadata.get("help"), f"{type(obj).__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                walk(getattr(obj, f.name))
    walk(GRPOConfig())
    assert "(one of: sum, per_reward)" in text


def test_yaml_then_overrides_with_coercion(tmp_path):
    path = write(tmp_path, """# launch: accelerate launch recipes/grpo_short_video.py --config this.yaml
train:
  max_steps: 10          # comments are fine
  learning_rate: 1e-5    # YAML 1.1 reads this as a string; coerced to float
  adam_betas: [0.8, 0.99]
sampling:
  guidance_scale: 3      # int -> float
""")
    cfg = load_config(GRPOConfig, path, ["train.max_steps=2", "output_dir=runs/x",
                                         "model.lora_target_modules=[to_q,to_k]", "train.weight_decay=1e-2",
                                         "rewards.num_frames=5", "checkpoint.resume_from=null"])
    assert cfg.train.max_steps == 2 and cfg.output_dir == "runs/x"
    assert cfg.train.learning_rate == pytest.approx(1e-5) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.adam_betas == (0.8, 0.99)
    assert cfg.sampling.guidance_scale == 3.0 and isinstance(cfg.sampling.guidance_scale, float)
    assert cfg.model.lora_target_modules == ["to_q", "to_k"]
    assert cfg.train.weight_decay == pytest.approx(0.01) and cfg.rewards.num_frames == 5
    assert cfg.checkpoint.resume_from is None


def test_string_fields_take_override_text_verbatim():
    cfg = load_config(GRPOConfig, overrides=["output_dir=2024", "logging.report_to=none",
                                             "sampling.negative_prompt=blurry, low quality"])
    assert cfg.output_dir == "2024" and cfg.logging.report_to == "none"
    assert cfg.sampling.negative_prompt == "blurry, low quality"


def test_section_mapping_override_merges_and_empty_section_keeps_defaults(tmp_path):
    cfg = load_config(GRPOConfig, write(tmp_path, "train:\nlogging:\n"), ["train={max_steps: 3, num_generations: 2}"])
    assert (cfg.train.max_steps, cfg.train.num_generations, cfg.train.sample_batch_size) == (3, 2, 4)


def test_rewards_shorthand_full_form_and_mixed(tmp_path):
    short = load_config(GRPOConfig, write(tmp_path, "rewards:\n  ot_quality: 1.0\n  my_pkg.rewards:sharpness: 0.5\n"))
    assert short.rewards.weights == {"ot_quality": 1.0, "my_pkg.rewards:sharpness": 0.5}
    assert short.rewards.encoder == "tiny"
    full = load_config(GRPOConfig, write(tmp_path, "rewards:\n  weights: {ot_semantic: 2}\n  use_ot: false\n"))
    assert full.rewards.weights == {"ot_semantic": 2.0} and full.rewards.use_ot is False
    with pytest.raises(ConfigError, match=r"mixes RewardsConfig fields \(encoder\) with other keys \(ot_quality\)"):
        load_config(GRPOConfig, write(tmp_path, "rewards: {ot_quality: 1.0, encoder: tiny}\n"))
    section_override = load_config(GRPOConfig, overrides=["rewards={ot_quality: 0.5}"])
    assert section_override.rewards.weights == {"ot_quality": 0.5}


def test_reward_weight_overrides_address_keys_with_dots_and_colons():
    cfg = load_config(GRPOConfig, overrides=["rewards.weights.my_pkg.rewards:sharpness=0.5",
                                             "rewards.weights.ot_semantic=null", "rewards.weights.ot_quality=2"])
    assert cfg.rewards.weights == {"ot_quality": 2.0, "my_pkg.rewards:sharpness": 0.5}
    assert load_config(GRPOConfig, overrides=["rewards.weights={ot_quality: 1.0}"]).rewards.weights == {"ot_quality": 1.0}
    with pytest.raises(ConfigError, match="cannot remove 'nope'"):
        load_config(GRPOConfig, overrides=["rewards.weights.nope=null"])
    with pytest.raises(ConfigError, match=r"rewards.weights.x: expected float, got str 'high'"):
        load_config(GRPOConfig, overrides=["rewards.weights.x=high"])
    with pytest.raises(ConfigError, match=r"Did you mean 'rewards.gamma'.*rewards.weights.<name>=<value>"):
        load_config(GRPOConfig, overrides=["rewards.gama=0.3"])


@pytest.mark.parametrize("override, pattern", [
    ("train.max_step=2", r"unknown key 'train.max_step'. Did you mean 'train.max_steps'\?.*Valid keys in 'train': "),
    ("max_steps=2", r"unknown key 'max_steps'. Did you mean 'train.max_steps'\?"),
    ("trian.max_steps=2", r"Did you mean 'train'\?.*Valid keys at the top level: model, sampling"),
    ("train.max_steps=abc", r"train.max_steps: expected int, got str 'abc'"),
    ("train.max_steps=2.5", r"train.max_steps: expected int, got float 2.5 \(not a whole number\)"),
    ("model.gradient_checkpointing=1", r"model.gradient_checkpointing: expected bool, got int 1"),
    ("train.learning_rate=true", r"train.learning_rate: expected float, got bool True"),
    ("train.adam_betas=[0.9]", r"needs exactly 2 items"),
    ("model.lora_target_modules=to_q", r"write a list"),
    ("train.max_steps.x=1", r"train.max_steps: has no sub-key 'x' \(its type is int, not a mapping\)"),
    ("train=3", r"^train: is a section; set one of its keys \(e.g. train.max_steps=...\)"),
    ("train={max_steps: [1", r"train: cannot parse"),
    ("train.max_steps", r"not of the form key=value"),
])
def test_override_errors_name_key_and_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(GRPOConfig, overrides=[override])
    assert isinstance(info.value, ValueError)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'sampling.num_frame'. Did you mean 'sampling.num_frames'"):
        load_config(GRPOConfig, write(tmp_path, "sampling:\n  num_frame: 9\n"))
    with pytest.raises(ConfigError, match=r"sampling.negative_prompt: expected str, got bool False \(YAML reads yes/no"):
        load_config(GRPOConfig, write(tmp_path, "sampling:\n  negative_prompt: no\n"))
    with pytest.raises(ConfigError, match="config file '.*missing.yaml' not found"):
        load_config(GRPOConfig, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(GRPOConfig, write(tmp_path, "train: [1, 2\n"))


@pytest.mark.parametrize("override, pattern", [
    ("train.epsilon=0", r"train.epsilon: must be > 0, got 0.0"),
    ("train.num_generations=1", r"train.num_generations: must be >= 2"),
    ("train.advantage_mode=sums", r"train.advantage_mode: 'sums' is not one of sum, per_reward. Did you mean 'sum'"),
    ("rewards.on_error=ignore", r"rewards.on_error: 'ignore' is not one of raise, skip"),
    ("train.lr_scheduler=cosin", r"Did you mean 'cosine'"),
    ("sampling.eta=0", r"sampling.eta: must be > 0"),
    ("sampling.num_frames=6", r"sampling.num_frames: the wan family needs 4k\+1 frames, got 6; use 5 or 9"),
    ("sampling.height=40", r"sampling.height: the wan family needs a multiple of 16, got 40"),
    ("rewards.mass=1.5", r"rewards.mass: must be in \(0, 1\]"),
    ("rewards.num_frames=9", r"rewards.num_frames: 9 exceeds the 5 frames per video"),
    ("rewards.temporal_windows=2", r"needs rewards.num_frames"),
    ("rewards.weights={}", r"rewards.weights: no reward configured"),
    ("model.pretrained=/no/such/pipeline", r"model.pretrained: '/no/such/pipeline' is not one of 'tiny', 'shapes', "
                                           r"an existing pipeline directory, or a hub id like 'org/name'"),
    ("train.sample_batch_size=3", r"train.sample_batch_size: .*8 videos .* divisor of 8: 1, 2, 4, 8"),
])
def test_validation_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(GRPOConfig, overrides=[override])


def test_model_sources(tmp_path):
    assert load_config(GRPOConfig, overrides=["model.pretrained=Wan-AI/Wan2.1-T2V-1.3B-Diffusers"])
    assert load_config(GRPOConfig, overrides=[f"model.pretrained={tmp_path}", "model.family=other",
                                              "sampling.num_frames=6"]).model.pretrained == str(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.resume_from: .* is not a directory"):
        load_config(GRPOConfig, overrides=[f"checkpoint.resume_from={tmp_path / 'ckpt'}"])


def test_batch_arithmetic_numbers_and_errors():
    cfg = load_config(GRPOConfig, overrides=["train={prompts_per_step: 4, num_generations: 4, sample_batch_size: 4, "
                                             "train_batch_size: 2, gradient_accumulation_steps: 2, "
                                             "num_iterations: 2, max_steps: 3}"])
    b = batch_arithmetic(cfg, 2)
    assert b["videos_per_iteration"] == 16 and b["videos_per_process"] == 8 and b["prompts_per_process"] == 2
    assert b["rollout_forwards_per_process"] == 2 and b["micro_batches_per_epoch"] == 4
    assert b["optimizer_steps_per_iteration"] == 4 and b["total_optimizer_steps"] == 12
    assert b["videos_per_optimizer_step"] == 8 and b["train_timesteps_per_video"] == 5  # ceil(1.0 * (6 - 1))
    windowed = load_config(GRPOConfig, overrides=["sampling.sde_window=[1,4]", "sampling.train_timestep_fraction=0.5"])
    assert batch_arithmetic(windowed, 1)["train_timesteps_per_video"] == 2                # ceil(0.5 * 3)
    with pytest.raises(ConfigError, match=r"sampling.sde_window: must be \[start, stop\] .* got \[2, 6\]"):
        load_config(GRPOConfig, overrides=["sampling.sde_window=[2,6]"])
    with pytest.raises(ConfigError, match=r"train.prompts_per_step: 4 prompts .* over 3 processes; .* multiple of 3"):
        batch_arithmetic(cfg, 3)
    cfg.train.sample_batch_size = 8  # 8 videos per process with 2 processes, 4 with 4
    assert batch_arithmetic(cfg, 2)["rollout_forwards_per_process"] == 1
    with pytest.raises(ConfigError, match=r"train.sample_batch_size: each process samples 4 videos .* 1, 2, 4$"):
        batch_arithmetic(cfg, 4)
    cfg.train.sample_batch_size, cfg.train.gradient_accumulation_steps = 4, 4  # 2 x 4 = 8 videos per step
    assert batch_arithmetic(cfg, 2)["optimizer_steps_per_iteration"] == 2
    with pytest.raises(ConfigError, match=r"train.train_batch_size: .* 4 videos .* = 8"):
        batch_arithmetic(cfg, 4)


def test_save_yaml_round_trip(tmp_path):
    cfg = load_config(GRPOConfig, overrides=["rewards.weights.pkg.mod:fn=0.25", "train.adam_betas=[0.5, 0.9]",
                                             "data.eval_prompts=[a cat, a dog]"])
    path = save_yaml(cfg, tmp_path / "run" / "config.yaml")
    assert open(path).readline().startswith("# Resolved GRPOConfig")
    assert load_config(GRPOConfig, path) == cfg
    assert cfg.to_dict()["train"]["adam_betas"] == [0.5, 0.9]


def test_parse_cli(tmp_path, capsys):
    path = write(tmp_path, "# cmd\ntrain:\n  max_steps: 7\n")
    cfg = parse_cli(GRPOConfig, ["--config", path, "output_dir=runs/y", "--train.num_generations=2"])
    assert (cfg.train.max_steps, cfg.output_dir, cfg.train.num_generations) == (7, "runs/y", 2)
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(GRPOConfig, ["--help"], prog="recipe.py")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: recipe.py" in out and "PPO clip: the ratio is clipped" in out
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(GRPOConfig, ["train.epsilon=-1"], prog="recipe.py")
    assert exit_info.value.code == 2 and "train.epsilon: must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_cli(GRPOConfig, ["config.yaml"])
    assert "unexpected argument 'config.yaml'" in capsys.readouterr().err


@dataclasses.dataclass
class StepConfig(ConfigBase):
    """A section of a hypothetical other paradigm."""

    steps: int = option(1, "steps")
    every: Optional[int] = option(None, "how often")
    mode: str = option("a", "mode", choices=("a", "b"))

    def _check(self):
        if self.every is not None and self.every > self.steps:
            raise ConfigError("must not exceed steps", "every")


@dataclasses.dataclass
class OtherConfig(ConfigBase):
    """A top-level config reusing a GRPO section."""

    model: ModelConfig = section(ModelConfig, "model")
    train: StepConfig = section(StepConfig, "train")
    name: str = option("x", "name")


def test_loader_is_generic_for_other_top_level_configs(tmp_path):
    cfg = load_config(OtherConfig, write(tmp_path, "# cmd\ntrain: {steps: 3}\n"), ["train.every=2", "model.lora_rank=4"])
    assert (cfg.train.steps, cfg.train.every, cfg.model.lora_rank) == (3, 2, 4)
    assert config_keys(OtherConfig)[-1] == "name" and "train.mode" in describe(cfg)
    with pytest.raises(ConfigError, match=r"^train.every: must not exceed steps"):
        load_config(OtherConfig, overrides=["train.every=5"])
    with pytest.raises(ConfigError, match=r"train.mode: 'c' is not one of a, b"):
        load_config(OtherConfig, overrides=["train.mode=c"])


def test_programmatic_configs_are_validated():
    cfg = GRPOConfig(train=TrainConfig(max_steps=0))
    with pytest.raises(ConfigError, match="train.max_steps: must be > 0"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"rewards.use_ot: expected bool, got str 'yes'"):
        GRPOConfig(rewards=RewardsConfig(use_ot="yes")).validate()


SHIPPED = sorted(glob.glob(os.path.join(REPO, "recipes", "configs", "*.yaml")))


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_shipped_configs_load(path):
    """Every shipped config starts with its launch command and loads into its trainer's config class."""
    from pisces_rl.config import BackpropConfig, backprop_batch_arithmetic

    with open(path) as f:
        assert f.readline().startswith("#"), "each shipped config starts with its launch command in a comment"
    name = os.path.basename(path)
    assert name.startswith(("grpo_", "nft_", "backprop_")), f"{name}: name shipped configs after their trainer"
    if name.startswith(("grpo_", "nft_")):
        assert batch_arithmetic(load_config(GRPOConfig, path), 1)["videos_per_iteration"] >= 2
    else:
        assert backprop_batch_arithmetic(load_config(BackpropConfig, path), 1)["videos_per_step"] >= 1


# ----------------------------------------------------------------------------- trl names, old names
TRL_NAMES = {"num_generations": "group_size", "num_iterations": "num_inner_epochs", "epsilon": "clip_range",
             "beta": "kl_beta"}


def _dataclass_fields_in_source(package: str, relative: str, class_name: str) -> dict:
    """``{field: default source}`` of a dataclass, read from the installed package's source with ``ast``
    (importing trl takes tens of seconds on a busy CPU)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    path = os.path.join(spec.submodule_search_locations[0], relative)
    tree = ast.parse(open(path, encoding="utf-8").read())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    fields = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            default = next((kw.value for kw in getattr(node.value, "keywords", []) if kw.arg == "default"), None)
            try:
                fields[node.target.id] = ast.literal_eval(default) if default is not None else None
            except ValueError:                                   # a non-literal default (a name, a call)
                fields[node.target.id] = None
    return fields


def test_renamed_keys_are_trl_grpo_config_fields():
    """The GRPO knobs shared with trl carry ``trl.GRPOConfig``'s names (trl 1.16 ``trainer/grpo_config.py``;
    the optimiser ones from transformers' ``TrainingArguments``, its base class), and ``scale_rewards``
    takes trl's default."""
    grpo = _dataclass_fields_in_source("trl", "trainer/grpo_config.py", "GRPOConfig")
    base = _dataclass_fields_in_source("transformers", "training_args.py", "TrainingArguments")
    ours = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(TRL_NAMES) | {"scale_rewards", "learning_rate"} <= set(grpo) & set(ours)
    assert {"max_grad_norm", "seed", "weight_decay", "warmup_steps", "gradient_accumulation_steps"} <= \
        set(base) & set(ours)
    assert TrainConfig._renamed == {old: new for new, old in TRL_NAMES.items()}
    assert set(ours["scale_rewards"].metadata["choices"]) == {"group", "batch", "none"}
    assert grpo["scale_rewards"] == ours["scale_rewards"].default == "group"


def test_old_names_still_work_with_one_warning_naming_the_new_key(tmp_path):
    yaml_text = "train:\n  group_size: 3\n  clip_range: 0.2\n  num_inner_epochs: 2\n  kl_beta: 0.01\n"
    with pytest.warns(FutureWarning) as record:
        cfg = load_config(GRPOConfig, write(tmp_path, yaml_text), ["train.sample_batch_size=6"])
    assert (cfg.train.num_generations, cfg.train.epsilon, cfg.train.num_iterations, cfg.train.beta) == (3, 0.2, 2, 0.01)
    messages = sorted(str(w.message) for w in record)
    assert messages == [f"'train.{old}' is deprecated, use 'train.{new}' (same meaning)"
                        for new, old in sorted(TRL_NAMES.items(), key=lambda kv: kv[1])]
    assert all("\n" not in m for m in messages)
    with pytest.warns(FutureWarning, match=r"'train.group_size' is deprecated, use 'train.num_generations'"):
        over = load_config(GRPOConfig, overrides=["train.group_size=2"])
    assert over.train.num_generations == 2 and over.to_dict()["train"]["num_generations"] == 2
    assert "group_size" not in over.to_dict()["train"]
    with pytest.warns(FutureWarning, match=r"'train.kl_beta' is deprecated, use 'train.beta'"):
        assert load_config(GRPOConfig, overrides=["train={kl_beta: 0.5}"]).train.beta == 0.5
    with pytest.warns(FutureWarning, match=r"TrainConfig.group_size' is deprecated, use 'TrainConfig.num_generations"):
        assert over.train.group_size == 2                                  # attribute reads too
    with pytest.warns(FutureWarning, match="TrainConfig.clip_range"):
        over.train.clip_range = 0.3
    assert over.train.epsilon == 0.3 and "clip_range" not in vars(over.train)
    with pytest.raises(ConfigError, match=r"^train.group_size: both 'train.group_size' and its new name "
                                          r"'train.num_generations' are set; keep only 'train.num_generations'"):
        with pytest.warns(FutureWarning):
            load_config(GRPOConfig, write(tmp_path, "train: {group_size: 2, num_generations: 4}\n"))
    with pytest.warns(FutureWarning, match=r"'TrainConfig\(kl_beta=...\)' is deprecated, use 'TrainConfig\(beta=...\)'"):
        assert TrainConfig(kl_beta=0.2, max_steps=3).beta == 0.2          # constructor keywords too
    with pytest.raises(TypeError, match="both 'clip_range' and its new name 'epsilon'"):
        TrainConfig(clip_range=0.1, epsilon=0.2)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        TrainConfig().nope
    assert "deprecated names (still read, with a warning): train.group_size -> train.num_generations" in \
        describe(GRPOConfig)


def test_backprop_config_reads_the_old_group_size():
    from pisces_rl.config import BackpropConfig

    with pytest.warns(FutureWarning, match=r"'train.group_size' is deprecated, use 'train.num_generations'"):
        cfg = load_config(BackpropConfig, overrides=["train.group_size=4", "train.sample_batch_size=8",
                                                     "train.train_batch_size=4"])
    assert cfg.train.num_generations == 4


def test_scale_rewards_choices():
    assert GRPOConfig().train.scale_rewards == "group"
    assert load_config(GRPOConfig, overrides=["train.scale_rewards=batch"]).train.scale_rewards == "batch"
    with pytest.raises(ConfigError, match=r"train.scale_rewards: 'global' is not one of group, batch, none"):
        load_config(GRPOConfig, overrides=["train.scale_rewards=global"])
