"""dtypes by name, and the dtype each kind of weight is kept in under a strategy (`DtypePolicy`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DTYPE_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPES = tuple(DTYPE_BY_NAME)


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
    """Fused 3D MoE expert weights (bitsandbytes quantizes nn.Linear only); transformers casts the
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
MIXED_PRECISIONS = ("auto", "no", *AUTOCAST_DTYPES)


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
