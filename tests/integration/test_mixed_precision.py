"""bf16 compute for real on 2 CPU ranks, on every strategy: what GPUs compute in.

The matrix runs without autocast (the CPU default), in fp32 on CPUs without native bf16
(`quant.compute_dtype: auto`). On GPUs runs use bf16, where FSDP1 gathers its units in bf16 as FSDP2
does: each unit holds one dtype (norms and LoRA matrices in their own fp32 units), so the cast leaves
the packed 4-bit data untouched. Here both run the same steps of a family with q/k/v biases and tied
embeddings under `train.mixed_precision: bf16`; ZeRO-2, ZeRO-3 and DDP run them with
`quant.compute_dtype: bfloat16`, the bf16 4-bit matmuls GPUs run, with the matrix's checks of shards and budget.
"""

import json

import pytest

from launcher.memory import measure
from support.families import BY_NAME
from support.launches import assert_budget_rows, load_probes, probe_launch_command, read_metrics, run_command, tail
from support.shards import assert_shards_are_rank0s_bytes

FAMILY = "qwen2"
WORLD = 2


def bf16_run(assets, root, strategy: str, bf16: tuple[str, str]):
    """3 steps of FAMILY on `strategy` with `bf16` (the override that makes it compute in bf16): its metrics,
    probes and memory report."""
    args = [
        *BY_NAME[FAMILY].run_args,
        *("--model.path", str(assets / "base"), "--data.path", str(assets / "data.jsonl")),
        *("--strategy", strategy, "--output_dir", str(root / "run"), *bf16),
        *("--data.max_seq_len", "64", "--lora.dropout", "0", "--train.lr", "3e-3", "--train.max_steps", "3"),
    ]
    proc = run_command(probe_launch_command(strategy, root / "probe", args, WORLD), root / "launch.log")
    assert proc.returncode == 0, tail(root / "launch.log")
    return (
        read_metrics(root / "run"),
        load_probes(root / "probe", WORLD),
        json.loads((root / "run" / measure.REPORT_JSON).read_text()),
    )


@pytest.fixture(scope="module")
def bf16_runs(family_assets, tmp_path_factory):
    autocast = ("--train.mixed_precision", "bf16")
    return {
        strategy: bf16_run(family_assets(FAMILY), tmp_path_factory.mktemp(f"bf16-{strategy}"), strategy, autocast)
        for strategy in ("fsdp1", "fsdp2")
    }


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "ddp"])
def test_bf16_compute_shards_and_budgets_like_the_matrix(strategy, family_assets, tmp_path):
    compute = ("--quant.compute_dtype", "bfloat16", "--train.mixed_precision", "no")
    metrics, probes, report = bf16_run(family_assets(FAMILY), tmp_path, strategy, compute)
    assert len(metrics) == 3 and all(m["grad_norm"] > 0 for m in metrics)
    sizes = {name: element_size for name, *_, element_size in probes[0]["shards"]}
    assert {sizes[n] for n in sizes if n.endswith("proj.base_layer.weight")} == {2}  # packed 4-bit data as bf16
    assert {sizes[n] for n in sizes if "lora_" in n} == {4}
    assert_shards_are_rank0s_bytes(probes, strategy)
    assert_budget_rows(report, f"{strategy} bf16 compute")


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
