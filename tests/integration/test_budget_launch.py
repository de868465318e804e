"""The memory budget against real launches: every sharding strategy on 3 CPU ranks.

The model's shapes do not split evenly (so every kind of padding appears and the last rank differs),
with grouped-query attention, checkpointing off, LoRA dropout on and two micro batches per step. The
training run itself writes memory_budget.json (predicted vs measured per rank); the test reads it.
The family x strategy matrix (test_matrix.py) checks the same for every family at world sizes 1 and 2.
"""

import json
from pathlib import Path

import pytest

from launcher import launch, strategies
from launcher.config import DistConfig
from launcher.demo import build_base_model, write_dataset
from launcher.memory import measure
from support.launches import assert_budget_rows, run_command, tail

UNEVEN_WORLD = 3
SHARDING = [name for name in strategies.NAMES if strategies.get(name).spec.shards_adapter_state]


@pytest.fixture(scope="module")
def uneven_assets(tmp_path_factory) -> Path:
    """hidden 100, 5 heads of 20, 1 kv head, LoRA r=5: rows and flat sizes that 3 ranks cannot split evenly."""
    root = tmp_path_factory.mktemp("uneven")
    build_base_model(root / "base", layers=2, hidden=100, heads=5, kv_heads=1)
    write_dataset(root / "data.jsonl", records=64, words=30)
    return root


@pytest.fixture(scope="module", params=SHARDING)
def uneven_run(request, uneven_assets, tmp_path_factory) -> tuple[str, Path, dict]:
    strategy = request.param
    root = tmp_path_factory.mktemp(f"uneven-{strategy}")
    # The command `qlaunch train` itself runs: the shipped accelerate (and DeepSpeed) config for the strategy.
    cmd = launch.accelerate_command(
        strategies.get(strategy),
        launch.Machines.local(UNEVEN_WORLD),
        [
            "--model.path",
            str(uneven_assets / "base"),
            "--data.path",
            str(uneven_assets / "data.jsonl"),
            "--strategy",
            strategy,
            "--output_dir",
            str(root / "run"),
            "--lora.r",
            "5",
            "--lora.dropout",
            "0.05",
            "--train.gradient_checkpointing",
            "false",
            "--train.micro_batch_size",
            "3",
            "--train.grad_accum_steps",
            "2",
            "--train.max_steps",
            "1",
        ],
        DistConfig(),
    )
    proc = run_command(cmd, root / "launch.log")
    assert proc.returncode == 0, tail(root / "launch.log")
    return strategy, root, json.loads((root / "run" / measure.REPORT_JSON).read_text())


def test_uneven_shards_are_predicted_to_the_byte(uneven_run):
    strategy, root, report = uneven_run
    ranks = report["measured"]["ranks"]
    assert len(ranks) == UNEVEN_WORLD
    assert_budget_rows(report, strategy)
    # The shapes were chosen so that padding appears and, where tensors are split, ranks differ.
    assert any(r["components"]["shard_padding"] > 0 for r in ranks), ranks
    if strategy != "zero2":
        assert len({json.dumps(r["components"], sort_keys=True) for r in ranks}) > 1
    log = (root / "launch.log").read_text()
    assert "Memory per rank at the start of training" in log and "Memory per rank after the first step" in log
    assert (root / "run" / measure.REPORT_PNG).read_bytes().startswith(b"\x89PNG")
