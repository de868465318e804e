"""Moving the source rank's weights to every other rank, without any rank holding a second copy.

The source rank (global rank 0) holds the loaded, quantized, LoRA-wrapped model in host RAM;
every other rank holds the same tree on the meta device. These helpers are the pieces the
strategies combine (see `launcher.strategies`): broadcast what every rank keeps whole, scatter
what a rank keeps only a shard of.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from bitsandbytes.functional import QuantState
from torch import nn

SOURCE_RANK = 0


def is_source_rank() -> bool:
    if dist.is_initialized():
        return dist.get_rank() == SOURCE_RANK
    return int(os.environ.get("RANK", "0")) == SOURCE_RANK


def broadcast_object(obj):
    """Sends a small picklable object from the source rank to all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=SOURCE_RANK)
    return box[0]


def _comm_device(device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    if not dist.is_initialized() or dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def broadcast_tensor_(tensor: torch.Tensor) -> None:
    """In-place broadcast from the source rank, bit for bit (as bytes, so any dtype travels)."""
    flat = tensor.view(-1)
    dist.broadcast(flat.view(torch.uint8) if flat.numel() else flat, src=SOURCE_RANK)


def broadcast_quant_states(model: nn.Module, device: torch.device) -> None:
    """Gives every rank the source rank's quantization constants, whole, on `device`.

    They are not parameters (bitsandbytes keeps them on the module and on the weight), so no
    sharding library moves them; every rank needs all of them to dequantize its gathered layers.
    """
    source = is_source_rank()
    comm_device = _comm_device(device)
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if source:
            state = module.weight.quant_state
            packed = {k: v.to(comm_device) for k, v in state.as_dict(packed=True).items()}
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in packed.items()}
        else:
            shapes = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            if not source:
                shapes = module._launcher_quant_state_shapes
                packed = {k: torch.empty(shape, dtype=dtype, device=comm_device) for k, (shape, dtype) in shapes.items()}
            for key in sorted(packed):
                broadcast_tensor_(packed[key])
        state = QuantState.from_dict(packed, device=device)
        module.quant_state = state
        module.weight.quant_state = state


@dataclass
class SharedTensor:
    """One parameter or buffer and every (module, local name) that holds it: a tied weight (an
    embedding reused as the output layer) has several owners and must stay one tensor."""

    tensor: torch.Tensor
    owners: list[tuple[nn.Module, str]]

    @property
    def is_parameter(self) -> bool:
        module, name = self.owners[0]
        return name in module._parameters

    def replace(self, data: torch.Tensor) -> None:
        """Installs `data` (as a parameter of the same kind, for parameters) at every owner."""
        new = _same_kind_of_parameter(self.tensor, data) if self.is_parameter else data
        for module, name in self.owners:
            (module._parameters if self.is_parameter else module._buffers)[name] = new
        self.tensor = new


def shared_tensors(model: nn.Module, buffers_only: bool = False) -> list[SharedTensor]:
    """Every parameter and buffer of `model` once, with all its owners, in module order."""
    found: dict[int, SharedTensor] = {}
    for module in model.modules():
        items = [] if buffers_only else list(module._parameters.items())
        items += list(module._buffers.items())
        for name, tensor in items:
            if tensor is None:
                continue
            if id(tensor) in found:
                found[id(tensor)].owners.append((module, name))
            else:
                found[id(tensor)] = SharedTensor(tensor, [(module, name)])
    return list(found.values())


def materialize_and_broadcast(tensors: Iterable[SharedTensor], device: torch.device) -> None:
    """Gives every rank a full copy of each tensor (parameter or buffer), replacing meta storage."""
    comm_device = _comm_device(device)
    for shared in tensors:
        tensor = shared.tensor
        if tensor.is_meta:
            data = torch.empty(tensor.shape, dtype=tensor.dtype, device=comm_device)
        else:
            data = tensor.data.to(comm_device)
        broadcast_tensor_(data)
        shared.replace(data.to(device))


def _same_kind_of_parameter(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """A new parameter holding `data`, keeping a 4-bit weight's bitsandbytes attributes."""
    if isinstance(old, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_state=old.quant_state,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=old.module,
            bnb_quantized=old.bnb_quantized,
        )
    return nn.Parameter(data, requires_grad=old.requires_grad)


def materialize_empty(params: Iterable[SharedTensor], device: torch.device) -> None:
    """Replaces meta parameters with uninitialized ones on `device` (values come later), at every owner."""
    for shared in params:
        if shared.tensor.is_meta:
            shared.replace(torch.empty(shared.tensor.shape, dtype=shared.tensor.dtype, device=device))


def scatter_rows_(local: torch.Tensor, full: torch.Tensor | None, full_rows: int) -> None:
    """Fills this rank's dim-0 chunk `local` (torch.chunk layout, as FSDP2 shards) from the source rank's `full`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows_per_rank = -(-full_rows // world)
    row_shape = local.shape[1:]
    comm_device = _comm_device(local.device)
    received = torch.empty((rows_per_rank, *row_shape), dtype=local.dtype, device=comm_device)
    chunks = None
    if rank == SOURCE_RANK:
        chunks = []
        for r in range(world):
            piece = full[r * rows_per_rank : (r + 1) * rows_per_rank].to(comm_device)
            padded = torch.zeros((rows_per_rank, *row_shape), dtype=local.dtype, device=comm_device)
            padded[: piece.shape[0]] = piece
            chunks.append(padded.view(-1).view(torch.uint8))
    dist.scatter(received.view(-1).view(torch.uint8), chunks, src=SOURCE_RANK)
    with torch.no_grad():
        local.copy_(received[: local.shape[0]].to(local.device))


@contextlib.contextmanager
def quant_states_hidden_from_state_dict(model: nn.Module):
    """bitsandbytes writes every 4-bit weight's quantization constants into `state_dict()`; a
    training checkpoint holds trainable state only. The constants stay on the module (bitsandbytes
    restores them onto the weight at the next forward), so hiding them during a save is safe."""
    hidden = []
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_state", None) is not None:
            hidden.append((module.weight, module.weight.quant_state))
            module.weight.quant_state = None
    try:
        yield
    finally:
        for weight, state in hidden:
            weight.quant_state = state
