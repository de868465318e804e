"""`quant.compute_dtype: auto`: what each device computes in, and what the strategies then store and shard."""

import dataclasses
import os
import subprocess
import sys

import pytest

from launcher import strategies
from launcher.config import QuantConfig, load_config
from launcher.dtypes import resolve_compute_dtype
from launcher.memory.predict import resolve_quant
from launcher.preflight import compute_note


@pytest.mark.parametrize(
    ("requested", "mixed", "device", "native_bf16", "expected"),
    [
        ("auto", "no", "cuda", True, "bfloat16"),
        ("auto", "no", "cuda", False, "float16"),  # a GPU older than Ampere
        ("auto", "no", "cpu", True, "bfloat16"),  # AVX512-BF16 or AMX
        ("auto", "no", "cpu", False, "float32"),  # every bf16 matmul would be emulated
        ("auto", "bf16", "cpu", False, "bfloat16"),  # mixed precision: its autocast dtype, wherever it runs
        ("auto", "fp16", "cuda", True, "float16"),
        ("bfloat16", "no", "cpu", False, "bfloat16"),  # the user's choice stays as given
        ("float32", "no", "cuda", True, "float32"),
    ],
)
def test_auto_computes_in_what_the_device_runs_natively(requested, mixed, device, native_bf16, expected):
    assert resolve_compute_dtype(requested, mixed, device, native_bf16) == expected


@pytest.mark.parametrize("name", strategies.NAMES)
def test_fp32_compute_on_cpu_keeps_the_gpu_storage_layout_where_the_strategy_allows(name):
    strategy = strategies.get(name)
    got = strategies.resolve_quant(QuantConfig(), strategy, "float32")
    assert got.compute_dtype == "float32"
    # FSDP1 flattens the packed data with its bias, which bitsandbytes keeps in the compute dtype.
    assert got.storage_dtype == ("auto" if strategy.stores_4bit_as_compute_dtype else "bfloat16")
    # Asked for explicitly, fp32 compute stores as the strategy's own rule does; an explicit storage stays.
    assert strategies.resolve_quant(QuantConfig(compute_dtype="float32"), strategy, "float32").storage_dtype == "auto"
    stored = QuantConfig(storage_dtype="float32")
    assert strategies.resolve_quant(stored, strategy, "float32").storage_dtype == "float32"


def test_the_budget_takes_gpus_to_have_bf16():
    cfg = resolve_quant(load_config(None, []), strategies.get("fsdp2"), "no", "cuda")
    assert (cfg.quant.compute_dtype, cfg.quant.storage_dtype) == ("bfloat16", "auto")


def test_avx2_kernels_mean_no_native_bf16():
    """ATEN_CPU_CAPABILITY=avx2 makes torch run its AVX2 kernels, as on a CPU without AVX-512: no native bf16."""
    code = "from launcher.dtypes import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_start_up_says_what_auto_chose_and_why():
    asked = load_config(None, [("train.mixed_precision", "no")])
    fsdp2 = strategies.get("fsdp2")

    def resolved(compute: str):
        return dataclasses.replace(asked, quant=strategies.resolve_quant(asked.quant, fsdp2, compute))

    note = compute_note(asked, resolved("float32"))
    assert "compute in float32" in note and "no native bf16" in note and "stored as bfloat16, as on GPUs" in note
    native = compute_note(asked, resolved("bfloat16"))
    assert "compute in bfloat16" in native and "this CPU has native bf16" in native
    explicit = load_config(None, [("quant.compute_dtype", "float32")])
    assert compute_note(explicit, explicit) is None
