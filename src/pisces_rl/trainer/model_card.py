"""The model card beside a saved LoRA (``<output_dir>/lora/README.md``) and the Hub upload.

The card follows the diffusers training scripts (``diffusers.utils.hub_utils``): a
``huggingface_hub.ModelCard`` whose YAML block says ``library_name: diffusers``, the ``base_model`` (when it
is a Hub id), ``pipeline_tag: text-to-video`` and tags added with ``populate_model_card``, and a body with
the sample, a ``pipe.load_lora_weights`` snippet, the rewards and weights, the evaluation table and the
run's config. Writing it needs no network.

:func:`push_to_hub` creates the repo (:func:`create_hub_repo`: ``HfApi.create_repo``, ``exist_ok=True``) and
uploads the LoRA folder (:func:`upload_to_hub`: ``HfApi.upload_folder``), as diffusers' examples do at the end
of training.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from typing import Any, Mapping, Optional, Sequence

import yaml

__all__ = ["write_model_card", "push_to_hub", "create_hub_repo", "upload_to_hub", "hub_repo_name", "is_hub_id",
           "REWARD_DESCRIPTIONS"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

REWARD_DESCRIPTIONS = {
    "ot_quality": "PISCES quality reward: cosine between the video embedding and the OT-mapped text embedding",
    "ot_semantic": "PISCES semantic reward: video-text matching probability with token-level partial-OT attention",
}

_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


def is_hub_id(name: Optional[str]) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(os.path.expanduser(name))


def hub_repo_name(output_dir: str, hub_model_id: Optional[str]) -> str:
    """``hub_model_id``, else the run directory's name (as diffusers' ``args.hub_model_id or output_dir.name``)."""
    return hub_model_id or os.path.basename(os.path.abspath(output_dir))


def _num(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if math.isnan(v):
        return "n/a"
    return f"{v:.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"


def _lora_load_code(lora: str, model: Mapping[str, Any], directory: Optional[str]) -> str:
    """The lines that load the saved LoRA into ``pipe``: the family's ``lora_load_code(lora, directory)`` if it has
    one (e.g. Wan 2.2's second expert, a UNet that needs LoRA support first), else ``pipe.load_lora_weights``."""
    try:
        from pisces_rl.models import get_family

        family = get_family(str(model.get("family", "wan")), model.get("family_options") or None)
    except (ValueError, TypeError):
        family = None
    hook = getattr(family, "lora_load_code", None)
    return hook(lora, directory) if hook is not None else f"pipe.load_lora_weights(\"{lora}\")"


def _load_snippet(base_model: str, pipeline_class: str, lora: str, prompt: str, sampling: Mapping[str, Any],
                  fps: int, model: Mapping[str, Any], directory: Optional[str] = None) -> str:
    if base_model == "tiny":  # the model.family's tiny pipeline, e.g. build_tiny_wan_pipeline
        load = ("from pisces_rl.models import get_family\n\n"
                f"pipe = get_family({str(model.get('family', 'wan'))!r}).build_tiny_pipeline(seed="
                f"{model.get('seed', 0)})  # the random tiny test model, built in code")
    elif base_model == "shapes":
        load = ("from pisces_rl.registry import resolve_artifact\n\n"
                f"pipe = {pipeline_class}.from_pretrained(resolve_artifact('model', 'shapes'))  # the ShapesWorld model")
    else:
        load = f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")'
    call = ", ".join(f"{k}={sampling[k]!r}" for k in ("num_frames", "height", "width", "num_inference_steps",
                                                      "guidance_scale", "max_sequence_length") if k in sampling)
    return (f"```python\nimport torch\nfrom diffusers import {pipeline_class}\nfrom diffusers.utils import "
            f"export_to_video\n{load}\n{_lora_load_code(lora, model, directory)}\n\n"
            f"video = pipe({prompt!r}, {call}).frames[0]\nexport_to_video(video, \"video.mp4\", fps={fps})\n```")


def write_model_card(directory: str, *, base_model: str, pipeline_class: str, trainer: str,
                     rewards: Mapping[str, float], evaluation: Mapping[str, Mapping[str, float]],
                     config: Mapping[str, Any], steps: int, eval_prompts: Sequence[str] = (),
                     sample: Optional[str] = None, repo_id: Optional[str] = None,
                     judge: Optional[str] = None) -> str:
    """Write ``<directory>/README.md`` (and copy ``sample`` beside it); returns the README path.

    Args:
        directory: the saved LoRA folder (``pytorch_lora_weights.safetensors``).
        base_model: ``model.pretrained`` (``tiny``, ``shapes``, a directory or a Hub id).
        pipeline_class: the diffusers pipeline class name, e.g. ``WanPipeline``.
        trainer: ``GRPO`` or ``backprop``.
        rewards: reward name -> weight.
        evaluation: ``{metric: {"before": x, "after": y}}`` on the held-out prompts.
        config: the run config as a plain dict (goes into the card as YAML).
        steps: training iterations run.
        sample: a before/after video to show (copied into ``directory``).
        repo_id: the Hub repo the folder is pushed to (the loading snippets use it, else ``directory``).
        judge: the judge's name, if the evaluation has one.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    os.makedirs(directory, exist_ok=True)
    sample_name = None
    if sample and os.path.isfile(sample):
        sample_name = os.path.basename(sample)
        if os.path.abspath(os.path.dirname(sample)) != os.path.abspath(directory):
            shutil.copyfile(sample, os.path.join(directory, sample_name))
    sampling = dict(config.get("sampling", {}))
    model = dict(config.get("model", {}))
    train = dict(config.get("train", {}))
    prompt = eval_prompts[0] if eval_prompts else "a red circle moving left"
    where = repo_id or directory
    fps = 8

    lines = [f"# PISCES LoRA for `{base_model}`", "",
             f"A LoRA adapter (rank {model.get('lora_rank', '?')}, alpha {model.get('lora_alpha', '?')}, on "
             f"{', '.join(model.get('lora_target_modules', [])) or 'the attention layers'}) for the denoiser of "
             f"`{base_model}` ({pipeline_class}), post-trained for {steps} iterations with **{trainer}** by "
             "pisces_rl on annotation-free PISCES rewards (arXiv:2602.01624): "
             "an OT-aligned quality reward and a token-level partial-OT semantic reward. No human preference data.",
             ""]
    if sample_name:
        lines += ["## Sample", "",
                  f"Held-out prompts; top row the base model (LoRA off), bottom row this LoRA, same initial noise, "
                  f"deterministic sampling (η = 0).", "",
                  f"![base vs trained]({sample_name})" if sample_name.endswith(".gif")
                  else f'<video src="{sample_name}" controls autoplay loop muted></video>', ""]
    lines += ["## Use it with 🧨 diffusers", "",
              _load_snippet(base_model, pipeline_class, where, prompt, sampling, fps, model, directory), "",
              "Or with the pisces_rl command line, whose sampler is the one of the run's evaluation (η = 0): the "
              f"evaluation prompts, in order, with `--seed {train.get('seed', 0)} --batch-size "
              f"{train.get('sample_batch_size', 1)}` reproduce the sample above.", "",
              f"```bash\npisces-rl generate --pretrained {base_model} --lora {where} --prompt {prompt!r} "
              f"--num-frames {sampling.get('num_frames', 5)} --height {sampling.get('height', 32)} "
              f"--width {sampling.get('width', 32)} --steps {sampling.get('num_inference_steps', 6)} "
              f"--guidance-scale {sampling.get('guidance_scale', 4.0)} --out video.gif\n```", ""]
    lines += ["## Rewards", "", "| reward | weight | what it measures |", "|---|---|---|"]
    lines += [f"| `{name}` | {weight:g} | {REWARD_DESCRIPTIONS.get(name, 'user reward')} |"
              for name, weight in rewards.items()]
    lines += [""]
    if evaluation:
        n = len(eval_prompts)
        lines += ["## Evaluation", "",
                  f"{n} held-out prompt{'s' if n != 1 else ''}, deterministic sampling (η = 0) from the same noise; "
                  "base = LoRA disabled" + (f"; `judge/*` = {judge}, which no reward sees" if judge else "") + ".", "",
                  "| metric | base | trained | change |", "|---|---|---|---|"]
        for metric, row in evaluation.items():
            before, after = row.get("before"), row.get("after")
            delta = None if before is None or after is None else float(after) - float(before)
            lines.append(f"| {metric} | {_num(before)} | {_num(after)} | "
                         f"{'-' if delta is None or math.isnan(delta) else f'{delta:+.4f}'} |")
        lines += [""]
    lines += ["## Training", "",
              f"- paradigm: {trainer}; iterations: {steps}; learning rate: {train.get('learning_rate', '?')}",
              f"- sampling: {sampling.get('num_frames', '?')} frames at {sampling.get('height', '?')}x"
              f"{sampling.get('width', '?')}, {sampling.get('num_inference_steps', '?')} steps, guidance "
              f"{sampling.get('guidance_scale', '?')}, SDE noise η = {sampling.get('eta', '?')}", "",
              "<details><summary>Full config</summary>", "", "```yaml",
              yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```", "", "</details>"]

    card_data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-video",
                              base_model=base_model if is_hub_id(base_model) else None,
                              widget=[{"text": prompt, "output": {"url": sample_name}}] if sample_name else None)
    card = ModelCard.from_template(card_data=card_data, template_str=_TEMPLATE, body="\n".join(lines))
    tags = ["text-to-video", "diffusers-training", "diffusers", "lora", "pisces-rl",
            "grpo" if trainer.lower() == "grpo" else "reward-backprop", str(model.get("family", "wan"))]
    card = populate_model_card(card, tags=tags)
    path = os.path.join(directory, "README.md")
    card.save(path)
    return path


def create_hub_repo(repo_id: str, token: Optional[str] = None) -> str:
    """``HfApi.create_repo(repo_id, exist_ok=True)``; returns the full id (``user/name`` for a bare ``name``).
    Needs a token (``huggingface-cli login`` or ``HF_TOKEN``)."""
    from huggingface_hub import HfApi

    return HfApi(token=token).create_repo(repo_id=repo_id, exist_ok=True).repo_id


def upload_to_hub(folder: str, repo_id: str, commit_message: str = "End of training",
                  token: Optional[str] = None) -> None:
    """``HfApi.upload_folder``: every file of ``folder`` into the existing repo ``repo_id``."""
    from huggingface_hub import HfApi

    HfApi(token=token).upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)


def push_to_hub(folder: str, repo_id: str, commit_message: str = "End of training", token: Optional[str] = None) -> str:
    """Create the Hub repo (if needed) and upload ``folder`` to it; returns the full repo id."""
    full_id = create_hub_repo(repo_id, token)
    upload_to_hub(folder, full_id, commit_message, token)
    return full_id
