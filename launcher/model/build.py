"""Load & prepare: the 4-bit base, k-bit preparation, LoRA, non-reentrant gradient checkpointing.

Low-memory loading: only the source rank (global rank 0) reads the checkpoint and quantizes it into
host RAM (weight by weight on its GPU when CUDA is present, else on the CPU: quantize.py), or reads
what an earlier start quantized from the quantized-base cache (quant_cache.py).
Every other rank builds the same module tree on the meta device from a small layout that the source
rank broadcasts, so no rank but the source ever holds the whole model. The sharding stage
(`launcher.strategies.handoff`, driven by the strategy) then fills each rank's shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoConfig, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel
from transformers.quantizers.base import get_keys_to_not_convert

from .. import vision
from ..adapter_config import FROM_WEIGHTS
from ..collectives import broadcast_object, is_source_rank, this_rank_device
from ..config import ConfigError, LoraConfig, ModelConfig, QuantConfig, TrainConfig
from ..cpu_shims import disable_bnb_cpu_repack
from ..dtypes import DTYPE_BY_NAME, DtypePolicy
from ..objectives import sequences_per_sample
from . import decomposed_init, experts, targets
from .adapter_init import load_adapter_weights
from .anatomy import frozen_component
from .dora import fix_peft_dora, magnitudes_on_meta
from .experts import packed_shape
from .files import model_source
from .loss import install_loss, loss_chunk_tokens
from .quant_cache import cached_quantized_base
from .quantize import quantizing_on, reading_without_mmap


def quantization_config(
    quant: QuantConfig, policy: DtypePolicy, meta: PreTrainedModel | None = None, quantize_vision: bool = False
) -> BitsAndBytesConfig:
    """transformers' 4-bit config; given the unquantized `meta` model, it also keeps 16-bit the linears whose weight
    the model reads outside their forward (targets.read_outside_forward: in 4 bits it would read packed bytes) and,
    unless `quantize_vision`, a vision-language model's vision parts (vision.py)."""
    keep = []
    if meta is not None:
        keep = [*map(re.escape, targets.read_outside_forward(meta)), *vision.unquantized_vision(meta, quantize_vision)]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPE_BY_NAME[quant.compute_dtype],
        bnb_4bit_quant_storage=policy.quant_storage,
        # transformers' own list (the output layer, tied weights) is kept only where none is given; names are
        # patterns to it.
        llm_int8_skip_modules=[*get_keys_to_not_convert(meta), *keep] if keep else None,
    )


@dataclass
class Linear4bitSpec:
    """What a rank needs to rebuild one `bnb.nn.Linear4bit` on the meta device."""

    in_features: int
    out_features: int
    bias: bool
    packed_shape: tuple[int, ...]


@dataclass
class QuantizedLayout:
    """The source rank's module tree, as far as quantization changed it."""

    linear4bit: dict[str, Linear4bitSpec]
    experts: dict[str, experts.ExpertSpec]
    """`<module path>.<parameter>` of each 4-bit MoE expert parameter."""


def quantized_layout(model: nn.Module, storage: torch.dtype, experts_4bit: bool) -> QuantizedLayout:
    """The 4-bit linears of `model` (quantized, or marked for quantization on meta) and their packed shapes,
    and its 4-bit experts (quantized, or with `experts_4bit` to be quantized)."""
    return QuantizedLayout(
        linear4bit={
            name: Linear4bitSpec(
                in_features=module.in_features,
                out_features=module.out_features,
                bias=module.bias is not None,
                packed_shape=packed_shape(module.in_features * module.out_features, storage),
            )
            for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit)
        },
        experts=experts.expert_specs(model, storage, planned=experts_4bit),
    )


def read_model_config(path: str, trust_remote_code: bool, config_only: bool = False) -> PretrainedConfig:
    """The model's config, offline: from a directory written by `save_pretrained`, a hub id already in
    the local cache, or (`config_only`, for the budget, which needs no weights) a config.json file."""
    wanted = "a directory written by `save_pretrained`" + (
        " or its config.json (only the config is read)" if config_only else ""
    )
    target = model_source(path, config_only)
    try:
        return AutoConfig.from_pretrained(target, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Model `{path}` is not in the local Hugging Face cache and nothing is fetched at run time "
            f"({type(error).__name__}). Download it first (e.g. `huggingface-cli download {path}`, or only its "
            f"config.json for the budget) and point `model.path` at {wanted}."
        ) from error


def load_quantized_base(
    model: ModelConfig,
    quant: QuantConfig,
    policy: DtypePolicy,
    device: torch.device | str | None = None,
    lora: LoraConfig | None = None,
    shapes: dict[str, decomposed_init.AdapterShape] | None = None,
) -> PreTrainedModel:
    """Reads the checkpoint through `from_pretrained`, each 4-bit weight quantized on `device` (default
    this rank's device: its GPU when CUDA is present, else the CPU) one at a time, the whole quantized base in host RAM (source rank only). The
    checkpoint is read with pread, not memory-mapped, so its pages do not stay in the process (quantize.py).
    With `lora.init` pissa or olora each adapted weight is decomposed first and its residual quantized (loftq: the
    adapters start from its quantization error); the adapters' factors ride on the base as `qlaunch_factors`
    (decomposed_init.py; `shapes`: `decomposition_plan`'s, if known)."""
    device = this_rank_device() if device is None else device
    shapes = decomposition_plan(model, quant, lora) if shapes is None else shapes
    with (
        reading_without_mmap(),
        quantizing_on(device),
        experts.quantizing_experts_while_loading(quant, policy.quant_storage, device, quant.experts == "4bit"),
        decomposed_init.decomposing_while_loading(shapes, lora, quant, device) as factors,
    ):
        meta = meta_base(model, quant)
        base = vision.auto_class(meta.config).from_pretrained(
            model.path,
            quantization_config=quantization_config(quant, policy, meta, model.quantize_vision),
            dtype=DTYPE_BY_NAME[quant.compute_dtype],
            device_map={"": "cpu"},
            trust_remote_code=model.trust_remote_code,
        )
    experts.sort_parametrizations(base)
    if factors:
        base.qlaunch_factors = factors
    return base


def decomposition_plan(
    model: ModelConfig, quant: QuantConfig, lora: LoraConfig | None
) -> dict[str, decomposed_init.AdapterShape]:
    """The linears `lora.init` starts from their 16-bit weights (none unless pissa, olora or loftq), with their ranks
    and alphas."""
    if lora is None or lora.init not in FROM_WEIGHTS:
        return {}
    return decomposed_init.plan(meta_base(model, quant), lora)


def meta_base(model: ModelConfig, quant: QuantConfig, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """The model's unquantized module tree on the meta device: shapes and dtypes, no data (from
    `config` when given, else from the config at `model.path`)."""
    if config is None:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    with torch.device("meta"):
        return vision.auto_class(config).from_config(
            config, dtype=DTYPE_BY_NAME[quant.compute_dtype], trust_remote_code=model.trust_remote_code
        )


def apply_quantized_layout(
    model: PreTrainedModel, quant: QuantConfig, policy: DtypePolicy, layout: QuantizedLayout
) -> None:
    """Turns a meta `meta_base` into the source rank's quantized tree (still on the meta device)."""
    for name, spec in layout.linear4bit.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = parent.get_submodule(child_name)
        linear = bnb.nn.Linear4bit(
            spec.in_features,
            spec.out_features,
            bias=spec.bias,
            compute_dtype=DTYPE_BY_NAME[quant.compute_dtype],
            compress_statistics=quant.double_quant,
            quant_type=quant.type,
            quant_storage=policy.quant_storage,
            device="meta",
        )
        linear.weight = bnb.nn.Params4bit(
            torch.empty(spec.packed_shape, dtype=policy.quant_storage, device="meta"),
            requires_grad=False,
            compress_statistics=quant.double_quant,
            quant_type=quant.type,
            quant_storage=policy.quant_storage,
            module=linear,
            bnb_quantized=True,
        )
        if spec.bias:
            linear.bias = nn.Parameter(torch.empty(spec.out_features, dtype=original.bias.dtype, device="meta"))
        setattr(parent, child_name, linear)
    for name, spec in layout.experts.items():
        path, _, parameter = name.rpartition(".")
        experts.install_meta(model.get_submodule(path), parameter, spec, policy.quant_storage)
    model.is_loaded_in_4bit = True
    # What transformers' quantizer marks on a model it quantizes: some families take another path then (Jamba and
    # FalconMamba call `dt_proj` as a module instead of multiplying by its weight), so all-linear, resolved on
    # each rank, must see the source rank's path on every rank.
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True


def prepare_for_kbit_training(model: PreTrainedModel, policy: DtypePolicy, gradient_checkpointing: bool) -> None:
    """Freezes the base and sets each unquantized weight to the dtype the strategy can shard safely.

    Norms go to `policy.norm` (fp32 unless the strategy needs one dtype per unit) so their small
    scale factors keep full precision; embeddings and lm_head go to `policy.dense`, biases of 4-bit
    linears and MoE experts to theirs (see DtypePolicy). A tied weight is one parameter and stays one. Gradient
    checkpointing is always non-reentrant: reentrant checkpointing re-runs forward inside an
    autograd Function, which FSDP2 and ZeRO-3 cannot see through (parameters are not re-gathered
    and adapter gradients are silently lost) and which needs inputs that require grad.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            target = policy.of(frozen_component(module, name, param))
            if target is not None and param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
    experts.cast_at_experts(model)
    if gradient_checkpointing:
        model.config.use_cache = False
        model.enable_input_require_grads()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert_non_reentrant(model)


def assert_non_reentrant(model: nn.Module) -> None:
    """Fails loudly if any checkpointed layer would run reentrant checkpointing."""
    found = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None:
            continue
        found += 1
        if getattr(func, "keywords", {}).get("use_reentrant", True) is not False:
            raise RuntimeError(
                f"{type(module).__name__} uses reentrant gradient checkpointing; this launcher never does."
            )
    if not found:
        raise RuntimeError("Gradient checkpointing was requested but no layer of the model supports it.")


def attach_lora(model: PreTrainedModel, lora: LoraConfig, policy: DtypePolicy, seed: int) -> nn.Module:
    """Adds LoRA adapters. The seed makes the source rank's init, which every rank receives, reproducible."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    experts.fix_peft_stacked_parametrizations()
    fix_peft_dora()
    targets.keep_named_modules()
    experts.sort_expert_parameters(model)
    resolution = targets.resolve(model, lora)
    torch.manual_seed(seed)
    with magnitudes_on_meta():
        model = get_peft_model(model, targets.peft_lora_config(model, lora, resolution))
    model.qlaunch_targets = resolution
    if lora.target_parameters and lora.dropout:
        for module in model.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = nn.Dropout(lora.dropout)
    for param in model.parameters():
        if param.requires_grad and param.dtype != policy.adapter:
            param.data = param.data.to(policy.adapter)
    return model


def coverage_notes(model: nn.Module, lora: LoraConfig) -> list[str]:
    """What a user should know about how this model is quantized and adapted (printed at start)."""
    notes = []
    experts = [
        p
        for m in model.modules()
        for n, p in m.named_parameters(recurse=False)
        if not p.requires_grad and frozen_component(m, n, p) == "experts"
    ]
    if experts:
        count = sum(p.numel() for p in experts)
        notes.append(
            f"{count / 1e6:,.1f}M MoE expert weights stay {str(experts[0].dtype).removeprefix('torch.')} "
            "(quant.experts: 16bit; the memory report counts them as `experts`)."
            + ("" if lora.target_parameters else " They are not adapted; lora.target_parameters adapts them.")
        )
    if lora.target_parameters and lora.dropout:
        notes.append(
            f"lora.dropout {lora.dropout} applies to the adapted modules; peft has no dropout on adapted parameters."
        )
    resolution = getattr(model, "qlaunch_targets", None)
    if resolution and resolution.left_out:
        notes.append(f"all-linear leaves out {targets.describe_left_out(resolution.left_out)}.")
    if resolution and resolution.unprobed:
        notes.append(f"all-linear: {resolution.unprobed}.")
    return notes


def load_base(
    model: ModelConfig, quant: QuantConfig, policy: DtypePolicy, lora: LoraConfig | None = None
) -> PreTrainedModel:
    """Before any plugin exists (so no ZeRO-3 hook changes how transformers builds it): the source
    rank loads the quantized base (from the quantized-base cache, or quantizing the checkpoint); every
    other rank builds the bare tree on meta."""
    if not is_source_rank():
        return meta_base(model, quant)
    device = this_rank_device()
    if not model.quant_cache:
        return load_quantized_base(model, quant, policy, device, lora)
    shapes = decomposition_plan(model, quant, lora)
    decomposition = decomposed_init.describe(lora, shapes)
    return cached_quantized_base(
        model,
        quant,
        policy,
        lambda: load_quantized_base(model, quant, policy, device, lora, shapes),
        device.type,
        decomposition,
    )[0]


def build_model(
    base: PreTrainedModel,
    quant: QuantConfig,
    lora: LoraConfig,
    train: TrainConfig,
    policy: DtypePolicy,
    max_seq_len: int,
) -> nn.Module:
    """The LoRA-wrapped 4-bit model, on every rank the same tree: the source rank broadcasts which
    layers it quantized and how, the others rebuild them on meta."""
    if is_source_rank():
        broadcast_object(quantized_layout(base, policy.quant_storage, experts_4bit=False))
    else:
        apply_quantized_layout(base, quant, policy, broadcast_object(None))
    disable_bnb_cpu_repack(base)
    prepare_for_kbit_training(base, policy, train.gradient_checkpointing)
    install_loss(
        base, loss_chunk_tokens(base, train), sequences_per_sample(train) * train.micro_batch_size * max_seq_len
    )
    factors = getattr(base, "qlaunch_factors", None)
    model = attach_lora(base, lora, policy, train.seed)
    if factors:  # the source rank's; every rank receives its adapter weights
        decomposed_init.install_factors(model, factors)
    if lora.init_from and is_source_rank():  # every rank receives the source rank's adapter weights
        load_adapter_weights(model, lora.init_from)
    return model
