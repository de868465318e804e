"""How tensors are laid out across ranks, in bytes: the helpers the strategies' byte-layout hooks share.

The memory budget asks each strategy, before any tensor exists, how many bytes of each parameter,
gradient and optimizer state a rank holds (padding included); these are the building blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..dtypes import DtypePolicy

ADAM_STATES = 2
"""AdamW keeps two moments per parameter element, in the parameter's dtype."""
MASTER_DTYPE = torch.float32
"""dtype of DeepSpeed's master copies and of the gradients its optimizer steps with."""
OPTIMIZER_STATE_COMPONENTS = ("gradients", "master_weights", "optimizer_states")


@dataclass(frozen=True)
class TensorSpec:
    """One parameter as the memory budget sees it before any rank holds it."""

    name: str
    component: str
    """Budget component it belongs to (launcher.memory.components.COMPONENTS)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool
    module: str
    """Path of the module that owns it."""
    layer: str
    """Path of the decoder layer that holds it, "" outside the layers (FSDP wraps each layer on its own)."""
    group: int = 0
    """The optimizer's parameter group of a trainable one (param_groups.py: LoRA+ puts B matrices in group 1)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def containing_layer(layers: list[str], module_name: str) -> str:
    """The decoder layer that holds `module_name`, "" outside the layers."""
    return next((layer for layer in layers if module_name.startswith(layer + ".")), "")


def parameter_specs(
    model: nn.Module, layers: list[str], component_of: Callable[[nn.Module, str, nn.Parameter], str]
) -> list[TensorSpec]:
    """Every parameter of `model` (a tied one once, where it first appears), in `named_parameters` order."""
    modules = dict(model.named_modules())
    specs = []
    for name, param in model.named_parameters():
        module_name, _, local = name.rpartition(".")
        specs.append(
            TensorSpec(
                name=name,
                component=component_of(modules[module_name], local, param),
                shape=tuple(param.shape),
                dtype=param.dtype,
                trainable=param.requires_grad,
                module=module_name,
                layer=containing_layer(layers, module_name),
            )
        )
    return specs


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(rows this rank holds, rows its storage has) when dim 0 is split like torch.chunk and every
    rank's part is padded to the first part's size (FSDP2's layout)."""
    per_rank = -(-rows // world)
    return max(0, min(per_rank, rows - rank * per_rank)), per_rank


def split_flat(
    pieces: list[tuple[str, int]], itemsize: int, align: int, pad_to: int, world: int, rank: int
) -> dict[str, int]:
    """Bytes per component that `rank` holds of one flat buffer built from `pieces` (component,
    elements): each piece starts at a multiple of `align` elements, the whole is padded to a multiple
    of `pad_to`, then cut into `world` equal parts. Gaps count as "shard_padding"."""
    spans, end = [], 0
    for component, numel in pieces:
        end += -end % align
        spans.append((component, end, end + numel))
        end += numel
    end += -end % pad_to
    part = -(-end // world)
    lo, hi = rank * part, (rank + 1) * part
    held = {"shard_padding": part * itemsize}
    for component, start, stop in spans:
        overlap = max(0, min(hi, stop) - max(lo, start)) * itemsize
        held[component] = held.get(component, 0) + overlap
        held["shard_padding"] -= overlap
    return held


def whole(tensors: list[TensorSpec]) -> dict[str, int]:
    """Bytes per component of `tensors` held whole."""
    held: dict[str, int] = {}
    for t in tensors:
        held[t.component] = held.get(t.component, 0) + t.numel * t.itemsize
    return held


def add(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value
    return total


def bytes_as(t: TensorSpec, policy: DtypePolicy) -> int:
    """Bytes of `t` when held in `policy`'s dtypes (packed 4-bit bytes keep their size in any view)."""
    dtype = policy.of(t.component)
    return t.numel * (dtype.itemsize if dtype else t.itemsize)


def units(tensors: list[TensorSpec], unit_of: Callable[[TensorSpec], str]) -> dict[str, list[TensorSpec]]:
    grouped: dict[str, list[TensorSpec]] = {}
    for t in tensors:
        grouped.setdefault(unit_of(t), []).append(t)
    return grouped


def root_and_two_layers(tensors: list[TensorSpec], compute: DtypePolicy) -> int:
    """What FSDP keeps gathered: the root unit (embeddings, final norm, lm_head) from forward through
    backward, the layer that runs and the next one, prefetched; all in their compute dtypes."""
    grouped = units(tensors, lambda t: t.layer)
    full = {unit: sum(bytes_as(t, compute) for t in members) for unit, members in grouped.items()}
    root = full.pop("", 0)
    return root + 2 * max(full.values(), default=0)


def by_group(trainable: list[TensorSpec]) -> list[list[TensorSpec]]:
    """The trainable parameters of each optimizer group, in group order."""
    return [[t for t in trainable if t.group == g] for g in sorted({t.group for t in trainable})]


def fp32_partition(numel: int) -> dict[str, int]:
    """What DeepSpeed's optimizer holds for a partition of `numel` trainable elements: fp32 gradients,
    master copies and AdamW moments."""
    partition = numel * MASTER_DTYPE.itemsize
    return {"gradients": partition, "master_weights": partition, "optimizer_states": ADAM_STATES * partition}
