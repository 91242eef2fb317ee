"""Worker launched by tests/test_accel.py with ``accelerate launch`` on 2 CPU processes.

usage: accelerate launch --config_file recipes/accelerate/<cfg>.yaml --num_processes 2 \
           tests/_accel_worker.py OUTPUT_DIR

Trains a tiny MLP with hand-made LoRA adapters (no peft, to keep start-up short) for 2 steps of 2
hand-accumulated micro-batches, checks the weights against the same run replayed in one process with
plain torch, saves an atomic checkpoint, takes a 3rd step, reloads the checkpoint, retakes the 3rd step
and checks it is bit-identical. Rank 0 writes result.json; any failed check exits non-zero.
"""
import json
import os
import sys

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from pisces_rl.trainer import (build_accelerator, find_checkpoint, gather_lora_state_dict, gradient_sync,
                               is_deepspeed, load_checkpoint, save_checkpoint, zero_stage)

LR, CLIP, MICRO, STEPS = 0.05, 1.0, 2, 2


class LoRALinear(torch.nn.Module):
    """Frozen ``Linear`` plus a trainable low-rank update ``x A^T B^T``."""

    def __init__(self, d_in, d_out, rank=2):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = torch.nn.Parameter(0.3 * torch.randn(rank, d_in))
        self.lora_B = torch.nn.Parameter(0.3 * torch.randn(d_out, rank))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(LoRALinear(6, 8), torch.nn.Tanh(), LoRALinear(8, 3))


def make_opt(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def batches(step, rank):
    """The MICRO micro-batches [3, 6] of ``rank`` at optimiser step ``step`` (deterministic)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(3, 6, generator=g) + rank for _ in range(MICRO)]


def loss_fn(model, x):
    return model(x).pow(2).mean()


def train_step(acc, model, opt, sched, xs):
    """One optimiser step over the micro-batches ``xs``, accumulated by hand."""
    for i, x in enumerate(xs):
        with gradient_sync(acc, model, sync=i == len(xs) - 1):
            acc.backward(loss_fn(model, x.to(acc.device)) / len(xs))
    acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
    opt.step()
    sched.step()
    opt.zero_grad()


def reference(world):
    """The same STEPS steps in one process: mean over ranks of the accumulated loss, clip, AdamW."""
    model = make_model()
    opt, sched = make_opt(model)
    for step in range(STEPS):
        loss = sum(loss_fn(model, x) / MICRO for r in range(world) for x in batches(step, r)) / world
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def main():
    out = sys.argv[1]
    acc = build_accelerator(train_micro_batch_size=3, max_grad_norm=CLIP)
    world, rank = acc.num_processes, acc.process_index
    model = make_model()
    opt, sched = make_opt(model)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    for step in range(STEPS):
        train_step(acc, model, opt, sched, batches(step, rank))

    lora = gather_lora_state_dict(acc, model)                           # trainable weights only
    ref = reference(world)
    assert sorted(lora) == sorted(ref), (sorted(lora), sorted(ref))
    max_diff = max((lora[k] - ref[k]).abs().max().item() for k in lora)
    all_lora = gather_object([{k: v.tolist() for k, v in lora.items()}])

    def saver(directory):
        state = gather_lora_state_dict(acc, model)
        if acc.is_main_process:
            save_file(state, os.path.join(directory, "adapter_model.safetensors"))

    path = save_checkpoint(acc, out, STEPS, models=[model], extra_state={"sampler": {"epoch": 0}},
                           lora_saver=saver, keep_last=1)
    before = gather_lora_state_dict(acc, model)
    # 3rd step on data from the global RNG, then rewind to the checkpoint and redo it: the restored RNG
    # must give the same data, the restored optimizer/scheduler the same update.
    train_step(acc, model, opt, sched, [torch.randn(3, 6) + rank for _ in range(MICRO)])
    first = gather_lora_state_dict(acc, model)
    state = load_checkpoint(acc, find_checkpoint(out, "latest"))
    restored = gather_lora_state_dict(acc, model)
    train_step(acc, model, opt, sched, [torch.randn(3, 6) + rank for _ in range(MICRO)])
    second = gather_lora_state_dict(acc, model)

    saved = load_file(os.path.join(path, "lora", "adapter_model.safetensors")) if acc.is_main_process else before
    checks = {
        "num_processes": world,
        "distributed_type": str(acc.distributed_type),
        "deepspeed": is_deepspeed(acc),
        "zero_stage": zero_stage(acc),
        "max_diff_vs_reference": max_diff,
        "ranks_equal": all(r == all_lora[0] for r in all_lora),
        "restored_equals_saved": all(torch.equal(restored[k], before[k]) for k in before),
        "lora_file_equals_saved": all(torch.equal(saved[k], before[k]) for k in before),
        "resume_exact": all(torch.equal(first[k], second[k]) for k in first),
        "third_step_moved": any(not torch.equal(first[k], before[k]) for k in before),
        "state_step": state["step"],
        "checkpoint": os.path.basename(path),
        "lora_shapes": {k: list(v.shape) for k, v in lora.items()},
    }
    ok = (max_diff < 1e-5 and checks["ranks_equal"] and checks["restored_equals_saved"]
          and checks["lora_file_equals_saved"] and checks["resume_exact"] and checks["third_step_moved"])
    if acc.is_main_process:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(checks, f, indent=1)
    acc.wait_for_everyone()
    if not ok:
        print("FAILED", json.dumps(checks), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
