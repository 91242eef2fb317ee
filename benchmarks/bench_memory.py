"""Peak memory and time of one training step against video length, with and without the memory options.

    python benchmarks/bench_memory.py [--frames 9 17 33 65] [--size 64] [--batch 2] [--trainers backprop grpo]

Every (trainer, options, frames) cell runs in a fresh subprocess on the tiny in-code Wan model with both PISCES
rewards on the tiny encoder, builds the trainer, then measures one full step (backprop: generate x0, noise,
student/teacher/target passes, decode, rewards, backward, optimiser step; GRPO: sample a group, score, one inner
epoch of clipped updates). Peak memory of the step:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only);
* CPU: the resident-set high-water mark ``VmHWM`` of the process, reset just before the step by writing ``5``
  to ``/proc/self/clear_refs`` (Linux), minus the resident set at that moment -- what the step added. The
  subprocesses run with a fixed glibc mmap threshold so that freed tensors leave the resident set at once.

Options ``on``: denoiser gradient checkpointing (``model.gradient_checkpointing``), VAE decode one video at a
time (``sampling.decode_chunk_size=1``) and, for backprop, checkpointed (``train.decode_checkpointing``), one
video per backward (``train.train_batch_size=1``), the rewards see ``--reward-frames`` uniformly spaced frames
(``rewards.num_frames``) with at most ``--frame-cap`` frames per reward call (``rewards.max_frames_per_call``).
``off``: none of these, and the whole batch in one backward. The goal: with the options on, peak memory grows no
faster than the number of frames (growth per doubling <= ~2x).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

PROMPTS = ["a red circle moving left", "two blue squares moving right"]


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def overrides(args: argparse.Namespace, trainer: str, options: bool, frames: int, out: str) -> list[str]:
    common = [f"output_dir={out}", "logging.report_to=none", "data.num_eval_prompts=1",
              f"sampling.num_frames={frames}", f"sampling.height={args.size}", f"sampling.width={args.size}",
              f"sampling.num_inference_steps={args.steps}", "train.prompts_per_step=1",
              f"train.num_generations={args.batch}", f"train.sample_batch_size={args.batch}",
              "rewards.weights={ot_quality: 1.0, ot_semantic: 1.0}"]
    if trainer == "backprop":
        common += [f"train.teacher_steps={args.steps}",  # the measured setting: generated x0, CFG in the loss
                   "train.latent_source=generated", "train.guidance_scale=null"]
    if options:
        return common + ["model.gradient_checkpointing=true", "sampling.decode_chunk_size=1",
                         "train.train_batch_size=1", f"rewards.num_frames={min(args.reward_frames, frames)}",
                         f"rewards.max_frames_per_call={args.frame_cap}"] + (
            ["train.decode_checkpointing=true"] if trainer == "backprop" else [])
    return common + ["model.gradient_checkpointing=false", "sampling.decode_chunk_size=0",
                     f"train.train_batch_size={args.batch}"] + (
        ["train.decode_checkpointing=false"] if trainer == "backprop" else [])


def worker(args: argparse.Namespace) -> dict:
    """One cell, in this (fresh) process: build the trainer, then measure one training step."""
    import torch

    from pisces_rl.config import BackpropConfig, GRPOConfig, load_config
    from pisces_rl.trainer import BackpropTrainer, GRPOTrainer

    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="bench_memory_")
    over = overrides(args, args.trainer, args.options == "on", args.frames, out)
    if args.trainer == "backprop":
        trainer = BackpropTrainer(load_config(BackpropConfig, None, over), prompts=PROMPTS)

        def step():
            trainer.update(trainer.make_batch(0))
    else:
        trainer = GRPOTrainer(load_config(GRPOConfig, None, over), prompts=PROMPTS)

        def step():
            rollout, groups = trainer.sample(0)
            trainer.update(rollout, trainer.advantages(trainer.rewards(rollout.videos, rollout.prompts), groups))
    cuda = trainer.policy.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if not _reset_peak():
            raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs); run on Linux or a GPU")
        base = _rss_now()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak()
    return {"peak_mb": (peak - base) / 2**20, "total_mb": peak / 2**20, "step_s": seconds,
            "measure": "cuda max_memory_allocated" if cuda else "RSS high-water (VmHWM)"}


def run_cell(args: argparse.Namespace, trainer: str, options: str, frames: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--trainer", trainer, "--options", options,
           "--frames", str(frames), "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
           "--reward-frames", str(args.reward_frames), "--frame-cap", str(args.frame_cap)]
    # glibc keeps freed blocks in its heap (and raises its mmap threshold after large frees), so the resident
    # set would reflect allocator history; a fixed, low mmap threshold returns freed tensors to the OS at once.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer}/{options}/{frames} frames failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 65], help="video lengths (4k+1)")
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels (multiple of 16)")
    parser.add_argument("--batch", type=int, default=2, help="videos per step (one prompt group)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps (and the backprop noise-level grid)")
    parser.add_argument("--reward-frames", type=int, default=8, help="frames the rewards see with options on")
    parser.add_argument("--frame-cap", type=int, default=16, help="frames per reward call with options on")
    parser.add_argument("--trainers", nargs="+", default=["backprop", "grpo"], choices=["backprop", "grpo"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", default="backprop", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="on", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.frames = args.frames[0]
        print(json.dumps(worker(args)))
        return 0

    print(f"tiny Wan, {args.batch} videos x {args.size}x{args.size}px, {args.steps} steps, both OT rewards; "
          f"one fresh process per cell")
    header = f"{'trainer':<9} {'options':<7} {'frames':>6} {'peak MB':>9} {'x per doubling':>14} {'step s':>8}"
    print(header + "\n" + "-" * len(header))
    worst = {}
    for trainer in args.trainers:
        for options in ("off", "on"):
            previous = None
            for frames in args.frames:
                cell = run_cell(args, trainer, options, frames)
                growth = "" if previous is None else f"{cell['peak_mb'] / max(previous, 1e-9):.2f}x"
                if previous is not None:
                    worst[(trainer, options)] = max(worst.get((trainer, options), 0.0),
                                                    cell["peak_mb"] / max(previous, 1e-9))
                print(f"{trainer:<9} {options:<7} {frames:>6} {cell['peak_mb']:>9.1f} {growth:>14} "
                      f"{cell['step_s']:>8.2f}", flush=True)
                previous = cell["peak_mb"]
    print(f"(peak = {cell['measure']} of the step above the memory held before it)")
    ratio = (args.frames[-1] - 1) / max(1, args.frames[-2] - 1) if len(args.frames) > 1 else 2.0
    for (trainer, options), value in worst.items():
        verdict = "" if options == "off" else (" -- linear or better" if value <= ratio * 1.1 else " -- SUPERLINEAR")
        print(f"  {trainer}, options {options}: largest growth per doubling of frames {value:.2f}x{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
