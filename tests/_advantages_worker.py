"""Worker launched by tests/test_advantages.py with ``accelerate launch`` on 2 CPU processes.

usage: accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 \
           tests/_advantages_worker.py OUTPUT_DIR

Each process holds 2 whole groups of a fixed 8-video batch (as GroupSampler places them). With
``scale="batch"`` and :func:`gather_scores`, its advantages must equal its slice of the advantages of the
whole batch computed in one process; without the gather (the local std) they must not. Each rank writes
``result_<rank>.json``.
"""
import json
import os
import sys

import torch

from pisces_rl.trainer import build_accelerator
from pisces_rl.trainer.advantages import gather_scores, group_advantages

NAN = float("nan")
SCORES = torch.tensor([[0.50, 0.2], [0.51, 0.9], [0.40, NAN], [0.45, 0.3],       # rank 0: groups 0, 1
                       [0.00, 0.5], [1.00, 0.1], [0.70, 0.6], [0.20, 0.8]])      # rank 1: groups 2, 3   [8, 2]
GROUPS = torch.arange(8) // 2


def main(out_dir: str) -> None:
    acc = build_accelerator()
    rank, n = acc.process_index, acc.num_processes
    rows = slice(rank * 8 // n, (rank + 1) * 8 // n)
    local, groups = SCORES[rows], GROUPS[rows]
    result = {"num_processes": n, "distributed_type": str(acc.distributed_type)}
    for mode in ("sum", "per_reward"):
        gathered = gather_scores(local, acc)
        adv = group_advantages(local, groups, mode=mode, scale="batch", batch_scores=gathered)
        whole = group_advantages(SCORES, GROUPS, mode=mode, scale="batch")[rows]
        local_only = group_advantages(local, groups, mode=mode, scale="batch")
        result[mode] = {"gathered_equals_batch": torch.equal(gathered.nan_to_num(-9), SCORES.nan_to_num(-9)),
                        "max_diff_vs_whole_batch": float((adv - whole).abs().max()),
                        "local_std_diff": float((local_only - whole).abs().max())}
    with open(os.path.join(out_dir, f"result_{rank}.json"), "w") as f:
        json.dump(result, f)
    acc.wait_for_everyone()                 # leave together and close the process group, so no rank exits while the
    torch.distributed.destroy_process_group()  # other still talks to it (gloo aborts: "terminate called ...")


if __name__ == "__main__":
    main(sys.argv[1])
