"""Running a model's forward on fake tensors: real shapes, dtypes and device types, no data and no memory.

Used before launch to see what each linear layer does (model/targets.py: routers and gates, layers that never run)
and by the memory budget to record what a micro batch saves for backward (memory/trace.py). The model may be the
meta skeleton or a loaded one: its parameters and buffers are swapped for fake tensors of their shapes for the run.

What cannot run on fake tensors is stood in for by something that does what it does as far as shapes, dtypes,
autograd and saved tensors go:
  * a 4-bit linear multiplies through an autograd function that saves nothing, as bitsandbytes' `MatMul4Bit`
    (it keeps the packed weight on its context, not as a saved tensor), with `Linear4bit.forward`'s casts;
  * a 4-bit expert's dequantization gives an empty weight of its shape and dtype, and so does a 4-bit linear's
    for DoRA's weight norm;
  * the experts' grouped matmul, whose fake kernel takes bf16 only, saves what its autograd formula saves;
  * transformers builds the causal mask as in a real run on one sample per row (it would build one where none is
    needed if it took the fake tensors for a graph being traced), and the padding masks some families make of their
    input (all ones, where nothing is padded) are taken for what they are without reading them.

Only one decoder layer of each kind runs (layers whose module tree, classes, settings and per-layer config entries
are equal are one kind): the decoder's layer list, the config's per-layer lists and the layers' indices are cut to
one representative per kind for the run and restored after.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import bitsandbytes as bnb
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils.stateless import _reparametrize_module

from ..dtypes import DtypePolicy
from ..quiet import quiet_logger
from . import experts
from .anatomy import frozen_component
from .experts import Experts4bit, is_packed_expert

Patch = tuple[object, str, object]
"""(owner, attribute, value) set for the length of a fake run."""


def layer_kinds(model: nn.Module, layers: list[str]) -> list[tuple]:
    """A key per decoder layer: equal for layers that save the same (same module tree and classes, same per-layer
    config entries, same settings on their modules)."""
    config = _text_config(model)
    per_layer = _per_layer_lists(config, len(layers))
    modules = dict(model.named_modules())
    kinds = []
    for index, path in enumerate(layers):
        layer = modules[path]
        tree = tuple((name, type(m).__name__, _settings(m)) for name, m in layer.named_modules())
        kinds.append((tree, tuple(values[index] for values in per_layer.values())))
    return kinds


def _settings(module: nn.Module) -> tuple:
    """A module's plain settings (sliding window, attention type, ...), not its index."""
    return tuple(
        sorted(
            (k, v)
            for k, v in vars(module).items()
            if not k.startswith("_") and "idx" not in k and "index" not in k and isinstance(v, (bool, int, float, str))
        )
    )


def _text_config(model: nn.Module):
    return model.config.get_text_config()


def _per_layer_lists(config, count: int) -> dict[str, list]:
    """The config's entries that hold one value per decoder layer (layer_types, mlp_layer_types, ...)."""
    return {
        key: value
        for key, value in vars(config).items()
        if isinstance(value, (list, tuple)) and len(value) == count and count > 1 and not key.startswith("_")
    }


def kernel_device(device: str) -> str:
    """The device whose kernels the trace runs: CUDA's where this torch has CUDA (fake CUDA tensors need it), else
    the CPU's, with CUDA's dropout (its bool mask) standing in where the run is on CUDA."""
    return "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"


def fake_parameters(model: nn.Module, compute: DtypePolicy | None, device: str) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` as an empty tensor of the dtype it has inside forward (`compute`'s, or
    its own), on `device` (inside the fake mode: no memory)."""

    def component_of(module, name, param):
        return "lora" if param.requires_grad else frozen_component(module, name, param)

    modules = dict(model.named_modules())
    fakes = {}
    for name, param in model.named_parameters():
        owner, _, local = name.rpartition(".")
        dtype = (compute.of(component_of(modules[owner], local, param)) if compute else None) or param.dtype
        if not param.is_floating_point() or _is_packed(modules[owner]):
            dtype = param.dtype
        fakes[name] = torch.empty(param.shape, dtype=dtype, device=device, requires_grad=param.requires_grad)
    for name, buffer in model.named_buffers():
        fakes[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
    return fakes


def _is_packed(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit) or is_packed_expert(module)


def _layer_list(model: nn.Module, layers: list[str]) -> nn.ModuleList | None:
    """The one list that holds all the decoder layers, if there is one."""
    parents = {path.rpartition(".")[0] for path in layers}
    parent = model.get_submodule(parents.pop()) if len(parents) == 1 else None
    return parent if isinstance(parent, nn.ModuleList) and len(parent) == len(layers) else None


def representatives(model: nn.Module, layers: list[str], kinds: list) -> list[int]:
    """The layers a fake run keeps: the first of each kind, or every layer where they are not in one list (HRM's
    two levels) and cannot be cut."""
    if _layer_list(model, layers) is None:
        return list(range(len(layers)))
    return [kinds.index(kind) for kind in dict.fromkeys(kinds)]


T = TypeVar("T")


def cut_or_whole(model: nn.Module, layers: list[str], kinds: list, run: Callable[[list[int]], T]) -> T:
    """`run(kept)` on the model cut to the first layer of each kind, or on every layer where the cut model does not
    run (weights outside the layers sized by their count: Gemma-3n's per-layer inputs)."""
    kept = representatives(model, layers, kinds)
    try:
        return run(kept)
    except Exception:
        if len(kept) == len(layers):
            raise
        return run(list(range(len(layers))))


@contextlib.contextmanager
def only_layers(model: nn.Module, layers: list[str], kept: list[int]) -> Iterator[list[nn.Module]]:
    """The decoder's layer list cut to `kept` (indices into `layers`, from `representatives`), with the config's
    per-layer lists, its layer count and each kept layer's index cut to match; all restored on exit."""
    modules = dict(model.named_modules())
    parent = _layer_list(model, layers)
    if parent is None or len(kept) == len(layers):
        yield [modules[layers[i]] for i in kept]
        return
    config = _text_config(model)
    lists = _per_layer_lists(config, len(layers))
    count_key = next(
        (k for k in ("num_hidden_layers", "n_layer", "num_layers") if getattr(config, k, None) == len(layers)), None
    )
    every = list(parent)
    kept_layers = [every[i] for i in kept]
    indices = [
        (m, k, getattr(m, k)) for layer in kept_layers for m in layer.modules() for k in ("layer_idx",) if hasattr(m, k)
    ]
    try:
        parent._modules.clear()
        for position, layer in enumerate(kept_layers):
            parent._modules[str(position)] = layer
        for key, values in lists.items():
            object.__setattr__(config, key, type(values)(values[i] for i in kept))
        if count_key:
            object.__setattr__(config, count_key, len(kept))
        for module, key, original in indices:
            setattr(module, key, kept.index(original) if original in kept else original)
        yield kept_layers
    finally:
        parent._modules.clear()
        for position, layer in enumerate(every):
            parent._modules[str(position)] = layer
        for key, values in lists.items():
            object.__setattr__(config, key, values)
        if count_key:
            object.__setattr__(config, count_key, len(layers))
        for module, key, original in indices:
            setattr(module, key, original)


class _Frozen4bitMatmul(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul as far as memory goes: the product's shape, nothing saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_features: int, bias):
        ctx.shape = x.shape
        return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device), None, None


def _linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    return _Frozen4bitMatmul.apply(x, self.out_features, self.bias).to(inp_dtype)


def _dequantized_weight(module: nn.Module, dtype: torch.dtype | None) -> torch.Tensor:
    """What DoRA's weight norm reads of a 4-bit linear: the weight dequantized, in the dtype it was quantized from."""
    if not isinstance(module, bnb.nn.Linear4bit):
        return module.weight
    dtype = dtype or module.compute_dtype or torch.float32
    return torch.empty((module.out_features, module.in_features), dtype=dtype, device=module.weight.device)


class Storages:
    """Storages noted by address while they live: a storage freed during the run leaves, and a new one that the
    allocator puts at its address is another storage (addresses alone mistook one for the other, so that what a
    trace counted depended on the allocator)."""

    def __init__(self):
        self._noted: dict[int, tuple[StorageWeakRef, object]] = {}

    def note(self, tensor: torch.Tensor, value: object = None) -> None:
        storage = tensor.untyped_storage()
        self._noted[storage._cdata] = (StorageWeakRef(storage), value)

    def get(self, tensor: torch.Tensor, default: object = None) -> object:
        noted = self._noted.get(tensor.untyped_storage()._cdata)
        return default if noted is None or noted[0].expired() else noted[1]

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return self.get(tensor, self) is not self

    def clear(self) -> None:
        self._noted.clear()


DEQUANTIZED = Storages()
"""Storages of the dequantized 4-bit experts made during a trace: the budget counts one layer's of them as
`experts_dequantized`, not again in `recompute`."""


def _experts_forward(self, quantized_param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    weight = torch.empty(self.shape, dtype=dtype or self.dtype, device=quantized_param.device)
    DEQUANTIZED.note(weight)
    return weight


class _GroupedMatmul(torch.autograd.Function):
    """torch's grouped matmul (MoE experts), whose fake kernel takes bf16 only (a CUDA limit the CPU kernel that
    real fp32 runs use does not have): its output's shape, and each operand saved where the other needs a gradient, as its autograd formula."""

    @staticmethod
    def forward(ctx, mat_a, mat_b, offs):
        # Each operand is kept for the other's gradient only.
        a_grad, b_grad = ctx.needs_input_grad[:2]
        ctx.save_for_backward(mat_a if b_grad else None, mat_b if a_grad else None, offs if a_grad or b_grad else None)
        ctx.shapes = (mat_a.shape, mat_b.shape)
        return mat_a.new_empty((mat_a.shape[0], mat_b.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(ctx.shapes[0]), grad.new_empty(ctx.shapes[1]), None


def _grouped_mm(mat_a, mat_b, *, offs=None, bias=None, out_dtype=None):
    return _GroupedMatmul.apply(mat_a, mat_b, offs)


@contextlib.contextmanager
def patched(patches: list[Patch]) -> Iterator[None]:
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def stand_ins(experts_dtype: torch.dtype | None = None) -> list[Patch]:
    """What every fake run needs (see the module docstring); 4-bit experts dequantize to `experts_dtype`, if given."""
    import peft.tuners.lora.dora as dora
    import transformers.masking_utils as masking

    read_as = [(experts, "experts_dtype", lambda module: experts_dtype)] if experts_dtype else []
    return [
        *read_as,
        (dora, "dequantize_module_weight", lambda module: _dequantized_weight(module, experts_dtype)),
        (bnb.nn.Linear4bit, "forward", _linear4bit_forward),
        (Experts4bit, "forward", lambda self, packed: _experts_forward(self, packed, experts_dtype)),
        (torch.nn.functional, "grouped_mm", _grouped_mm),
        (masking, "is_tracing", lambda *args, **kwargs: False),
        (masking, "find_packed_sequence_indices", lambda position_ids: None),
        # A fake run has no padding: the padding masks a family makes of its input (BART-style decoders) are all ones.
        (masking, "fast_all", lambda tensor: True),
    ]


def unchecked(model: nn.Module) -> list[Patch]:
    """transformers' value checks (`torch_compilable_check`: a vision-language model's image tokens against its image
    features) read tensor data, which fake tensors do not have: off in the model's own modules for a fake run (the
    fake image inputs match their tokens by construction, memory/trace.py)."""
    modules = {sys.modules[type(module).__module__] for module in model.modules()}
    return [
        (m, "torch_compilable_check", lambda *args, **kwargs: None)
        for m in modules
        if hasattr(m, "torch_compilable_check")
    ]


@contextlib.contextmanager
def fake_run(
    model: nn.Module,
    layers: list[str],
    kept: list[int],
    device: str,
    compute: DtypePolicy | None = None,
    patches: tuple[Patch, ...] = (),
    uniform: torch.dtype | None = None,
) -> Iterator[tuple[list[nn.Module], dict[str, torch.Tensor]]]:
    """Inside: `model` cut to the decoder layers `kept` (indices into `layers`), its parameters and buffers fake
    tensors on `device` (in `compute`'s dtypes, or their own; every float one and the dequantized 4-bit experts in
    `uniform`, if given), under the fake mode; yields the kept layers and the
    fake parameters. Call the model inside."""
    with (
        warnings.catch_warnings(),
        # torch logs a traceback for every fake kernel that fails before raising; the caller reports the error.
        quiet_logger("torch._subclasses.fake_tensor"),
        only_layers(model, layers, kept) as kept_layers,
    ):
        warnings.simplefilter("ignore")
        DEQUANTIZED.clear()
        with FakeTensorMode(allow_non_fake_inputs=False), patched([*stand_ins(uniform), *unchecked(model), *patches]):
            fakes = fake_parameters(
                model, DtypePolicy.uniform(uniform) if uniform else compute, device
            )  # of the kept layers only, the others are out
            with _reparametrize_module(model, fakes, tie_weights=True, strict=False):
                yield kept_layers, fakes
