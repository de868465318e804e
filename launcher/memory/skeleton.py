"""The model on the meta device, built the way ranks without weights build it in training, and what
the prediction reads off it: every tensor with its shape, dtype and component, the quantization
constants, the buffers, and what a micro batch saves for backward (traced on it: trace.py).

transformers' bitsandbytes quantizer replaces the same linears with 4-bit ones as in from_pretrained
(it keeps lm_head and tied weights unquantized), the packed shapes and quantization constants follow
bitsandbytes' blockwise rules, then the same k-bit preparation and peft LoRA. So every element count
is exact for any model size, without weights or a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import PretrainedConfig

from ..config import ConfigError, ModelConfig, RunConfig
from ..dtypes import DtypePolicy
from ..model.anatomy import decoder_layers, parameter_component
from ..model.build import (
    apply_quantized_layout,
    attach_lora,
    meta_base,
    prepare_for_kbit_training,
    quantization_config,
    quantized_layout,
    read_model_config,
)
from ..model.experts import BLOCKSIZE as EXPERT_BLOCKSIZE
from ..model.experts import Experts4bit
from ..model.loss import chunking_refusal
from ..strategies.layout import TensorSpec, containing_layer, parameter_specs
from .trace import Saved, TraceRun, layer_kinds, trace_saved


def quant_state_shapes(
    numel: int, blocksize: int, double_quant: bool
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors a bitsandbytes 4-bit QuantState keeps for a weight of `numel` elements: one fp32
    absmax per block; with double quantization those become uint8, quantized in blocks of 256 with
    an fp32 absmax each, a 256-entry fp32 code and an fp32 offset; plus the 16-entry fp32 quant map."""
    blocks = -(-numel // blocksize)
    if not double_quant:
        return {"absmax": ((blocks,), torch.float32), "quant_map": ((16,), torch.float32)}
    return {
        "absmax": ((blocks,), torch.uint8),
        "quant_map": ((16,), torch.float32),
        "nested_absmax": ((-(-blocks // 256),), torch.float32),
        "nested_quant_map": ((256,), torch.float32),
        "offset": ((), torch.float32),
    }


def build_skeleton(cfg: RunConfig, policy: DtypePolicy, config) -> nn.Module:
    """The LoRA-wrapped 4-bit model on the meta device, built like a rank without weights builds it."""
    with torch.random.fork_rng(devices=[]), _without_zero3_init(), warnings.catch_warnings():
        # attach_lora seeds the generator (forked here); transformers' renaming notices are not for this output.
        warnings.simplefilter("ignore", FutureWarning)
        return _build_skeleton(cfg, policy, config)


@contextlib.contextmanager
def _without_zero3_init():
    """Inside a ZeRO-3 run transformers builds every model under deepspeed.zero.Init, which partitions
    it with collectives; the skeleton is a plain meta model that one rank builds alone."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _build_skeleton(cfg: RunConfig, policy: DtypePolicy, config) -> nn.Module:
    from transformers.quantizers import AutoHfQuantizer

    base = meta_base(cfg.model, cfg.quant, config)
    # transformers' own replacement decides which linears become 4-bit, as in from_pretrained quantizing a checkpoint
    # (not reading a pre-quantized one, which would also swap Llama-4's fused experts for per-expert linears).
    quantizer = AutoHfQuantizer.from_config(
        quantization_config(cfg.quant, policy, base, cfg.model.quantize_vision), pre_quantized=False
    )
    quantizer.preprocess_model(base, device_map={"": "cpu"})
    apply_quantized_layout(
        base, cfg.quant, policy, quantized_layout(base, policy.quant_storage, cfg.quant.experts == "4bit")
    )
    prepare_for_kbit_training(base, policy, cfg.train.gradient_checkpointing)
    with torch.device("meta"):  # peft would otherwise create and initialise every adapter in host RAM
        return attach_lora(base, cfg.lora, policy, cfg.train.seed)


@dataclass
class ModelSpec:
    """Everything the prediction needs from the skeleton."""

    name: str
    tensors: list[TensorSpec]
    quant_state_bytes: int
    buffer_bytes: int
    quantized_elements: int
    """Weights stored in 4 bits (unpacked count): the matmul work per token is about twice this."""
    dequantized_experts: list[tuple[int, int]]
    """Per decoder layer with 4-bit experts: bytes of its experts dequantized, and of those not adapted
    (which the experts' matmuls save for backward; an adapted one saves its sum with the LoRA delta)."""
    config: object
    own_loss: str
    """Why the model keeps its own loss over all logits ("": the chunked loss stands in for it)."""
    skeleton: nn.Module
    traces: dict = field(default_factory=dict)

    @property
    def trainable(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.trainable]

    def saved(self, compute: DtypePolicy, run: TraceRun) -> Saved:
        """What one micro batch of `run` saves for backward, traced on the skeleton once per run and dtypes."""
        key = (compute, run)
        if key not in self.traces:
            try:
                if "kinds" not in self.traces:
                    self.traces["kinds"] = layer_kinds(self.skeleton, decoder_layers(self.skeleton))
                self.traces[key] = trace_saved(self.skeleton, compute, run, self.traces["kinds"])
            except Exception as error:  # noqa: BLE001 - a model the trace cannot run is predicted without activations
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                if run.images is not None:
                    # Qwen2-VL-style encoders size their tensors from `image_grid_thw`'s values, which the fake mode
                    # loses through views: the image tokens still count in the language model.
                    print(
                        f"Memory budget: the vision encoder's activations are not traced ({type(error).__name__}: "
                        f"{first[:120]}); the image tokens are counted in the language model only.",
                        flush=True,
                    )
                    self.traces[key] = self.saved(compute, dataclasses.replace(run, images=None))
                    return self.traces[key]
                raise ConfigError(
                    f"its forward did not run on fake tensors ({type(error).__name__}: {first[:200]}), "
                    "so its activations cannot be traced"
                ) from error
        return self.traces[key]


def is_adapted_expert(modules: dict[str, nn.Module], parametrization: str) -> bool:
    """Whether peft stacks a LoRA proxy on the 4-bit expert whose parametrization is `parametrization`
    (`<module>.parametrizations.<name>.0`): the wrapper of that module adapts that parameter."""
    from peft.tuners.lora import ParamWrapper

    owner, _, rest = parametrization.partition(".parametrizations.")
    name = rest.split(".")[0]
    wrapper = owner
    while wrapper.endswith(".base_layer"):
        wrapper = wrapper.removesuffix(".base_layer")
        if isinstance(modules.get(wrapper), ParamWrapper) and modules[wrapper].parameter_name == name:
            return True
    return False


def describe_model(cfg: RunConfig, policy: DtypePolicy, config) -> ModelSpec:
    skeleton = build_skeleton(cfg, policy, config)
    base = skeleton.get_base_model()
    modules = dict(skeleton.named_modules())
    layers = decoder_layers(skeleton)
    tensors = parameter_specs(skeleton, layers, parameter_component)
    quant_bytes, quantized = 0, 0
    dequantized: dict[str, list[int]] = {}
    for name, module in modules.items():
        if isinstance(module, bnb.nn.Linear4bit):
            numel, blocksize = module.in_features * module.out_features, module.weight.blocksize
        elif isinstance(module, Experts4bit):
            numel, blocksize = math.prod(module.shape), EXPERT_BLOCKSIZE
            layer = dequantized.setdefault(containing_layer(layers, name), [0, 0])
            layer[0] += numel * module.dtype.itemsize
            if not is_adapted_expert(modules, name):
                layer[1] += numel * module.dtype.itemsize
        else:
            continue
        quantized += numel
        for shape, dtype in quant_state_shapes(numel, blocksize, cfg.quant.double_quant).values():
            quant_bytes += math.prod(shape) * dtype.itemsize
    buffers = {id(b): b for b in skeleton.buffers()}.values()
    return ModelSpec(
        name=cfg.model.path,
        tensors=tensors,
        quant_state_bytes=quant_bytes,
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
        quantized_elements=quantized,
        dequantized_experts=[tuple(v) for v in dequantized.values()],
        config=config.get_text_config(),
        own_loss=chunking_refusal(base) or "",
        skeleton=skeleton,
    )


class ModelCache:
    """The model's config, and the model described per storage dtypes: predictions that share the
    model, quantization and LoRA settings (qlaunch plan) build each skeleton once."""

    def __init__(self, model: ModelConfig, config: PretrainedConfig | None = None):
        self.config = config or read_model_config(model.path, model.trust_remote_code, config_only=True)
        self.specs: dict[DtypePolicy, ModelSpec] = {}

    def describe(self, cfg: RunConfig, stored: DtypePolicy) -> ModelSpec:
        if stored not in self.specs:
            self.specs[stored] = describe_model(cfg, stored, self.config)
        return self.specs[stored]
