"""Worker launched by tests/test_nft_trainer.py with ``accelerate launch`` on 2 CPU processes (ZeRO-2).

usage: accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 2 tests/_nft_worker.py OUTPUT_DIR

Runs NFTTrainer on the tiny in-code Wan model (1 prompt group per process, 2 iterations) and checks what
ZeRO-2 could break: the optimality weights use the std of *both* processes' rewards; sampling and v_old swap
the old policy in and restore the live weights bit for bit; after every iteration the old policy is
``eta * old + (1 - eta) * theta`` and identical on both processes, as are the trained weights; a checkpoint
written after iteration 1 (DeepSpeed shards + the old policy), reloaded after iteration 2, redoes iteration 2
bit for bit. Rank 0 writes result.json; a failed check exits non-zero.
"""
import json
import os
import sys

import torch
from accelerate.utils import gather_object

from pisces_rl.config import GRPOConfig, load_config
from pisces_rl.trainer import NFTTrainer, find_checkpoint, load_checkpoint, zero_stage
from pisces_rl.trainer.nft import nft_advantages, old_policy_decay, optimality_weight


def brightness(videos, prompts, **kwargs):
    """Mean pixel value, [B, F, C, H, W] -> [B]."""
    return videos.mean(dim=(1, 2, 3, 4))


def live(trainer):
    return {n: p.detach().float().cpu().clone() for n, p in trainer.policy.transformer.named_parameters()
            if p.requires_grad}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def main():
    out = sys.argv[1]
    cfg = load_config(GRPOConfig, "recipes/configs/nft_tiny_cpu.yaml", [
        f"output_dir={out}", "train.max_steps=2", "train.prompts_per_step=2", "train.num_generations=2",
        "train.sample_batch_size=2", "train.train_batch_size=1", "train.gradient_accumulation_steps=2",
        "train.learning_rate=5e-3", "sampling.num_inference_steps=3", "sampling.height=16", "sampling.width=16",
        "nft.old_decay_rate=0.2", "logging.report_to=none", "data.num_eval_prompts=1", "checkpoint.keep_last=1"])
    trainer = NFTTrainer(cfg, rewards={"bright": brightness})
    acc = trainer.accelerator
    checks = {"num_processes": acc.num_processes, "zero_stage": zero_stage(acc), "batch": trainer.batch}
    with torch.no_grad():                          # B = 0 at init: give theta a direction so the swap shows
        for p in trainer.policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.device))

    # --- r from both processes' rewards (global std)
    batch = trainer.sample(0)
    total = trainer.rewards(batch.videos, batch.prompts).total
    r = trainer.optimality(total, batch.group_ids)
    every = gather_object([(total.tolist(), batch.group_ids.tolist())])
    all_r = torch.tensor([v for t, _ in every for v in t], dtype=torch.float64)
    all_g = torch.tensor([g for _, gs in every for g in gs])
    expected = optimality_weight(nft_advantages(all_r, all_g), 5.0)
    mine = expected[acc.process_index * len(total):(acc.process_index + 1) * len(total)]
    checks["r_uses_both_processes"] = bool(torch.allclose(r.double(), mine, atol=1e-6))
    local_only = optimality_weight(nft_advantages(total, batch.group_ids), 5.0)
    checks["r_differs_from_local_std"] = bool(not torch.allclose(r.double(), local_only, atol=1e-6))

    # --- two iterations, checkpoint after the first
    trace = []
    for it in range(2):
        old, theta = {k: v.clone() for k, v in trainer.old.shadow.items()}, live(trainer)
        with trainer.old.swapped():
            swapped_in = same(live(trainer), old)
        swapped_in = swapped_in and same(live(trainer), theta)
        metrics = trainer.train_step(it)
        trainer.step = it + 1
        eta = old_policy_decay(trainer.old.optimizer_steps, 0, 0.2, 0.5)
        now = live(trainer)
        formula = all(torch.allclose(trainer.old.shadow[k], eta * old[k] + (1 - eta) * now[k], atol=1e-7)
                      for k in old)
        trace.append({"eta": metrics["train/old_eta"], "expected_eta": eta, "swap_restored": swapped_in,
                      "old_formula": formula, "moved": not same(now, theta), "loss": metrics["train/loss"]})
        if it == 0:
            trainer._maybe_checkpoint(force=True)
    first = live(trainer), {k: v.clone() for k, v in trainer.old.shadow.items()}, trainer.old.optimizer_steps
    ranks = gather_object([{k: v.tolist() for k, v in {**first[0], **{"old." + n: s for n, s in first[1].items()}}
                            .items()}])
    load_checkpoint(acc, find_checkpoint(out, "latest"))
    trainer.step = 1
    restored_steps = trainer.old.optimizer_steps
    trainer.train_step(1)
    again = live(trainer), trainer.old.shadow
    checks.update({
        "trace": trace,
        "ranks_equal": all(r == ranks[0] for r in ranks),
        "resume_exact": same(first[0], again[0]) and same(first[1], again[1]),
        "restored_optimizer_steps": restored_steps,
        "optimizer_steps": first[2],
    })
    ok = (checks["r_uses_both_processes"] and checks["r_differs_from_local_std"] and checks["ranks_equal"]
          and checks["resume_exact"] and all(t["swap_restored"] and t["old_formula"] and t["moved"] for t in trace))
    if acc.is_main_process:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(checks, f, indent=1, default=str)
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():   # close the group together (a rank exiting early makes gloo abort)
        torch.distributed.destroy_process_group()
    if not ok:
        print("FAILED", json.dumps(checks, default=str), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
