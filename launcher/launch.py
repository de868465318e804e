"""`qlaunch train` outside a launcher: start `accelerate launch` with the shipped config for the strategy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .config import ConfigError
from .strategies import Strategy

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALLED_SHARE = Path(sys.prefix) / "share" / "qlora-launcher"


def shipped_dir(name: str) -> Path:
    """`accelerate_configs` or `ds_configs`, from the checkout or from an installed wheel."""
    for root in (REPO_ROOT, INSTALLED_SHARE):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"Cannot find the shipped `{name}/` folder (looked in {REPO_ROOT} and {INSTALLED_SHARE}).")


def inside_launcher() -> bool:
    """True in a process started by accelerate launch / torchrun (one rank of a run)."""
    return "LOCAL_RANK" in os.environ


def default_nproc() -> int:
    return max(1, torch.cuda.device_count())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(strategy: Strategy, nproc: int, train_args: list[str]) -> list[str]:
    config = shipped_dir("accelerate_configs") / strategy.accelerate_config
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config),
        "--num_processes", str(nproc),
        "--num_machines", "1",
        "--machine_rank", "0",
        "--main_process_port", str(free_port()),
    ]
    if strategy.name.startswith("zero"):
        cmd += ["--deepspeed_config_file", str(shipped_dir("ds_configs") / f"{strategy.name}.json")]
    return cmd + ["-m", "launcher", "train", *train_args]


def launch(strategy: Strategy, nproc: int, train_args: list[str]) -> int:
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}.")
    cmd = accelerate_command(strategy, nproc, train_args)
    return subprocess.call(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
