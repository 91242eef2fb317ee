"""Launch a script under ``accelerate launch`` as real CPU processes (shared by the distributed tests)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCEL_CONFIGS = ROOT / "recipes" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str, script: str, args: list[str], num_processes: int = 2,
                      timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file recipes/accelerate/<config>.yaml --num_processes N script args``.

    No ACCELERATE_USE_CPU: :func:`pisces_rl.trainer.build_accelerator` makes CPU processes cooperate on its
    own (gloo for DeepSpeed, CPU DDP otherwise). One thread per process keeps 2 processes off each other's cores.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_") and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", str(ACCEL_CONFIGS / f"{config}.yaml"), "--num_processes", str(num_processes),
           "--main_process_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
