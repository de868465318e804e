"""MoE experts in 4-bit: the fused 3D expert parameters transformers 5 builds (`gate_up_proj`, `down_proj`
and the like) stored as packed NF4/FP4 bytes and dequantized whenever the model reads them.

bitsandbytes quantizes `nn.Linear` only through its quantizer, but it ships a parametrization for any
parameter (`bitsandbytes.nn.parametrize`): the module keeps the packed bytes as
`parametrizations.<name>.original` and every read of `<name>` returns `dequantize_4bit(packed, state)`,
cached for the duration of the owning module's forward (hooks bitsandbytes registers). The model's own
forward is untouched, and peft's `target_parameters` stacks its LoRA parametrization on top.

The packed bytes are stored as `DtypePolicy.quant_storage`, a float dtype like the 4-bit linears' data,
so every sharder splits and casts them without touching the bits. The source rank quantizes each expert
parameter as transformers sets it while loading, on its quantizing device, so no more than one 16-bit
expert parameter exists at a time; the other ranks and the memory budget install the same
parametrization on meta from an `ExpertSpec`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import bitsandbytes.functional as bnb_functional
import torch
import torch.nn.utils.parametrize as parametrize
from bitsandbytes.nn.parametrize import (
    Bnb4bitParametrization,
    _disable_parametrization_cache,
    _enable_parametrization_cache,
)
from torch import nn

from ..config import QuantConfig

BLOCKSIZE = 64
"""bitsandbytes' default 4-bit block size, as its linears use it."""


@dataclass(frozen=True)
class ExpertSpec:
    """What a rank needs to install one 4-bit expert parameter on meta."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    """dtype it was quantized from, which dequantizing gives back."""
    packed_shape: tuple[int, ...]


def packed_shape(numel: int, storage: torch.dtype) -> tuple[int, int]:
    """bitsandbytes packs two 4-bit values per byte into a (bytes / itemsize, 1) tensor of `storage`."""
    return ((numel + 1) // (storage.itemsize * 2), 1)


def is_expert_parameter(module: nn.Module, name: str, param: torch.Tensor) -> bool:
    """A fused MoE expert weight: a floating 3D parameter (experts x out x in) held directly by its module, which
    is no convolution (a Mamba or short-convolution layer's weight is 3D too: channels x 1 x kernel)."""
    return (
        param.dim() == 3
        and param.is_floating_point()
        and not isinstance(module, nn.modules.conv._ConvNd)
        and not parametrize.is_parametrized(module, name)
    )


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module path, module, parameter name) of every unquantized expert parameter, in module order."""
    return [
        (path, module, name)
        for path, module in model.named_modules()
        for name, param in list(module._parameters.items())
        if param is not None and is_expert_parameter(module, name, param)
    ]


class Experts4bit(Bnb4bitParametrization):
    """bitsandbytes' dequantizing parametrization, which also answers on meta (peft reads an adapted
    parameter's shape on every rank, and the ranks without weights hold no quantization state)."""

    def __init__(self, quant_state: bnb_functional.QuantState | None, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__(quant_state)
        self.shape, self.dtype = shape, dtype

    def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
        if quantized_param.is_meta:
            return torch.empty(self.shape, dtype=self.dtype, device="meta")
        return super().forward(quantized_param)


def parametrization_of(module: nn.Module, name: str) -> Experts4bit | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, Experts4bit)), None)


def quantized_experts(model: nn.Module) -> dict[str, tuple[nn.Module, str, Experts4bit]]:
    """`<module path>.<name>` -> (module, name, its 4-bit parametrization) for every 4-bit expert parameter."""
    found = {}
    for path, module in model.named_modules():
        for name in list(getattr(module, "parametrizations", {}) or {}):
            state = parametrization_of(module, name)
            if state is not None:
                found[f"{path}.{name}" if path else name] = (module, name, state)
    return found


def is_packed_expert(module: nn.Module) -> bool:
    """`module` is the ParametrizationList that holds a 4-bit expert's packed bytes as `original`."""
    return isinstance(module, parametrize.ParametrizationList) and any(isinstance(p, Experts4bit) for p in module)


def install_packed(module: nn.Module, name: str, packed: torch.Tensor, state, spec: ExpertSpec) -> None:
    """`module.<name>` becomes `packed` (4-bit bytes, quantization state `state`) read through the dequantizing parametrization."""
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(packed, requires_grad=False))
    parametrize.register_parametrization(module, name, Experts4bit(state, spec.shape, spec.dtype), unsafe=True)
    if not getattr(module, "_qlaunch_cache_hooks", False):
        # bitsandbytes' cache hooks, once per module (they count up and down), however many parameters it
        # has. Not its state-dict hook, which names the packed bytes `<name>` and adds the constants as
        # `<name>.absmax` and the like: torch.distributed.checkpoint resolves every key by attribute, and
        # reading `<name>` dequantizes. Checkpoints hold the adapter only.
        module.register_forward_pre_hook(_enable_parametrization_cache)
        module.register_forward_hook(_disable_parametrization_cache, always_call=True)
        module._qlaunch_cache_hooks = True


def quantize_parameter(
    module: nn.Module, name: str, quant: QuantConfig, storage: torch.dtype, device: torch.device
) -> None:
    """Replaces `module.<name>` by its packed 4-bit bytes, quantized on `device` and kept where the weight was."""
    weight = getattr(module, name).detach()
    home = weight.device
    packed, state = bnb_functional.quantize_4bit(
        weight.to(device),
        blocksize=BLOCKSIZE,
        compress_statistics=quant.double_quant,
        quant_type=quant.type,
        quant_storage=storage,
    )
    if packed.device != home:
        packed = packed.to(home)
        state.to(home)
    install_packed(module, name, packed, state, ExpertSpec(tuple(weight.shape), weight.dtype, tuple(packed.shape)))


def install_meta(module: nn.Module, name: str, spec: ExpertSpec, storage: torch.dtype) -> None:
    """The parametrization of one 4-bit expert on meta; the quantization state arrives with the others'
    (strategies.handoff.broadcast_quant_states)."""
    install_packed(module, name, torch.empty(spec.packed_shape, dtype=storage, device="meta"), None, spec)


def expert_specs(model: nn.Module, storage: torch.dtype, planned: bool) -> dict[str, ExpertSpec]:
    """What the other ranks need to rebuild `model`'s 4-bit experts on meta: those quantized already and,
    `planned`, those still unquantized (the memory budget's meta model), as they would be quantized."""
    specs = {
        key: ExpertSpec(state.shape, state.dtype, tuple(module.parametrizations[name].original.shape))
        for key, (module, name, state) in quantized_experts(model).items()
    }
    if planned:
        for path, module, name in expert_parameters(model):
            param = module._parameters[name]
            specs[f"{path}.{name}"] = ExpertSpec(tuple(param.shape), param.dtype, packed_shape(param.numel(), storage))
    return dict(sorted(specs.items()))


def experts_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype `module`'s expert parameters read as (dequantized, for 4-bit ones), None if it holds none."""
    for name in getattr(module, "parametrizations", None) or {}:
        state = parametrization_of(module, name)
        if state is not None:
            return state.dtype
    return next(
        (p.dtype for n, p in module._parameters.items() if p is not None and is_expert_parameter(module, n, p)), None
    )


def _inputs_in_experts_dtype(module, args, kwargs):
    dtype = experts_dtype(module)  # looked up at each call: a fake run reads its experts in another dtype

    def cast(value):
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    module._qlaunch_input_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    return tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}


def _output_back(module, args, kwargs, output):
    back = module.__dict__.pop("_qlaunch_input_dtype", None)
    if back is not None and torch.is_tensor(output) and output.is_floating_point():
        return output.to(back)
    return output


def casts_itself(module: nn.Module) -> bool:
    """The experts dispatch through transformers' experts interface (`use_experts_implementation`, which gives the
    class `_apply_gate`): its grouped matmul casts the hidden states to the experts' dtype and accumulates the
    routed sum in theirs. 72 of transformers 5.25's 74 experts classes do."""
    return hasattr(type(module), "_apply_gate")


def cast_at_experts(model: nn.Module) -> None:
    """Experts that cast nothing themselves (Llama-4's multiply with `torch.bmm`) get the hidden states in their
    experts' dtype and give their output back in the hidden states' own, as transformers' grouped matmul does: with
    the norms in float32 and no autocast they met float32 hidden states with 16-bit experts."""
    for module in model.modules():
        if casts_itself(module) or getattr(module, "_qlaunch_casts", False):
            continue
        if experts_dtype(module) is not None:
            module.register_forward_pre_hook(_inputs_in_experts_dtype, with_kwargs=True)
            module.register_forward_hook(_output_back, with_kwargs=True, always_call=True)
            module._qlaunch_casts = True


def sort_expert_parameters(model: nn.Module) -> None:
    """Each module's 16-bit expert parameters in name order, as `sort_parametrizations` keeps the 4-bit ones:
    peft nests one wrapper per adapted parameter, in the order it meets them (a module's parameter order
    for plain parameters, name order for parametrized ones), and an adapter reloads only onto the same nesting
    (`qlaunch merge` puts a 4-bit-trained adapter onto 16-bit experts)."""
    for _, module, _ in expert_parameters(model):
        if list(module._parameters) != sorted(module._parameters):
            items = sorted(module._parameters.items())
            module._parameters.clear()
            module._parameters.update(items)


def sort_parametrizations(model: nn.Module) -> None:
    """Each module's 4-bit experts in name order, whatever order the checkpoint set them in: the meta
    models of the other ranks and of the budget install them in that order, and parameter order matters
    to every sharder."""
    for module in model.modules():
        held = getattr(module, "parametrizations", None)
        if isinstance(held, nn.ModuleDict) and list(held) != sorted(held):
            items = sorted(held.items())
            held.clear()
            held.update(items)


@contextlib.contextmanager
def quantizing_experts_while_loading(
    quant: QuantConfig, storage: torch.dtype, device: torch.device, enabled: bool = True
) -> Iterator[list]:
    """Inside, every expert parameter transformers' loader sets is quantized at once (on `device`), so the
    whole set of 16-bit experts never exists; yields the list of quantized `<module path>.<name>`."""
    import transformers.core_model_loading as loading

    if not enabled:
        yield []
        return

    original = loading.set_param_for_module
    done: list[str] = []

    def set_param_for_module(model, target_name, param_value, loading_info, hf_quantizer):
        original(model, target_name, param_value, loading_info, hf_quantizer)
        path, _, name = target_name.rpartition(".")
        module = model.get_submodule(path) if path else model
        param = module._parameters.get(name)
        if param is not None and not param.is_meta and is_expert_parameter(module, name, param):
            quantize_parameter(module, name, quant, storage, device)
            done.append(target_name)

    loading.set_param_for_module = set_param_for_module
    try:
        yield done
    finally:
        loading.set_param_for_module = original


def fix_peft_stacked_parametrizations() -> None:
    """Two faults of peft (0.21) when its LoRA parametrization is stacked on an already parametrized parameter
    (a 4-bit expert), both fixed here for `ParamWrapper` only:
      * it removes the stacked proxy by looking for `_LoraParameterProxy`, but a single adapter on 3D experts
        uses `_LoraFactorsProxy`: that proxy stayed after every forward, one more each time (the checkpointed
        recompute then saw other tensors and failed). The last LoRA proxy of either kind is removed.
      * registering on a parametrized parameter evaluates it once (torch's shape and dtype check); the second
        of two nested wrappers registers inside the first one's `parametrize.cached()`, so that evaluation,
        without its proxy, was cached and read by the forward: the inner parameter's adapter never took part
        (no gradient). The stale entry is dropped once the proxy is in place.
    """
    from peft.tuners.lora.layer import ParamWrapper, _LoraFactorsProxy, _LoraParameterProxy

    if getattr(ParamWrapper, "_qlaunch_fixed", False):
        return
    activate = ParamWrapper._activate_lora

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        with activate(self, active_adapters):
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    def _remove_parametrizations(self) -> None:
        base = self.get_base_layer()
        stack = base.parametrizations[self.parameter_name]
        if len(stack) == 1:
            parametrize.remove_parametrizations(base, self.parameter_name, leave_parametrized=False)
            return
        for index in reversed(range(len(stack))):
            if isinstance(stack[index], (_LoraParameterProxy, _LoraFactorsProxy)):
                del stack[index]
                return
        raise RuntimeError(f"No LoRA parametrization to remove from `{self.parameter_name}`.")

    ParamWrapper._activate_lora = _activate_lora
    ParamWrapper._remove_parametrizations = _remove_parametrizations
    ParamWrapper._qlaunch_fixed = True
