"""Running real launches from the tests: commands from the repository root on CPU, their logs and outputs."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
CPU_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def python() -> str:
    return sys.executable


def run_command(cmd: list[str], log: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a command from the repo root with its output in `log`."""
    full_env = dict(os.environ, **CPU_ENV, **(env or {}))
    with log.open("w") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout)


def start_command(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Starts a command from the repo root with its output in `log`, without waiting for it."""
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, **CPU_ENV, **(env or {}))
    )


def wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Waits until `predicate()`; fails the test if `proc` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early:\n{tail(log)}"
        assert time.monotonic() < deadline, f"timed out:\n{tail(log)}"
        time.sleep(0.1)


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


def probe_command(strategy: str, probe_args: list[str], world: int = 2) -> list[str]:
    """The `accelerate launch` command `qlaunch train` runs for `strategy`, with `support/dist_probe.py PROBE_ARGS`
    as each rank."""
    from launcher import launch, strategies
    from launcher.config import DistConfig

    entry = (str(SUPPORT / "dist_probe.py"), *probe_args)
    return launch.accelerate_command(strategies.get(strategy), launch.Machines.local(world), [], DistConfig(), entry)


def probe_launch_command(strategy: str, probe_dir: Path, train_args: list[str], world: int = 2) -> list[str]:
    """One run of `train_args`, observed into `probe_dir`."""
    return probe_command(strategy, [str(probe_dir), "--", *train_args], world)


def probe_runs_command(strategy: str, runs_file: Path, world: int = 2) -> list[str]:
    """Every run listed in `runs_file`, in turn in the same ranks (dist_probe.py --runs)."""
    return probe_command(strategy, ["--runs", str(runs_file)], world)


def load_probes(probe_dir: Path, world: int = 2) -> list[dict]:
    """What support/dist_probe.py observed on each rank."""
    import torch

    return [torch.load(probe_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def read_metrics(out: Path) -> list[dict]:
    """A run's metrics.jsonl records (none before its first logged step)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_budget_rows(report: dict, context=None) -> None:
    """Static components predicted to the byte, activations within 10%, on every rank of a memory_budget.json."""
    from launcher.memory.components import STATIC_COMPONENTS

    for row in report["comparison"]:
        if row["component"] in STATIC_COMPONENTS:
            assert row["predicted"] == row["measured"], (context, row)
        else:
            assert abs(row["error_pct"]) <= 10, (context, row)


def qlaunch(log: Path, *args: str, expect: int | None = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` from the repo root with its output in `log`; fails the test with the
    log's end unless it exits with `expect` (None: any status)."""
    proc = run_command([python(), "-m", "launcher", *args], log, env=env)
    if expect is not None:
        assert proc.returncode == expect, tail(log)
    return proc


# What other libraries write to a terminal: Python warnings (`file:line: XWarning: ...` and the source line after
# it), logging records in DeepSpeed's or torch's formats, torchrun's banner, bitsandbytes' kernel-hub notice and
# DeepSpeed's op builds. None of these may reach the terminal of a run that was not asked to be --verbose.
OTHER_LIBRARIES = re.compile(
    r"Warning: |warnings\.warn\(|site-packages/|\[(WARNING|INFO)\]|^[WI]\d{4} |\*{5}|kernels-community|built successfully"
)


def other_libraries_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if OTHER_LIBRARIES.search(line)]
