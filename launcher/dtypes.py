"""dtypes by name, and the dtype each kind of weight is kept in under a strategy (`DtypePolicy`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import DTYPES

DTYPE_BY_NAME = {name: getattr(torch, name) for name in DTYPES}


@dataclass(frozen=True)
class DtypePolicy:
    quant_storage: torch.dtype
    """dtype the packed 4-bit bytes are viewed as; a float dtype so every sharder treats it as a weight."""
    norm: torch.dtype
    dense: torch.dtype
    """Frozen unquantized weights the hidden states meet without a cast: embeddings, lm_head, MoE routers."""
    adapter: torch.dtype
    bias: torch.dtype
    """Biases of the 4-bit linears. bitsandbytes recasts a bias to the compute dtype inside every forward
    (`bias.data = ...`), which a sharded parameter must not see: they are kept in that dtype where they can be."""
    experts: torch.dtype
    """Fused 3D MoE expert weights kept 16-bit (quant.experts: 16bit); transformers casts the
    input to their dtype, so they can stay in the compute dtype."""

    def of(self, component: str) -> torch.dtype | None:
        """The dtype of a frozen or adapter weight by its budget component (None: packed 4-bit bytes)."""
        return {
            "norms": self.norm,
            "frozen_dense": self.dense,
            "lora": self.adapter,
            "biases": self.bias,
            "experts": self.experts,
        }.get(component)

    def cast_to(self, dtype: torch.dtype | None) -> DtypePolicy:
        """Every weight but the packed 4-bit bytes in `dtype` (what a mixed-precision cast of all parameters
        does); None: no cast."""
        if dtype is None:
            return self
        return dataclasses.replace(self, norm=dtype, dense=dtype, adapter=dtype, bias=dtype, experts=dtype)

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> DtypePolicy:
        """Every weight, the packed 4-bit bytes included, in one dtype."""
        return cls(*[dtype] * len(dataclasses.fields(cls)))


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_mixed_precision(
    requested: str, cuda: bool, launched: str | None = None, bf16_supported: bool = True
) -> str:
    """`train.mixed_precision` as a run uses it: "auto" is what `accelerate launch` asked for (`launched`)
    on CUDA, else bf16 where the GPU supports it and fp16 where not; on CPU no autocast."""
    if requested != "auto":
        return requested
    if not cuda:
        return "no"
    if launched and launched != "no":
        return launched
    return "bf16" if bf16_supported else "fp16"


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and torch runs its AVX512 kernels (which
    ATEN_CPU_CAPABILITY can lower): elsewhere every bf16 matmul is emulated."""
    capability = torch.backends.cpu.get_cpu_capability()
    has = [
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return capability.startswith("AVX512") and any(has)


def resolve_compute_dtype(requested: str, mixed_precision: str, device: str, native_bf16: bool) -> str:
    """`quant.compute_dtype` as a run uses it. "auto" is the autocast dtype under mixed precision; without it,
    bfloat16 where `device` ("cuda" or "cpu") computes it natively, else float16 on a GPU and float32 on a CPU
    (a CPU without AVX512-BF16 or AMX emulates every bf16 matmul, 3-9x slower than fp32)."""
    if requested != "auto":
        return requested
    if mixed_precision in AUTOCAST_DTYPE_NAMES:
        return AUTOCAST_DTYPE_NAMES[mixed_precision]
    if native_bf16:
        return "bfloat16"
    return "float16" if device == "cuda" else "float32"


GPU_LAYOUT_DTYPE = "bfloat16"
"""What the 4-bit data is stored as on the GPUs this launcher targets (their compute dtype)."""


def resolve_storage_dtype(requested: str, requested_compute: str, compute: str, follows_compute: bool) -> str:
    """`quant.storage_dtype` as a run uses it. "auto" stays auto (the strategy stores the packed data as the
    compute dtype) unless the compute dtype fell to float32 only because this CPU has no native bf16: then the
    packed data keeps the GPUs' bf16 layout, so what is sharded is what GPUs shard. `follows_compute`: the
    strategy must store it as the compute dtype (FSDP1: see its refusal)."""
    if requested != "auto" or follows_compute:
        return requested
    if requested_compute == "auto" and compute == "float32":
        return GPU_LAYOUT_DTYPE
    return requested
