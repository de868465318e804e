"""bf16 mixed precision for real on 2 CPU ranks (CPU autocast): FSDP1 against FSDP2.

The matrix runs without autocast (the CPU default). On GPUs runs use bf16, where FSDP1 gathers its
units in bf16 as FSDP2 does: each unit holds one dtype (norms and LoRA matrices in their own fp32
units), so the cast leaves the packed 4-bit data untouched. Here both run the same steps of a
family with q/k/v biases and tied embeddings under `train.mixed_precision: bf16`.
"""

import json

import pytest

from launcher.memory import measure
from support.families import BY_NAME
from support.launches import assert_budget_rows, load_probes, probe_launch_command, read_metrics, run_command, tail
from support.shards import assert_shards_are_rank0s_bytes

FAMILY = "qwen2"
WORLD = 2


@pytest.fixture(scope="module")
def bf16_runs(family_assets, tmp_path_factory):
    assets = family_assets(FAMILY)
    runs = {}
    for strategy in ("fsdp1", "fsdp2"):
        root = tmp_path_factory.mktemp(f"bf16-{strategy}")
        args = [
            *BY_NAME[FAMILY].run_args,
            *("--model.path", str(assets / "base"), "--data.path", str(assets / "data.jsonl")),
            *("--strategy", strategy, "--output_dir", str(root / "run"), "--train.mixed_precision", "bf16"),
            *("--data.max_seq_len", "64", "--lora.dropout", "0", "--train.lr", "3e-3", "--train.max_steps", "3"),
        ]
        proc = run_command(probe_launch_command(strategy, root / "probe", args, WORLD), root / "launch.log")
        assert proc.returncode == 0, tail(root / "launch.log")
        runs[strategy] = (
            read_metrics(root / "run"),
            load_probes(root / "probe", WORLD),
            json.loads((root / "run" / measure.REPORT_JSON).read_text()),
        )
    return runs


def test_fsdp1_trains_in_bf16_like_fsdp2(bf16_runs):
    fsdp1, fsdp2 = bf16_runs["fsdp1"][0], bf16_runs["fsdp2"][0]
    assert len(fsdp1) == len(fsdp2) == 3
    # The same bf16 arithmetic; FSDP2 also casts the loss it returns to bf16 (Accelerate's output_dtype).
    assert [m["loss"] for m in fsdp1] == pytest.approx([m["loss"] for m in fsdp2], abs=3e-2)
    norms1, norms2 = [m["grad_norm"] for m in fsdp1], [m["grad_norm"] for m in fsdp2]
    assert all(n > 0 for n in norms1) and norms1 == pytest.approx(norms2, rel=2e-2), (norms1, norms2)


def test_fsdp1_units_keep_each_weight_in_its_dtype(bf16_runs):
    _, probes, report = bf16_runs["fsdp1"]
    sizes = {name: element_size for name, *_, element_size in probes[0]["shards"]}
    # Stored as the other strategies store them: packed 4-bit data and biases in bf16, norms and LoRA in fp32.
    assert {sizes[n] for n in sizes if n.endswith("proj.base_layer.weight")} == {2}
    assert {sizes[n] for n in sizes if n.endswith("proj.base_layer.bias")} == {2}
    assert {sizes[n] for n in sizes if "norm" in n} == {4}
    assert {sizes[n] for n in sizes if "lora_" in n} == {4}
    assert_shards_are_rank0s_bytes(probes, "fsdp1")
    assert report["predicted"]["mixed_precision"] == "bf16"
    assert_budget_rows(report, "fsdp1 bf16")


def test_fsdp1_needs_no_more_memory_than_fsdp2(bf16_runs):
    measured = {
        strategy: max(sum(rank["components"].values()) for rank in report["measured"]["ranks"])
        for strategy, (_, _, report) in bf16_runs.items()
    }
    assert measured["fsdp1"] <= 1.10 * measured["fsdp2"], measured
