"""Shared fixtures: the embedded demo model and data, built once, and helpers to run real launches."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CELL_FACTS = pytest.StashKey[dict]()
"""(family, strategy) -> what test_matrix.py's cell run found (4-bit and adapted layers)."""
CELL_OUTCOMES = pytest.StashKey[dict]()
"""(family, strategy) -> whether each of that cell's tests passed (setup included)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cell = item.callspec.params.get("cell") if hasattr(item, "callspec") else None
    if cell is not None and (report.when == "call" or report.failed):
        item.config.stash.setdefault(CELL_OUTCOMES, {}).setdefault(cell, []).append(report.passed)
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    """The demo's base model (random Llama, saved with save_pretrained), tokenizer and data."""
    from launcher.demo import prepare_demo

    workdir = tmp_path_factory.mktemp("demo")
    prepare_demo(workdir)
    return workdir


@pytest.fixture(scope="session")
def family_assets(tmp_path_factory):
    """tests/families.py's models: each family's model, tokenizer and data, built once per session on first use."""
    from families import BY_NAME, build_family

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(BY_NAME[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


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


def probe_launch_command(strategy: str, probe_dir: Path, train_args: list[str], world: int = 2) -> list[str]:
    """The `accelerate launch` command `qlaunch train` runs for `strategy`, with tests/dist_probe.py as each rank."""
    from launcher import launch, strategies
    from launcher.config import DistConfig

    entry = ("tests/dist_probe.py", str(probe_dir), "--")
    return launch.accelerate_command(strategies.get(strategy), launch.Machines.local(world), train_args, DistConfig(), entry)


def load_probes(probe_dir: Path, world: int = 2) -> list[dict]:
    """What tests/dist_probe.py observed on each rank."""
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


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if `qlaunch train` gets as far as starting `accelerate launch`."""
    from launcher import launch

    def refuse(*args, **kwargs):
        raise AssertionError("accelerate launch was started, but the command should have stopped before it")

    monkeypatch.setattr(launch, "launch", refuse)
