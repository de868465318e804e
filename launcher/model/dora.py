"""DoRA on a 4-bit base built on every rank: peft computes each magnitude vector from the dequantized weight, which
only the source rank holds.

peft's `DoraLinearLayer.update_layer` deep-copies the 4-bit linear and dequantizes it to take the weight's norm per
output feature. On the ranks that build the model on meta (and in the memory budget's meta skeleton) there are no
bytes to dequantize: there the magnitude is made on meta in its shape, and the source rank's values reach every
rank with the other adapter weights (strategies.handoff), as LoRA's initialization does.

Two more of peft's DoRA steps are replaced (`fix_peft_dora`), both reads of a weight outside its module's forward:
  * `get_lora_weight` sizes its identity matrix by `lora_A.weight.shape[1]`, where FSDP1 holds only a flat shard
    of lora_A (IndexError on every rank): it is sized by `lora_A.in_features` here;
  * the weight norm dequantizes the 4-bit base weight inside the LoRA layer's forward but outside the 4-bit
    linear's, where ZeRO-3 holds only this rank's partition of it: a partitioned weight is gathered for the read.
    (peft's `dequantize_module_weight` also assigns `module.weight = module.weight.to("cpu")` on a CPU, which
    replaced ZeRO-3's partitioned parameter by a plain one; this read assigns nothing.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn


def fix_peft_dora() -> None:
    """peft's DoRA steps that read weights outside their modules' forward, replaced (see the module docstring)."""
    import peft.tuners.lora.dora as dora

    if getattr(dora.DoraLinearLayer, "_qlaunch_fixed", False):
        return

    @dora.cache_decorator("lora-weight")
    def get_lora_weight(self, lora_A, lora_B, adapter_name=None):
        x_eye = torch.eye(lora_A.in_features, device=lora_A.weight.device, dtype=lora_A.weight.dtype)
        return lora_B(lora_A(x_eye)).T

    dora.DoraLinearLayer.get_lora_weight = get_lora_weight
    dora.dequantize_module_weight = functools.partial(dequantized_weight, dora.dequantize_module_weight)
    dora.DoraLinearLayer._qlaunch_fixed = True


def dequantized_weight(peft_dequantize, module: nn.Module) -> torch.Tensor:
    """A 4-bit linear's weight dequantized, gathered first where ZeRO-3 partitions it; other layers as peft reads them."""
    import bitsandbytes as bnb

    if not isinstance(module, bnb.nn.Linear4bit):
        return peft_dequantize(module)
    weight = module.weight
    with _gathered(weight):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def _gathered(weight: torch.Tensor):
    """Gathers a ZeRO-3 parameter that is partitioned now (one its module's forward still holds stays as it is)."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


@contextlib.contextmanager
def magnitudes_on_meta() -> Iterator[None]:
    """Inside, a DoRA magnitude of a linear whose weight is on meta is made on meta (peft's computation elsewhere)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    update_layer = DoraLinearLayer.update_layer

    def update_meta_aware(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        if not base_layer.weight.is_meta:
            return update_layer(
                self, base_layer=base_layer, lora_A=lora_A, lora_B=lora_B, scaling=scaling, place_on_cpu=place_on_cpu
            )
        self.weight = nn.Parameter(torch.empty(base_layer.out_features, dtype=lora_A.dtype, device="meta"))

    DoraLinearLayer.update_layer = update_meta_aware
    try:
        yield
    finally:
        DoraLinearLayer.update_layer = update_layer
