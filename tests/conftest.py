"""Shared fixtures: the embedded demo model and data, built once, and helpers to run real launches."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    """The demo's base model (random Llama, saved with save_pretrained), tokenizer and data."""
    from launcher.demo import prepare_demo

    workdir = tmp_path_factory.mktemp("demo")
    prepare_demo(workdir)
    return workdir


def run_command(cmd: list[str], log: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a command from the repo root with its output in `log`; fails the test with the log's end."""
    full_env = dict(os.environ, **CPU_ENV, **(env or {}))
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout)
    return proc


def start_command(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Starts a command from the repo root with its output in `log`, without waiting for it."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, **CPU_ENV, **(env or {})))


def wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Waits until `predicate()`; fails the test if `proc` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early:\n{tail(log)}"
        assert time.monotonic() < deadline, f"timed out:\n{tail(log)}"
        time.sleep(0.1)


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


def python() -> str:
    return sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_launch_command(strategy: str, probe_dir: Path, train_args: list[str], world: int = 2) -> list[str]:
    """`accelerate launch` with the shipped config for `strategy`, running tests/dist_probe.py."""
    cmd = [
        python(), "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / f"{strategy}.yaml"),
        "--num_processes", str(world),
        "--main_process_port", str(free_port()),
    ]
    if strategy.startswith("zero"):
        cmd += ["--deepspeed_config_file", str(REPO / "ds_configs" / f"{strategy}.json")]
    return cmd + ["tests/dist_probe.py", str(probe_dir), "--", *train_args]
