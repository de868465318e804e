"""Handing the source rank's weights to every other rank, without any rank holding a second copy.

The source rank (global rank 0) holds the loaded, quantized, LoRA-wrapped model in host RAM;
every other rank holds the same tree on the meta device. These are the pieces each strategy
combines around `accelerator.prepare`: broadcast what every rank keeps whole (quantization
constants, buffers, a replicated base), allocate what a sharding library fills itself, and keep
tied weights one tensor throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn

from ..collectives import broadcast_object, broadcast_tensor_, comm_device, distributed, is_source_rank
from ..model.experts import Experts4bit


def quant_state_owners(model: nn.Module) -> list[nn.Module]:
    """Every module that holds a 4-bit quantization state, in module order: the 4-bit linears and the
    4-bit experts' parametrizations."""
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, Experts4bit))]


def _quant_state(owner: nn.Module) -> QuantState:
    return owner.weight.quant_state if isinstance(owner, bnb.nn.Linear4bit) else owner.quant_state


def _set_quant_state(owner: nn.Module, state: QuantState) -> None:
    owner.quant_state = state
    if isinstance(owner, bnb.nn.Linear4bit):
        owner.weight.quant_state = state


def _hide_quant_state(owner: nn.Module) -> None:
    """Drops the state where the state dict reads it (the linear's weight, the expert's parametrization)."""
    (owner.weight if isinstance(owner, bnb.nn.Linear4bit) else owner).quant_state = None


def broadcast_quant_states(model: nn.Module, device: torch.device) -> None:
    """Gives every rank the source rank's quantization constants, whole, on `device`.

    They are not parameters (bitsandbytes keeps them on the module and on the weight, or on an expert's
    parametrization), so no sharding library moves them; every rank needs all of them to dequantize its
    gathered layers. The source rank first sends their shapes, so the other ranks can receive them in place.
    """
    owners = quant_state_owners(model)
    source = is_source_rank()
    shapes = broadcast_object(
        [{k: (tuple(v.shape), v.dtype) for k, v in _quant_state(m).as_dict(packed=True).items()} for m in owners]
        if source
        else None
    )
    device_for_comm = comm_device(device)
    for owner, owner_shapes in zip(owners, shapes, strict=True):
        if source:
            packed = {k: v.to(device_for_comm) for k, v in _quant_state(owner).as_dict(packed=True).items()}
        else:
            packed = {
                k: torch.empty(shape, dtype=dtype, device=device_for_comm) for k, (shape, dtype) in owner_shapes.items()
            }
        if distributed():
            for key in sorted(packed):
                broadcast_tensor_(packed[key])
        _set_quant_state(owner, QuantState.from_dict(packed, device=device))


def broadcast_whole(model: nn.Module, device: torch.device) -> None:
    """Every rank gets the whole model (strategies that replicate the base: DDP, ZeRO-2)."""
    materialize_and_broadcast(shared_tensors(model), device)


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
        new = same_kind_of_parameter(self.tensor, data) if self.is_parameter else data
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
    device_for_comm = comm_device(device)
    for shared in tensors:
        tensor = shared.tensor
        if tensor.is_meta:
            data = torch.empty(tensor.shape, dtype=tensor.dtype, device=device_for_comm)
        else:
            data = tensor.data.to(device_for_comm)
        broadcast_tensor_(data)
        shared.replace(data.to(device))


def same_kind_of_parameter(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
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


@contextlib.contextmanager
def quant_states_hidden_from_state_dict(model: nn.Module):
    """bitsandbytes writes every 4-bit weight's quantization constants into `state_dict()`; a
    training checkpoint holds trainable state only. They are put back when the save ends."""
    hidden = [(owner, _quant_state(owner)) for owner in quant_state_owners(model)]
    for owner, _ in hidden:
        _hide_quant_state(owner)
    try:
        yield
    finally:
        for owner, state in hidden:
            _set_quant_state(owner, state)
