"""Memory budget: what each rank will hold, predicted from the config alone (`qlaunch budget`).

The model is built on the meta device the way ranks without weights build it in training: the
bitsandbytes quantizer of transformers replaces the same linears with 4-bit ones (it keeps lm_head
and tied weights unquantized), their packed shapes and quantization constants follow bitsandbytes'
blockwise rules, then the same k-bit preparation and peft LoRA. So every element count is exact for
any model size, without weights or a GPU. The strategy (launcher.strategies) then says how each
tensor is split and padded on every rank and which dtypes it has, and the activation model below
says what a forward pass saves for backward.

Static components (weights, quantization constants, LoRA, gradients, master copies, optimizer
states) are exact to the byte; training measures them (launcher.memory) and the tests compare.
Activations follow what each part of each decoder layer saves (launcher.activations, per family;
measured to the byte on CPU). Gathered parameters, communication buckets and the runtime allowance are estimates from the
libraries' documented behaviour: see README, "Memory budget".
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn

from . import strategies
from .config import ConfigError, RunConfig
from .activations import ActivationDtypes, LoraSite, ModelShape, activation_bytes, describe_layer
from .model import frozen_component
from .strategies import DtypePolicy, Strategy, TensorSpec, clean_fqn

COMPONENTS = {
    "base_4bit": "packed 4-bit base weights (this rank's part)",
    "quant_states": "4-bit quantization constants: absmax, double-quant absmax and code, quant map (whole on every rank)",
    "frozen_dense": "unquantized frozen weights: embeddings, lm_head (once when tied), MoE routers",
    "experts": "MoE expert weights, frozen and unquantized (fused 3D parameters, which bitsandbytes cannot quantize)",
    "biases": "biases of the 4-bit linears (e.g. Qwen2's q/k/v)",
    "norms": "norm weights",
    "buffers": "module buffers (rotary frequencies)",
    "lora": "LoRA parameters",
    "shard_padding": "padding that makes shards equal or aligned",
    "gradients": "LoRA gradients, as the optimizer steps them",
    "master_weights": "copies of the LoRA parameters the optimizer updates (ZeRO)",
    "optimizer_states": "AdamW moments",
    "activations": "tensors saved for backward by one micro batch",
    "recompute": "one layer's activations recomputed in backward (checkpointing)",
    "logits_backward": "fp32 gradients of the logits at the start of backward",
    "gathered_params": "parameters gathered from the other ranks while layers run (FSDP, ZeRO-3), prefetch included",
    "comm_buckets": "gradient communication buffers (DDP buckets, ZeRO reduce bucket, FSDP reduce-scatter input)",
    "runtime": "CUDA context, NCCL buffers and allocator slack (an allowance, --runtime-overhead)",
}
WEIGHT_COMPONENTS = ("base_4bit", "quant_states", "frozen_dense", "experts", "biases", "norms", "buffers", "lora", "shard_padding")
STATIC_COMPONENTS = WEIGHT_COMPONENTS + strategies.OPTIMIZER_STATE_COMPONENTS
ESTIMATED_COMPONENTS = ("gathered_params", "comm_buckets", "runtime")
OFFLOADED_COMPONENTS = strategies.OPTIMIZER_STATE_COMPONENTS
DEFAULT_RUNTIME_OVERHEAD = 1 << 30
"""CUDA context (~0.5 GiB with lazy module loading), NCCL's own buffers and allocator slack."""
OPTIMIZERS = ("adamw",)
GiB = 1 << 30
BINARY_UNITS = (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10))


# --- Which component a parameter belongs to (shared with the measurement) ---------------------


def parameter_component(module: nn.Module, name: str, param: nn.Parameter) -> str:
    return "lora" if param.requires_grad else frozen_component(module, name, param)


def parameter_components(model: nn.Module) -> dict[str, str]:
    """Component of every parameter, by its name with wrapper prefixes removed."""
    return {
        clean_fqn(f"{module_name}.{name}" if module_name else name): parameter_component(module, name, param)
        for module_name, module in model.named_modules()
        for name, param in module.named_parameters(recurse=False)
    }


# --- Inputs ----------------------------------------------------------------------------------


@dataclass
class Hardware:
    """What the budget needs beyond the run config: where and how the run is laid out."""

    world_size: int = 1
    nodes: int = 1
    gpu_memory: int | None = None
    """Bytes per device; None: say nothing about fitting."""
    runtime_overhead: int = DEFAULT_RUNTIME_OVERHEAD
    device: str = "cuda"
    """cuda, or cpu for runs measured on CPU (no runtime allowance, CPU dropout masks, no autocast)."""
    optimizer: str = "adamw"
    offload: bool = False
    """DeepSpeed's offload_optimizer: gradients, master copies and optimizer states live in host RAM."""


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str, what: str) -> int:
    """'24GiB', '80GB', '1.5 GiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS:
        raise ConfigError(
            f"{what} `{text}` is not a size. Write a number with a unit, e.g. 24GiB, 80GB or 40960MiB "
            "(GiB = 2^30 bytes, GB = 10^9 bytes)."
        )
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def format_bytes(n: int) -> str:
    for unit, size in BINARY_UNITS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def autocast_dtype(cfg: RunConfig, device: str) -> torch.dtype | None:
    """The autocast dtype training will use: "auto" means bf16 on CUDA and none on CPU, as in training."""
    mixed = cfg.train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if device == "cuda" else "no"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)


def validate(cfg: RunConfig, hardware: Hardware) -> Strategy:
    """The run's strategy, or a ConfigError for input the budget cannot predict."""
    strategy = strategies.get(cfg.strategy or "fsdp2")
    strategy.check(cfg)
    if hardware.world_size < 1 or hardware.nodes < 1 or hardware.world_size % hardware.nodes:
        raise ConfigError(
            f"World size {hardware.world_size} on {hardware.nodes} node(s) is not a whole number of GPUs per node. "
            "Give --world-size (total GPUs), or --nodes with --gpus-per-node."
        )
    if hardware.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"Optimizer `{hardware.optimizer}` is not one the launcher trains with; it runs torch AdamW "
            f"(choose one of: {', '.join(OPTIMIZERS)})."
        )
    if hardware.offload and not strategy.name.startswith("zero"):
        raise ConfigError(
            f"--offload models DeepSpeed's offload_optimizer (set it in ds_configs/zero*.json); the launcher's "
            f"{strategy.name} configuration does not offload. Use --strategy zero2 or zero3, or drop --offload."
        )
    if cfg.train.micro_batch_size < 1 or cfg.data.max_seq_len < 1 or cfg.lora.r < 1:
        raise ConfigError("Micro batch, sequence length and LoRA rank must be positive integers.")
    return strategy


def request_from_args(args) -> tuple[RunConfig, Hardware]:
    """`qlaunch budget` / `qlaunch plan` flags onto the run config (flags override --config) and the hardware."""
    from .config import load_config

    overrides = [
        (key, value)
        for key, value in (
            ("model.path", args.model),
            ("strategy", getattr(args, "strategy", None)),
            ("data.max_seq_len", args.seq_len),
            ("train.micro_batch_size", getattr(args, "micro_batch", None)),
            ("lora.r", args.lora_r),
            ("lora.target_modules", _targets(args.lora_targets)),
            ("train.gradient_checkpointing", False if getattr(args, "no_checkpointing", False) else None),
        )
        if value is not None
    ]
    cfg = load_config(args.config, overrides)
    nodes = args.nodes or 1
    if args.world_size is not None and args.gpus_per_node is not None and args.world_size != nodes * args.gpus_per_node:
        raise ConfigError(
            f"--world-size {args.world_size} disagrees with --nodes {nodes} x --gpus-per-node {args.gpus_per_node}. "
            "Give one of the two."
        )
    world = args.world_size if args.world_size is not None else nodes * (args.gpus_per_node or 1)
    hardware = Hardware(
        world_size=world,
        nodes=nodes,
        gpu_memory=parse_bytes(args.gpu_memory, "--gpu-memory") if args.gpu_memory else None,
        runtime_overhead=parse_bytes(args.runtime_overhead, "--runtime-overhead") if args.runtime_overhead else DEFAULT_RUNTIME_OVERHEAD,
        optimizer=getattr(args, "optimizer", "adamw"),
        offload=getattr(args, "offload", False),
    )
    return cfg, hardware


def _targets(text: str | None) -> list[str] | str | None:
    if text is None or text == "all-linear":
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def run_command(args) -> int:
    """`qlaunch budget`: the table (or JSON), and the plot if asked."""
    import json

    cfg, hardware = request_from_args(args)
    if args.plot:
        require_matplotlib()  # fail before the work, not after
    result = predict(cfg, hardware)
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
    if args.plot:
        plot(result, Path(args.plot))
        if not args.json:
            print(f"\nPlot: {args.plot}")
    return 0


# --- The model, on the meta device -----------------------------------------------------------


def load_model_config(cfg: RunConfig):
    """The model's config from a local directory, a config.json, or a hub id already cached."""
    from transformers import AutoConfig

    path = cfg.model.path
    if not path:
        raise ConfigError("No model given. Pass --model: a local model directory, a config.json, or a cached hub id.")
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".json":
        target = str(local)
    elif local.is_dir() and (local / "config.json").is_file():
        target = str(local)
    elif local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(
            f"Model `{path}` is neither a directory with a config.json nor a config.json file. Point --model at one "
            "of these (only the config is read; no weights are needed)."
        )
    else:
        target = path
    try:
        return AutoConfig.from_pretrained(target, local_files_only=True, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Model `{path}` is not in the local Hugging Face cache and the budget works offline, so it cannot be "
            f"fetched from the hub ({type(error).__name__}). Download its config.json (e.g. `huggingface-cli download "
            f"{path} config.json`) and pass that file or its directory to --model."
        ) from error


def quant_state_shapes(numel: int, blocksize: int, double_quant: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
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


def packed_shape(numel: int, storage: torch.dtype) -> tuple[int, int]:
    """bitsandbytes packs two 4-bit values per byte into a (bytes / itemsize, 1) tensor of `storage`."""
    return ((numel + 1) // (storage.itemsize * 2), 1)


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

    from .model import Linear4bitSpec, QuantizedLayout, apply_quantized_layout, attach_lora, meta_base, prepare_for_kbit_training, quantization_config

    base = meta_base(cfg, config)
    # transformers' own replacement decides which linears become 4-bit, as in from_pretrained.
    AutoHfQuantizer.from_config(quantization_config(cfg, policy)).preprocess_model(base, device_map={"": "cpu"})
    layout = QuantizedLayout({
        name: Linear4bitSpec(
            in_features=module.in_features,
            out_features=module.out_features,
            bias=module.bias is not None,
            packed_shape=packed_shape(module.in_features * module.out_features, policy.quant_storage),
            quant_state_shapes=quant_state_shapes(
                module.in_features * module.out_features, module.weight.blocksize, cfg.quant.double_quant
            ),
        )
        for name, module in base.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    })
    apply_quantized_layout(base, cfg, policy, layout)
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
    config: object
    shape: ModelShape | None
    """What the activations depend on; None with `unmodelled` saying why."""
    unmodelled: str = ""

    @property
    def trainable(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.trainable]


def describe_model(cfg: RunConfig, policy: DtypePolicy, config) -> ModelSpec:
    skeleton = build_skeleton(cfg, policy, config)
    base = skeleton.get_base_model()
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    modules = dict(skeleton.named_modules())
    layers = [name for name, m in modules.items() if type(m).__name__ in layer_classes]

    def layer_of(module_name: str) -> str:
        return next((layer for layer in layers if module_name.startswith(layer + ".")), "")

    tensors = []
    for name, param in skeleton.named_parameters():
        module_name, _, local = name.rpartition(".")
        tensors.append(TensorSpec(
            name=name,
            component=parameter_component(modules[module_name], local, param),
            shape=tuple(param.shape),
            dtype=param.dtype,
            trainable=param.requires_grad,
            module=module_name,
            layer=layer_of(module_name),
        ))
    quant_bytes, quantized = 0, 0
    for module in modules.values():
        if isinstance(module, bnb.nn.Linear4bit):
            numel = module.in_features * module.out_features
            quantized += numel
            for shape, dtype in quant_state_shapes(numel, module.weight.blocksize, cfg.quant.double_quant).values():
                quant_bytes += math.prod(shape) * dtype.itemsize
    buffers = {id(b): b for b in skeleton.buffers()}.values()
    try:
        shape, unmodelled = model_shape(base, modules, layers, layer_of), ""
    except ConfigError as error:
        shape, unmodelled = None, str(error)
    return ModelSpec(
        name=cfg.model.path,
        tensors=tensors,
        quant_state_bytes=quant_bytes,
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
        quantized_elements=quantized,
        config=config,
        shape=shape,
        unmodelled=unmodelled,
    )


def model_shape(base, modules: dict[str, nn.Module], layers: list[str], layer_of) -> ModelShape:
    """The decoder layers and head of the skeleton, as the activation model reads them."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    config = base.config
    if not layers:
        raise ConfigError(f"`{type(config).__name__}` declares no decoder layer class; activations are not modelled for it.")

    def site(module) -> LoraSite:
        dropout = module.lora_dropout["default"]
        return LoraSite(module.in_features, module.out_features, module.r["default"], getattr(dropout, "p", 0.0))

    specs = []
    for index, layer in enumerate(layers):
        inside = {name[len(layer) + 1:]: m for name, m in modules.items() if name.startswith(layer + ".")}
        lora = {name: site(m) for name, m in inside.items() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)}
        experts = {m.parameter_name: m.r["default"] for m in inside.values() if isinstance(m, ParamWrapper)}
        names = {name.replace(".base_layer", "") for name in inside}  # an adapted parameter wraps its module
        specs.append(describe_layer(config, names, lora, experts, config._attn_implementation, index))
    norms = [m for m in modules.values() if type(m).__name__.endswith("RMSNorm")]
    rotary = [name for name, _ in base.named_buffers() if name.endswith("inv_freq") and "original" not in name]
    return ModelShape(
        layers=specs,
        vocab=config.vocab_size,
        gemma_norms=any(type(m).__name__.startswith("Gemma") for m in norms),
        final_softcap=bool(getattr(config, "final_logit_softcapping", None)),
        rotary_sets=max(1, len(rotary)),
        lora_on_head=next((site(m) for name, m in modules.items() if isinstance(m, LoraLayer) and not layer_of(name)), None),
    )


# --- Prediction ------------------------------------------------------------------------------


@dataclass
class RankBudget:
    rank: int
    components: dict[str, int]
    host_components: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())


@dataclass
class Budget:
    cfg: RunConfig
    hardware: Hardware
    strategy: str
    mixed_precision: str
    model_params: int
    model: ModelSpec
    ranks: list[RankBudget]

    def headroom(self, rank: RankBudget) -> int | None:
        return None if self.hardware.gpu_memory is None else self.hardware.gpu_memory - rank.total_bytes

    @property
    def fits(self) -> bool | None:
        if self.hardware.gpu_memory is None:
            return None
        return all(self.headroom(r) >= 0 for r in self.ranks)

    def to_json(self) -> dict:
        h, cfg = self.hardware, self.cfg
        return {
            "schema_version": 1,
            "model": cfg.model.path,
            "model_parameters": self.model_params,
            "strategy": self.strategy,
            "world_size": h.world_size,
            "nodes": h.nodes,
            "gpus_per_node": h.world_size // h.nodes,
            "micro_batch": cfg.train.micro_batch_size,
            "seq_len": cfg.data.max_seq_len,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "mixed_precision": self.mixed_precision,
            "device": h.device,
            "optimizer": h.optimizer,
            "offload": h.offload,
            "lora": {"r": cfg.lora.r, "target_modules": cfg.lora.target_modules},
            "gpu_memory_bytes": h.gpu_memory,
            "runtime_overhead_bytes": h.runtime_overhead if h.device == "cuda" else 0,
            "components": COMPONENTS,
            "ranks": [
                {
                    "rank": r.rank,
                    "components": r.components,
                    "host_components": r.host_components,
                    "total_bytes": r.total_bytes,
                    "headroom_bytes": self.headroom(r),
                    "fits": None if self.headroom(r) is None else self.headroom(r) >= 0,
                }
                for r in self.ranks
            ],
            "fits": self.fits,
        }


class ModelCache:
    """The model's config, and the model described per storage dtypes: predictions that share the
    model, quantization and LoRA settings (qlaunch plan) build each skeleton once."""

    def __init__(self, cfg: RunConfig):
        self.config = load_model_config(cfg)
        self.specs: dict[DtypePolicy, ModelSpec] = {}

    def describe(self, cfg: RunConfig, stored: DtypePolicy) -> ModelSpec:
        if stored not in self.specs:
            self.specs[stored] = describe_model(cfg, stored, self.config)
        return self.specs[stored]


def predict(cfg: RunConfig, hardware: Hardware, activation_shape: tuple[int, int] | None = None, cache: ModelCache | None = None) -> Budget:
    """Bytes per component on every rank. `activation_shape` (batch, seq) replaces the config's micro
    batch and max_seq_len for the activations (training compares with the batch it measured)."""
    strategy = validate(cfg, hardware)
    world = hardware.world_size
    autocast = autocast_dtype(cfg, hardware.device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast, "no")
    policy = strategies.dtype_policy(cfg, strategy, mixed)
    # One process runs without any sharder, as training does.
    sharder = strategy if world > 1 else strategies.SingleProcess()
    stored = sharder.stored_policy(policy, autocast)
    compute = sharder.compute_policy(policy, autocast)
    spec = (cache or ModelCache(cfg)).describe(cfg, stored)
    if spec.shape is None:
        raise ConfigError(spec.unmodelled)
    d = ActivationDtypes(
        # Gemma's norms return their input's dtype; the others promote it with their weight's.
        stream=compute.dense if spec.shape.gemma_norms else torch.promote_types(compute.norm, compute.dense),
        dense=compute.dense, adapter=compute.adapter, experts=compute.experts,
        autocast=autocast, device=hardware.device,
    )
    batch, seq = activation_shape or (cfg.train.micro_batch_size, cfg.data.max_seq_len)
    hidden = spec.config.hidden_size
    shared = {
        **activation_bytes(spec.shape, batch, seq, cfg.train.gradient_checkpointing, d, sharder.linear_saves_input),
        "gathered_params": sharder.gathered_bytes(spec.tensors, compute, world, hidden),
        "comm_buckets": sharder.bucket_bytes(spec.trainable, autocast or compute.adapter, world, hidden),
        "runtime": hardware.runtime_overhead if hardware.device == "cuda" else 0,
    }
    ranks = []
    for rank in range(world):
        components = dict.fromkeys(COMPONENTS, 0)
        components.update(sharder.held_weights(spec.tensors, world, rank))
        components.update(quant_states=spec.quant_state_bytes, buffers=spec.buffer_bytes)
        components.update(sharder.held_optimizer(spec.trainable, world, rank))
        components.update(shared)
        host = {}
        if hardware.offload:
            host = {name: components[name] for name in OFFLOADED_COMPONENTS}
            components.update(dict.fromkeys(OFFLOADED_COMPONENTS, 0))
        ranks.append(RankBudget(rank, components, host))
    parameters = sum(t.numel for t in spec.tensors if t.component != "base_4bit") + spec.quantized_elements
    return Budget(cfg, hardware, strategy.name, mixed, parameters, spec, ranks)


# --- Output ----------------------------------------------------------------------------------


def rank_groups(columns: list[dict[str, object]]) -> list[tuple[str, int]]:
    """Consecutive ranks with identical columns, as ("rank 0" / "ranks 0-3", first rank index)."""
    groups, start = [], 0
    for i in range(1, len(columns) + 1):
        if i == len(columns) or columns[i] != columns[start]:
            groups.append((f"rank {start}" if i - 1 == start else f"ranks {start}-{i - 1}", start))
            start = i
    return groups


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in [header] + rows]
    return "\n".join(lines)


def render(budget: Budget) -> str:
    h, cfg = budget.hardware, budget.cfg
    summary = (
        f"Memory budget per rank: {cfg.model.path} ({format_count(budget.model_params)} parameters, 4-bit {cfg.quant.type}), "
        f"{budget.strategy} on {h.world_size} rank(s) ({h.nodes} node(s)), micro batch {cfg.train.micro_batch_size} x "
        f"{cfg.data.max_seq_len} tokens, checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}, "
        f"mixed precision {budget.mixed_precision}, LoRA r={cfg.lora.r}{', optimizer offloaded' if h.offload else ''}"
    )
    columns = [{**r.components, **{f"host {k}": v for k, v in r.host_components.items()}} for r in budget.ranks]
    groups = rank_groups(columns)
    names = [n for n in COMPONENTS if any(c.get(n) for c in columns)]
    rows = [[name] + [format_bytes(columns[i][name]) for _, i in groups] for name in names]
    rows.append(["total"] + [format_bytes(budget.ranks[i].total_bytes) for _, i in groups])
    host_names = sorted({k for r in budget.ranks for k in r.host_components})
    rows += [[f"host RAM: {n}"] + [format_bytes(budget.ranks[i].host_components[n]) for _, i in groups] for n in host_names]
    if h.gpu_memory is not None:
        rows.append(["GPU memory"] + [format_bytes(h.gpu_memory)] * len(groups))
        rows.append(["headroom"] + [format_bytes(budget.headroom(budget.ranks[i])) for _, i in groups])
    lines = [summary, "", render_table(["component"] + [g for g, _ in groups], rows)]
    if budget.fits is not None:
        worst = min(budget.ranks, key=lambda r: budget.headroom(r))
        verdict = "FITS" if budget.fits else "DOES NOT FIT"
        lines += ["", f"{verdict}: the fullest rank ({worst.rank}) needs {format_bytes(worst.total_bytes)} of "
                  f"{format_bytes(h.gpu_memory)} ({format_bytes(budget.headroom(worst))} headroom)."]
    return "\n".join(lines)


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ConfigError(
            "Plotting needs matplotlib, which is not installed. Install the `plot` extra: "
            "pip install 'qlora-launcher[plot]' (or pip install matplotlib)."
        ) from error
    return plt


def plot_stacked(path: Path, bars: list[tuple[str, dict[str, int]]], title: str, limit: int | None = None) -> None:
    """Stacked bars (one per label) of component bytes."""
    plt = require_matplotlib()
    tallest = max([sum(b.values()) for _, b in bars] + [limit or 0])
    unit, scale = next(((u, size) for u, size in BINARY_UNITS if tallest >= size), ("B", 1))
    names = [n for n in COMPONENTS if any(b.get(n) for _, b in bars)]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars) + 3), 5))
    bottoms = [0.0] * len(bars)
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        heights = [b.get(name, 0) / scale for _, b in bars]
        ax.bar(range(len(bars)), heights, bottom=bottoms, label=name, color=colors[i % len(colors)])
        bottoms = [x + y for x, y in zip(bottoms, heights)]
    if limit is not None:
        ax.axhline(limit / scale, color="black", linestyle="--", label="GPU memory")
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=30 if len(bars) > 6 else 0)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(budget: Budget, path: Path) -> None:
    plot_stacked(
        path,
        [(f"rank {r.rank}", r.components) for r in budget.ranks],
        f"{budget.cfg.model.path}: {budget.strategy}, {budget.hardware.world_size} rank(s), "
        f"{budget.cfg.train.micro_batch_size}x{budget.cfg.data.max_seq_len} tokens",
        budget.hardware.gpu_memory,
    )


