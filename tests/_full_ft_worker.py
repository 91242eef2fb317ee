"""Worker launched by tests/test_accel.py: full fine-tuning under DeepSpeed ZeRO-3 on 2 CPU processes.

usage: accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 2 \
           tests/_full_ft_worker.py OUTPUT_DIR

1. GRPO with ``model.finetune=full`` on the tiny Wan model: 4 straight steps (run ``a``), and 2 steps then a
   resume to 4 (run ``b``, a fresh trainer as a new launch would build); the denoisers saved with
   ``save_pretrained``-format in ``<run>/transformer`` must agree and load with ``from_pretrained``.
2. ``UpdateRatio`` on the ZeRO-3-partitioned weights: after scaling every weight by 1.01 (through
   ``GatheredParameters``) the measured ratio must be 0.01 -- the partition sums are all-reduced.
3. The same for a LoRA trainer under ZeRO-3, against the merged delta computed from gathered weights.

Rank 0 writes result.json; any failed check exits non-zero.
"""
import json
import math
import os
import sys

import deepspeed
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object

from pisces_rl.config import GRPOConfig, load_config
from pisces_rl.models.lora import ADAPTER_NAME, lora_layers
from pisces_rl.trainer import GRPOTrainer, zero_stage

TINY = ["train.prompts_per_step=2", "train.group_size=2", "train.sample_batch_size=2", "train.train_batch_size=2",
        "sampling.num_inference_steps=3", "sampling.num_frames=5", "sampling.height=16", "sampling.width=16",
        "logging.report_to=none", "data.num_eval_prompts=1", "train.learning_rate=1e-3", "train.clip_range=0.2",
        "train.kl_beta=0.05", "checkpoint.save_every=2", "checkpoint.keep_last=1"]


def _end_training_keeping_the_process_group(self):
    """``Accelerator.end_training`` destroys the process group, which a second trainer in this process (standing
    in for the relaunch of a resume) still needs; the group is destroyed once at the end of :func:`main`."""
    for tracker in self.trackers:
        tracker.finish()


Accelerator.end_training = _end_training_keeping_the_process_group


def brightness(videos, prompts, **kwargs):
    return videos.mean(dim=(1, 2, 3, 4))


def trainer(out, *overrides):
    AcceleratorState._reset_state(reset_partial_state=True)     # a new trainer, as in a new launch
    GradientState._reset_state()
    cfg = load_config(GRPOConfig, None, [f"output_dir={out}", *TINY, *overrides])
    return GRPOTrainer(cfg, rewards={"b": brightness})


def scale_all(params, factor):
    for p in params:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    p.mul_(factor)


def main():
    from diffusers import WanTransformer3DModel

    out = sys.argv[1]
    a = trainer(os.path.join(out, "a"), "model.finetune=full", "train.max_steps=4")
    a.train()
    stage, world = zero_stage(a.accelerator), a.accelerator.num_processes
    ratios_a = a.history["train/update_ratio"]
    trainer(os.path.join(out, "b"), "model.finetune=full", "train.max_steps=2").train()
    b = trainer(os.path.join(out, "b"), "model.finetune=full", "train.max_steps=4", "checkpoint.resume_from=latest")
    b.train()
    ratios_b = b.history["train/update_ratio"]

    # the update ratio on partitioned weights: ΔW = 0.01 W
    tracker = b.update_tracker
    tracker.snapshot()
    scale_all(b.policy.trainable_parameters(), 1.01)
    full_ratio = tracker.step()
    all_full = gather_object([full_ratio])

    # LoRA under ZeRO-3: perturb B, compare with the merged delta from gathered weights
    lora = trainer(os.path.join(out, "lora"), "train.max_steps=1")
    layers = lora_layers(lora.policy.transformer)
    params = [t for _, m in layers for t in (m.lora_A[ADAPTER_NAME].weight, m.lora_B[ADAPTER_NAME].weight,
                                               m.get_base_layer().weight)]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        expected_delta = sum(float((m.scaling[ADAPTER_NAME] * 0.1 * m.lora_A[ADAPTER_NAME].weight.sum(0)).pow(2).sum()
                                   * m.lora_B[ADAPTER_NAME].weight.shape[0]) for _, m in layers)
        base = sum(float(m.get_base_layer().weight.double().pow(2).sum()) for _, m in layers)
    lora.update_tracker.snapshot()
    for _, m in layers:                                          # B += 0.1 (every entry): ΔW = s·0.1·1·A
        weight = m.lora_B[ADAPTER_NAME].weight
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    weight.add_(0.1)
    lora_ratio = lora.update_tracker.step()
    lora_expected = math.sqrt(expected_delta / base)

    checks = {"num_processes": world, "zero_stage": stage, "ratios_a": ratios_a, "ratios_b": ratios_b,
              "full_ratio": full_ratio, "full_ratio_ranks_equal": len(set(all_full)) == 1,
              "lora_ratio": lora_ratio, "lora_expected": lora_expected}
    if a.accelerator.is_main_process:
        sa = WanTransformer3DModel.from_pretrained(os.path.join(out, "a", "transformer")).state_dict()
        sb = WanTransformer3DModel.from_pretrained(os.path.join(out, "b", "transformer")).state_dict()
        base_sd = a.policy.reference.state_dict()
        checks.update(
            max_diff_resume=max((sa[k] - sb[k]).abs().max().item() for k in sa),
            moved_from_base=sum(not torch.equal(sa[k].float(), base_sd[k].float()) for k in sa) / len(sa),
            keys_equal=sa.keys() == sb.keys() == base_sd.keys(),
            no_lora_dir=not os.path.exists(os.path.join(out, "a", "lora")),
            checkpoint_weights=sorted(os.listdir(os.path.join(out, "b", "checkpoints", "checkpoint-000004",
                                                              "transformer"))))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(checks, f, indent=1)
    a.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
