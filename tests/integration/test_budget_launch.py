"""The memory budget against real launches: every sharding strategy on 3 CPU ranks.

The model's shapes do not split evenly (so every kind of padding appears and the last rank differs),
with grouped-query attention, checkpointing off, LoRA dropout on and two micro batches per step. The
training run itself writes memory_budget.json (predicted vs measured per rank); the test reads it.
The family x strategy matrix (test_matrix.py) checks the same for every family at world sizes 1 and 2.
"""

import json
from pathlib import Path
from typing import NamedTuple

import pytest

from launcher import launch, strategies
from launcher.config import DistConfig
from launcher.demo import build_base_model, write_dataset
from launcher.memory import measure
from support.families import BY_NAME
from support.launches import assert_budget_rows, load_probes, probe_runs_command, read_metrics, run_command, tail

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
# library, the shards live under its offload machinery, and the losses do not change. Besides the uneven
# Llama, real families (support/families.py): tied embeddings under FSDP2's CPUOffloadPolicy, and q/k/v
# biases (qwen2, tied too) and adapted fused 3D experts (mixtral-experts) under DeepSpeed's offload.

OFFLOAD_WORLD = 2
OFFLOAD_STEPS = 3
TIED_FAMILIES = ["gemma2"]
# Biases (and a tie) under ZeRO-3 offload; adapted 3D experts under both ZeRO modes.
ZERO_RUNS = [
    ("qwen2", "zero3", "params"),
    ("mixtral-experts", "zero3", "params"),
    ("mixtral-experts", "zero2", "optimizer"),
]
LAUNCHES = {
    "fsdp2": [("params", None), ("none", None), ("params", "gemma2"), ("none", "gemma2")]
    + [("none", family) for family, _, _ in ZERO_RUNS if family != "gemma2"],
    "zero3": [("params", None)] + [(offload, family) for family, s, offload in ZERO_RUNS if s == "zero3"],
    "zero2": [(offload, family) for family, s, offload in ZERO_RUNS if s == "zero2"],
}
"""Each strategy's runs (train.offload, family; None: the uneven Llama above), in one launch whose ranks run them in
turn (dist_probe.py --runs)."""


class OffloadRun(NamedTuple):
    losses: list[float]
    grad_norms: list[float]
    probes: list[dict]
    report: dict


@pytest.fixture(scope="module")
def offload_runs(request, family_assets, tmp_path_factory):
    """(strategy, train.offload, family) -> OffloadRun; the first ask of a strategy launches all its runs."""
    runs: dict[tuple, OffloadRun] = {}

    def args(strategy: str, offload: str, family: str | None, out: Path) -> list[str]:
        if family is None:
            assets, family_args = request.getfixturevalue("uneven_assets"), []
        else:
            assets, family_args = family_assets(family), [*BY_NAME[family].run_args, "--data.max_seq_len", "64"]
        return [
            *family_args,
            *("--model.path", str(assets / "base"), "--data.path", str(assets / "data.jsonl")),
            *("--strategy", strategy, "--output_dir", str(out), "--train.offload", offload),
            *("--lora.dropout", "0", "--train.lr", "3e-3", "--train.max_steps", str(OFFLOAD_STEPS)),
        ]

    def get(strategy: str, offload: str, family: str | None = None) -> OffloadRun:
        if (strategy, offload, family) not in runs:
            root = tmp_path_factory.mktemp(f"offload-{strategy}")
            roots = {key: root / f"{key[1] or 'uneven'}-{key[0]}" for key in LAUNCHES[strategy]}
            spec = [
                {"probe_dir": str(r / "probe"), "args": args(strategy, *key, r / "run")} for key, r in roots.items()
            ]
            (root / "runs.json").write_text(json.dumps(spec))
            proc = run_command(probe_runs_command(strategy, root / "runs.json", OFFLOAD_WORLD), root / "launch.log")
            assert proc.returncode == 0, tail(root / "launch.log")
            for (run_offload, run_family), run_root in roots.items():
                metrics = read_metrics(run_root / "run")
                runs[strategy, run_offload, run_family] = OffloadRun(
                    [m["loss"] for m in metrics],
                    [m["grad_norm"] for m in metrics],
                    load_probes(run_root / "probe", OFFLOAD_WORLD),
                    json.loads((run_root / "run" / measure.REPORT_JSON).read_text()),
                )
        return runs[strategy, offload, family]

    return get


def assert_fsdp2_offloaded_exactly(run: OffloadRun, resident: OffloadRun) -> None:
    # The same arithmetic on the same values: FSDP2 copies each shard to the device before its all-gather.
    assert len(run.losses) == OFFLOAD_STEPS and run.losses == resident.losses, (run.losses, resident.losses)
    assert run.grad_norms == resident.grad_norms, (run.grad_norms, resident.grad_norms)
    for probe, resident_probe in zip(run.probes, resident.probes, strict=True):
        assert probe["offload"]["fsdp_policies"] == ["CPUOffloadPolicy"], probe["offload"]
        assert probe["offload"]["fsdp_offload_to_cpu"] == [True]
        assert probe["offload"]["fsdp_shard_devices"] == probe["offload"]["local_devices"] == ["cpu"]
        assert resident_probe["offload"]["fsdp_policies"] == ["OffloadPolicy"]
        assert resident_probe["offload"]["fsdp_offload_to_cpu"] == [False]


def assert_zero_offload(run: OffloadRun, *, params: bool) -> None:
    """DeepSpeed's optimizer offloads its optimizer partition (and, with `params`, its parameter partitions)."""
    for probe in run.probes:
        facts = probe["offload"]
        # ZeRO-3's optimizer says offload_optimizer; ZeRO-1/2's says cpu_offload and has no offload_param.
        optimizer_offloaded = facts["zero_offload_optimizer"] if params else facts["zero_cpu_offload"]
        assert optimizer_offloaded is True, facts
        assert bool(facts["zero_offload_param"]) is params, facts
        assert facts["local_devices"] == ["cpu"], facts
        # The launcher's torch AdamW steps the host partition (not DeepSpeedCPUAdam, an op built at first use).
        assert probe["optimizer_type"] == "AdamW"


def assert_tie_kept(run: OffloadRun, family: str) -> None:
    tied = BY_NAME[family].tied
    for rank, probe in enumerate(run.probes):
        assert probe["tie_before_shard"]["same_parameter"] is tied, (rank, probe["tie_before_shard"])
        assert probe["tie_after_shard"] == {"same_parameter": tied, "same_storage": tied}, (rank, probe)


def test_fsdp2_offloaded_params_train_exactly_like_resident_ones(offload_runs):
    run = offload_runs("fsdp2", "params")
    assert_fsdp2_offloaded_exactly(run, offload_runs("fsdp2", "none"))
    # Measured on CPU, where nothing moves off a GPU: still the budget to the byte.
    assert_budget_rows(run.report, "fsdp2 offload params")


@pytest.mark.parametrize("family", TIED_FAMILIES)
def test_fsdp2_offloads_tied_embeddings_as_one_parameter(offload_runs, family):
    assert BY_NAME[family].tied
    run, resident = offload_runs("fsdp2", "params", family), offload_runs("fsdp2", "none", family)
    assert_fsdp2_offloaded_exactly(run, resident)
    # The input and output embeddings stay one parameter (one offloaded shard, one storage) on every rank.
    assert_tie_kept(run, family)
    assert_tie_kept(resident, family)
    assert_budget_rows(run.report, f"{family} fsdp2 offload params")


def test_zero3_offloads_params_and_optimizer_through_deepspeed(offload_runs):
    run = offload_runs("zero3", "params")
    resident_losses = offload_runs("fsdp2", "none").losses
    # Another library's reduction order than FSDP2's: equal to the matrix's tolerance, not bit for bit.
    assert run.losses == pytest.approx(resident_losses, abs=2e-3), (run.losses, resident_losses)
    assert_zero_offload(run, params=True)
    assert_budget_rows(run.report, "zero3 offload params")


@pytest.mark.parametrize(("family", "strategy", "offload"), ZERO_RUNS)
def test_zero_offload_of_biases_and_experts(offload_runs, family, strategy, offload):
    run, resident = offload_runs(strategy, offload, family), offload_runs("fsdp2", "none", family)
    # The matrix's tolerances against another library's reduction order.
    assert len(run.losses) == OFFLOAD_STEPS and run.losses[-1] != run.losses[0], run.losses
    assert run.losses == pytest.approx(resident.losses, abs=2e-3), (run.losses, resident.losses)
    assert run.grad_norms == pytest.approx(resident.grad_norms, rel=2e-2), (run.grad_norms, resident.grad_norms)
    assert_zero_offload(run, params=offload == "params")
    assert_tie_kept(run, family)
    assert_budget_rows(run.report, f"{family} {strategy} offload {offload}")
