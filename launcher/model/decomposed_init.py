"""PiSSA, OLoRA and LoftQ (`lora.init: pissa | olora | loftq`) on a 4-bit base: the adapters start as the principal part of each
adapted weight, taken from the 16-bit weight on the source rank while it loads, and the residual is what gets
quantized (QPiSSA). peft refuses these initializations on a quantized layer, and recommends exactly this.

transformers quantizes each weight as it reads it (`Bnb4bitQuantize.convert`, one weight at a time). Inside
`decomposing_while_loading`, every weight of an adapted linear first goes through peft's own initialization, on a
16-bit `nn.Linear` holding it: `pissa_init` (an SVD) or `olora_init` (a QR decomposition) set the adapter's A and
B, with the rank and scaling peft gives that module (rank and alpha patterns, rsLoRA), and leave the residual in
the weight, which is then quantized in its place. The factors are installed into the adapters once peft has
attached them (`install_factors`), on the source rank, whose adapter weights every rank receives; the other
ranks never see a 16-bit weight. The quantized-base cache keys on the plan (a residual base is not the original).

LoftQ leaves the weight as it is and starts the adapters from its quantization error instead: the weight is
quantized as bitsandbytes will quantize it (the same call, on the same device), and the error's top singular
vectors become B and A, as peft's `replace_lora_weights_loftq` (one iteration, `_low_rank_decomposition`) makes
them, here divided by the square root of the adapter's scaling so that the adapter's output is that rank-r error
(peft leaves the scaling out, and its helper runs on CUDA or XPU only).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ..config import LoraConfig
from .experts import BLOCKSIZE

PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class AdapterShape:
    r: int
    alpha: float


def plan(meta_model: nn.Module, lora: LoraConfig) -> dict[str, AdapterShape]:
    """Module path -> rank and alpha of every linear the run adapts, as peft attaches them to `meta_model` (an
    unquantized tree on meta, which this adapts)."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    from . import targets
    from .dora import magnitudes_on_meta

    config = targets.peft_lora_config(meta_model, dataclasses.replace(lora, init="default"))
    config.init_lora_weights = False
    with magnitudes_on_meta():
        wrapped = get_peft_model(meta_model, config)
    return {
        name.removeprefix(PEFT_PREFIX): AdapterShape(layer.r["default"], layer.lora_alpha["default"])
        for name, layer in wrapped.named_modules()
        if isinstance(layer, LoraLinear)
    }


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's CPU kernels on one thread: an SVD or QR gives the same bits in every process only on the same number
    of threads, and a bit of the residual can move a 4-bit code. The ranks of a launch run on one thread already
    (torchrun sets OMP_NUM_THREADS=1); `qlaunch verify` and `merge` then rebuild exactly the residual they trained on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scaling(shape: AdapterShape, lora: LoraConfig) -> float:
    return shape.alpha / (shape.r**0.5 if lora.use_rslora else shape.r)


def four_bit(weight: torch.Tensor, quant, device: torch.device | str) -> torch.Tensor:
    """`weight` quantized on `device` as bitsandbytes quantizes a 4-bit linear with `quant`'s settings, then
    dequantized: what a 4-bit run computes with, where `weight` is."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight.to(device), blocksize=BLOCKSIZE, compress_statistics=quant.double_quant, quant_type=quant.type
    )
    return bnb_functional.dequantize_4bit(packed, state).to(weight.device)


def loftq(
    weight: torch.Tensor, shape: AdapterShape, lora: LoraConfig, quant, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`weight` unchanged, A, B): the adapter's output is the rank-r part of `weight`'s 4-bit quantization error."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    error = weight.float() - four_bit(weight, quant, device).float()
    factors = _low_rank_decomposition(error, reduced_rank=shape.r)
    root = scaling(shape, lora) ** 0.5
    return weight, factors["R"] / root, factors["L"] / root


def decompose(
    weight: torch.Tensor, shape: AdapterShape, lora: LoraConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual weight in `weight`'s dtype, A, B) by peft's own `lora.init` (pissa, olora) on a 16-bit linear
    holding `weight`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    out_features, in_features = weight.shape
    base = nn.Linear(in_features, out_features, bias=False, device="meta")
    base.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    config = PeftLoraConfig(
        r=shape.r, lora_alpha=shape.alpha, use_rslora=lora.use_rslora, init_lora_weights=lora.init, lora_dropout=0.0
    )
    layer = LoraLinear(base, "default", config=config, r=shape.r, lora_alpha=shape.alpha)
    residual = layer.get_base_layer().weight.detach().to(weight.dtype)
    return residual, layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


@contextlib.contextmanager
def decomposing_while_loading(
    shapes: dict[str, AdapterShape], lora: LoraConfig, quant=None, device: torch.device | str = "cpu"
) -> Iterator[dict[str, tuple]]:
    """Inside, each weight transformers quantizes for a module in `shapes` is decomposed first and its residual
    quantized (LoftQ: quantized as it is, on `device` as the load quantizes, `quant` its settings); yields module
    path -> (A, B) as they are made."""
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if not shapes:  # nothing to decompose (no lora.init that does, or no adapted linear)
        yield factors
        return
    convert = Bnb4bitQuantize.convert

    def convert_residual(self, input_dict, full_layer_name=None, model=None, **kwargs):
        decomposed = {}
        for name, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            path, _, parameter = name.rpartition(".")
            if parameter == "weight" and path in shapes:
                with one_thread():
                    if lora.init == "loftq":
                        tensor, a, b = loftq(tensor, shapes[path], lora, quant, torch.device(device))
                    else:
                        tensor, a, b = decompose(tensor, shapes[path], lora)
                factors[path] = (a, b)
            decomposed[name] = [tensor] if isinstance(value, list) else tensor
        return convert(self, decomposed, full_layer_name=full_layer_name, model=model, **kwargs)

    Bnb4bitQuantize.convert = convert_residual
    try:
        yield factors
    finally:
        Bnb4bitQuantize.convert = convert


def install_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each adapted linear's A and B from its decomposition (the source rank's peft model, after attach_lora)."""
    modules = dict(model.named_modules())
    missing = sorted(path for path in factors if PEFT_PREFIX + path not in modules)
    if missing:
        raise RuntimeError(f"The decomposed weights of {missing[:3]} have no adapter to go to.")
    with torch.no_grad():
        for path, (a, b) in factors.items():
            layer = modules[PEFT_PREFIX + path]
            for adapter, value in ((layer.lora_A["default"], a), (layer.lora_B["default"], b)):
                adapter.weight.copy_(value.to(adapter.weight.dtype))


def describe(lora: LoraConfig | None, shapes: dict[str, AdapterShape]) -> dict | None:
    """What the quantized-base cache keys on for a decomposed base (None for the original one)."""
    if not shapes:
        return None
    return {
        "init": lora.init,
        "use_rslora": lora.use_rslora,
        "adapters": sorted([path, shape.r, shape.alpha] for path, shape in shapes.items()),
    }
