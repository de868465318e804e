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
from support.launches import assert_budget_rows, load_probes, probe_launch_command, read_metrics, run_command, tail

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


# --- train.offload for real: each library's own offload machinery, on 2 CPU ranks -----------------
# On CPU ranks host RAM is the device's memory, so these check mechanics: the run config reaches the
# library, the shards live under its offload machinery, and the losses do not change.

OFFLOAD_WORLD = 2


@pytest.fixture(scope="module")
def offload_runs(uneven_assets, tmp_path_factory):
    """(strategy, train.offload) -> (losses, grad norms, per-rank probes, memory_budget.json); each launched once."""
    runs = {}

    def get(strategy: str, offload: str):
        if (strategy, offload) not in runs:
            root = tmp_path_factory.mktemp(f"offload-{strategy}-{offload}")
            args = [
                *("--model.path", str(uneven_assets / "base"), "--data.path", str(uneven_assets / "data.jsonl")),
                *("--strategy", strategy, "--output_dir", str(root / "run"), "--train.offload", offload),
                *("--lora.dropout", "0", "--train.lr", "3e-3", "--train.max_steps", "3"),
            ]
            proc = run_command(probe_launch_command(strategy, root / "probe", args, OFFLOAD_WORLD), root / "launch.log")
            assert proc.returncode == 0, tail(root / "launch.log")
            metrics = read_metrics(root / "run")
            runs[strategy, offload] = (
                [m["loss"] for m in metrics],
                [m["grad_norm"] for m in metrics],
                load_probes(root / "probe", OFFLOAD_WORLD),
                json.loads((root / "run" / measure.REPORT_JSON).read_text()),
            )
        return runs[strategy, offload]

    return get


def test_fsdp2_offloaded_params_train_exactly_like_resident_ones(offload_runs):
    losses, norms, probes, report = offload_runs("fsdp2", "params")
    resident_losses, resident_norms, resident_probes, _ = offload_runs("fsdp2", "none")
    # The same arithmetic on the same values: FSDP2 copies each shard to the device before its all-gather.
    assert len(losses) == 3 and losses == resident_losses and norms == resident_norms, (losses, resident_losses)
    for probe, resident in zip(probes, resident_probes, strict=True):
        assert probe["offload"]["fsdp_policies"] == ["CPUOffloadPolicy"], probe["offload"]
        assert probe["offload"]["fsdp_offload_to_cpu"] == [True]
        assert probe["offload"]["fsdp_shard_devices"] == probe["offload"]["local_devices"] == ["cpu"]
        assert resident["offload"]["fsdp_policies"] == ["OffloadPolicy"]
        assert resident["offload"]["fsdp_offload_to_cpu"] == [False]
    # Measured on CPU, where nothing moves off a GPU: still the budget to the byte.
    assert_budget_rows(report, "fsdp2 offload params")


def test_zero3_offloads_params_and_optimizer_through_deepspeed(offload_runs):
    losses, norms, probes, report = offload_runs("zero3", "params")
    resident_losses, *_ = offload_runs("fsdp2", "none")
    # Another library's reduction order than FSDP2's: equal to the matrix's tolerance, not bit for bit.
    assert losses == pytest.approx(resident_losses, abs=2e-3), (losses, resident_losses)
    for probe in probes:
        assert probe["offload"]["zero_offload_param"] is True and probe["offload"]["zero_offload_optimizer"] is True
        assert probe["offload"]["local_devices"] == ["cpu"]
        # The launcher's torch AdamW steps the host partition (not DeepSpeedCPUAdam, an op built at first use).
        assert probe["optimizer_type"] == "AdamW"
    assert_budget_rows(report, "zero3 offload params")
