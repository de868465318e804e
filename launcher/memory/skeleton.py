"""The model on the meta device, built the way ranks without weights build it in training, and what
the prediction reads off it: every tensor with its shape, dtype and component, the quantization
constants, the buffers, and the decoder layers as the activation model sees them.

transformers' bitsandbytes quantizer replaces the same linears with 4-bit ones as in from_pretrained
(it keeps lm_head and tied weights unquantized), the packed shapes and quantization constants follow
bitsandbytes' blockwise rules, then the same k-bit preparation and peft LoRA. So every element count
is exact for any model size, without weights or a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import PretrainedConfig

from ..config import ConfigError, ModelConfig, RunConfig
from ..dtypes import DtypePolicy
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
from ..model.loss import chunking_refusal, logit_softcap
from ..strategies.layout import TensorSpec, containing_layer, decoder_layers, parameter_specs
from .activations import LayerSpec, LoraSite, ModelShape
from .components import parameter_component


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
    # transformers' own replacement decides which linears become 4-bit, as in from_pretrained.
    AutoHfQuantizer.from_config(quantization_config(cfg.quant, policy)).preprocess_model(base, device_map={"": "cpu"})
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
    shape: ModelShape | None
    """What the activations depend on; None with `unmodelled` saying why."""
    unmodelled: str = ""

    @property
    def trainable(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.trainable]


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
    try:
        shape, unmodelled = model_shape(base, modules, layers, functools.partial(containing_layer, layers)), ""
    except ConfigError as error:
        shape, unmodelled = None, str(error)
    return ModelSpec(
        name=cfg.model.path,
        tensors=tensors,
        quant_state_bytes=quant_bytes,
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
        quantized_elements=quantized,
        dequantized_experts=[tuple(v) for v in dequantized.values()],
        config=config.get_text_config(),
        own_loss=chunking_refusal(base) or "",
        shape=shape,
        unmodelled=unmodelled,
    )


def model_shape(base, modules: dict[str, nn.Module], layers: list[str], layer_of) -> ModelShape:
    """The decoder layers and head of the skeleton, as the activation model reads them."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    config = base.config.get_text_config()  # a vision-language model's language model
    if not layers:
        raise ConfigError(
            f"`{type(config).__name__}` declares no decoder layer class; activations are not modelled for it."
        )

    def site(module) -> LoraSite:
        dropout = module.lora_dropout["default"]
        return LoraSite(module.in_features, module.out_features, module.r["default"], getattr(dropout, "p", 0.0))

    specs = []
    for index, layer in enumerate(layers):
        inside = {name[len(layer) + 1 :]: m for name, m in modules.items() if name.startswith(layer + ".")}
        lora = {
            name: site(m) for name, m in inside.items() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)
        }
        experts = {m.parameter_name: m.r["default"] for m in inside.values() if isinstance(m, ParamWrapper)}
        names = {name.replace(".base_layer", "") for name in inside}  # an adapted parameter wraps its module
        specs.append(describe_layer(config, names, lora, experts, config._attn_implementation, index))
    norms = [m for m in modules.values() if type(m).__name__.endswith("RMSNorm")]
    rotary = [name for name, _ in base.named_buffers() if name.endswith("inv_freq") and "original" not in name]
    return ModelShape(
        layers=specs,
        vocab=config.vocab_size,
        gemma_norms=any(type(m).__name__.startswith("Gemma") for m in norms),
        final_softcap=bool(logit_softcap(config)),
        rotary_sets=max(1, len(rotary)),
        lora_on_head=next(
            (site(m) for name, m in modules.items() if isinstance(m, LoraLayer) and not layer_of(name)), None
        ),
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


NORM_POSITIONS = {
    # The hidden-size norms of a decoder layer, by the names transformers gives them per position.
    "pre_attn": ("input_layernorm",),
    "post_attn": ("post_attention_layernorm",),
    "pre_mlp": ("pre_feedforward_layernorm",),
    "post_mlp": ("post_feedforward_layernorm",),
}


def norm_positions(names: set[str]) -> dict[str, bool]:
    """Where a layer's hidden-size norms sit. Llama-style layers name their pre-MLP norm
    `post_attention_layernorm`; Gemma-style layers have a separate `pre_feedforward_layernorm`,
    and then `post_attention_layernorm` normalises the attention output."""
    found = {pos: any(n in names for n in candidates) for pos, candidates in NORM_POSITIONS.items()}
    if not found["pre_mlp"] and found["post_attn"]:
        found["pre_mlp"], found["post_attn"] = True, False
    if not found["pre_attn"]:
        raise ConfigError(f"No input norm found in the decoder layer (modules: {', '.join(sorted(names))}).")
    return found


def describe_layer(
    config, module_names: set[str], lora: dict[str, LoraSite], expert_lora: dict[str, int], attention: str, index: int
) -> LayerSpec:
    """A LayerSpec from a layer's module names (relative to the layer) and the model config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layer_types = getattr(config, "layer_types", None)
    sliding = (
        layer_types[index] == "sliding_attention"
        if layer_types
        else getattr(config, "sliding_window", None) is not None
    )
    shared = 0
    if "mlp.experts" in module_names:
        if any(name.startswith("mlp.shared_expert") for name in module_names):
            shared = getattr(config, "shared_expert_intermediate_size", 0)
            if not shared or not {"mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj"} <= module_names:
                raise ConfigError(
                    f"`{type(config).__name__}` has shared experts that are not a gated MLP "
                    "(mlp.shared_expert.gate/up/down_proj); activations are not modelled for them."
                )
        if set(expert_lora) - {"gate_up_proj", "down_proj"}:
            raise ConfigError(
                f"Activations are modelled for adapted expert weights gate_up_proj and down_proj, not {sorted(expert_lora)}."
            )
        mlp, inter = "moe", getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    elif {"mlp.down_proj"} <= module_names and (
        {"mlp.gate_proj", "mlp.up_proj"} <= module_names or "mlp.gate_up_proj" in module_names
    ):
        mlp, inter = "dense", config.intermediate_size
    else:
        raise ConfigError(
            f"Activations are modelled for decoder layers with a gated MLP (gate/up/down projections) or routed "
            f"experts; `{type(config).__name__}` has neither. Static components could be predicted, activations not."
        )
    if not (
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} <= module_names
        or "self_attn.qkv_proj" in module_names
    ):
        raise ConfigError(f"`{type(config).__name__}` has no q/k/v projections that activations are modelled for.")
    return LayerSpec(
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        norms=norm_positions(module_names),
        qk_norm="self_attn.q_norm" in module_names,
        attention="eager" if attention == "eager" else "sdpa",
        softcap=attention == "eager" and bool(getattr(config, "attn_logit_softcapping", None)),
        window=getattr(config, "sliding_window", None) if sliding else None,
        mlp=mlp,
        intermediate=inter,
        experts=getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0) if mlp == "moe" else 0,
        top_k=getattr(config, "num_experts_per_tok", 0) if mlp == "moe" else 0,
        normalize_top_k=mlp == "moe" and getattr(config, "norm_topk_prob", True),
        shared_intermediate=shared,
        shared_gate="mlp.shared_expert_gate" in module_names,
        clamped_glu=mlp == "moe" and config.model_type == "gpt_oss",
        sinks=config.model_type == "gpt_oss",
        lora=lora,
        expert_lora=expert_lora,
    )
