"""Prediction: the bytes of every component on every rank, from the run config and the hardware alone.

Static components (weights, quantization constants, LoRA, gradients, master copies, optimizer
states) are exact to the byte: the strategy says what each rank holds of every tensor of the meta
skeleton (launcher.memory.skeleton). Activations follow what each part of each decoder layer saves
(launcher.memory.activations). Gathered parameters, communication buckets and the runtime allowance
are estimates from the libraries' documented behaviour: see README, "Memory budget".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import strategies
from ..config import ConfigError, RunConfig
from ..dtypes import AUTOCAST_DTYPES, cpu_has_native_bf16, resolve_compute_dtype, resolve_mixed_precision
from ..objectives import sequences_per_sample
from ..run import sequence_parallel
from ..run.sequence_parallel import local_tokens
from ..strategies.param_groups import group_index
from ..vision import ImageInputs
from .activations import activation_bytes
from .components import COMPONENTS
from .skeleton import ModelCache, ModelSpec
from .trace import TraceRun

DEFAULT_RUNTIME_OVERHEAD = 1 << 30
"""CUDA context (~0.5 GiB with lazy module loading), NCCL's own buffers and allocator slack."""
OPTIMIZERS = ("adamw",)


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


def validate(cfg: RunConfig, hardware: Hardware) -> strategies.Strategy:
    """The run's strategy, or a ConfigError for input the budget cannot predict."""
    strategy = strategies.get(cfg.strategy or strategies.DEFAULT)
    strategies.check(strategy, cfg)
    if hardware.world_size < 1 or hardware.nodes < 1 or hardware.world_size % hardware.nodes:
        raise ConfigError(
            f"World size {hardware.world_size} on {hardware.nodes} node(s) is not a whole number of GPUs per node. "
            "Give --world-size (total GPUs), or --nodes with --gpus-per-node."
        )
    sequence_parallel.check_world(cfg.train.sequence_parallel, hardware.world_size)
    if hardware.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"Optimizer `{hardware.optimizer}` is not one the launcher trains with; it runs torch AdamW "
            f"(choose one of: {', '.join(OPTIMIZERS)})."
        )
    return strategy


@dataclass
class RankBudget:
    rank: int
    components: dict[str, int]
    host_components: dict[str, int] = field(default_factory=dict)
    """What this rank keeps in host RAM (pinned on CUDA) instead of on the GPU, per component."""

    @property
    def total_bytes(self) -> int:
        """On the GPU (host RAM not included)."""
        return sum(self.components.values())

    def held(self, name: str) -> int:
        """Bytes of a component this rank holds anywhere, GPU or host RAM: what the measurement counts."""
        return self.components[name] + self.host_components.get(name, 0)


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
            "offload": cfg.train.offload,
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
                    "host_total_bytes": sum(r.host_components.values()),
                    "headroom_bytes": self.headroom(r),
                    "fits": None if self.headroom(r) is None else self.headroom(r) >= 0,
                }
                for r in self.ranks
            ],
            "fits": self.fits,
        }


def resolve_quant(cfg: RunConfig, strategy: strategies.Strategy, mixed: str, device: str) -> RunConfig:
    """`quant.compute_dtype` and `quant.storage_dtype` as a run on `device` resolves "auto": a GPU is taken to
    have bf16 (as for mixed precision), a CPU is this one."""
    native_bf16 = device == "cuda" or cpu_has_native_bf16()
    compute = resolve_compute_dtype(cfg.quant.compute_dtype, mixed, device, native_bf16)
    return dataclasses.replace(cfg, quant=strategies.resolve_quant(cfg.quant, strategy, compute))


def budgeted_images(cfg: RunConfig, rows: int, seq: int) -> ImageInputs:
    """`data.images_per_sample` images of `data.image_size` pixels in each of `rows` rows, through the processor
    saved beside the model; a ConfigError where the model takes no images or their tokens overfill a row."""
    from ..data.images import planned_images
    from ..data.loading import load_vision_processor

    vision = load_vision_processor(cfg.model)
    if vision is None:
        raise ConfigError(
            f"`data.images_per_sample` is {cfg.data.images_per_sample}, but `{cfg.model.path}` is a text-only causal "
            "LM; budget images for a vision-language model, or leave it 0."
        )
    images = planned_images(vision, rows, cfg.data.images_per_sample, cfg.data.image_size)
    if max(images.row_tokens) > seq:
        raise ConfigError(
            f"{cfg.data.images_per_sample} image(s) of {cfg.data.image_size} px make {max(images.row_tokens)} image "
            f"tokens, more than data.max_seq_len ({seq}): raise the sequence length or lower the image count or size."
        )
    return images


def predict(
    cfg: RunConfig,
    hardware: Hardware,
    activation_shape: tuple[int, int] | None = None,
    cache: ModelCache | None = None,
    images: ImageInputs | None = None,
) -> Budget:
    """Bytes per component on every rank. `activation_shape` (batch, seq) replaces the config's micro
    batch and max_seq_len for the activations (training compares with the batch it measured), with its `images` (a
    vision-language model's micro batch)."""
    strategy = validate(cfg, hardware)
    world = hardware.world_size
    mixed = resolve_mixed_precision(cfg.train.mixed_precision, cuda=hardware.device == "cuda")
    cfg = resolve_quant(cfg, strategy, mixed, hardware.device)
    autocast = AUTOCAST_DTYPES.get(mixed)
    policy = strategies.dtype_policy(cfg.quant, strategy, mixed)
    # One process runs without any sharder, as training does.
    sharder = strategies.for_world(strategy, world)
    stored = sharder.stored_policy(policy, autocast)
    compute = sharder.compute_policy(policy, autocast)
    spec = (cache or ModelCache(cfg.model)).describe(cfg, stored)
    split = cfg.train.sequence_parallel
    sequence_parallel.check(spec.config, split, cfg.model.path, spec.skeleton)
    # A pair is two sequences (chosen, rejected) in one forward; the reference forward runs without gradient and
    # saves nothing for backward.
    sequences = sequences_per_sample(cfg.train) * cfg.train.micro_batch_size
    batch, seq = activation_shape or (sequences, local_tokens(cfg.data.max_seq_len, split))
    if activation_shape is None and cfg.data.images_per_sample:
        images = budgeted_images(cfg, batch, seq)
    hidden = spec.config.hidden_size
    run = TraceRun(
        batch=batch,
        seq=seq,
        checkpointing=cfg.train.gradient_checkpointing,
        loss_chunk=0 if spec.own_loss else cfg.train.loss_chunk_tokens,
        device=hardware.device,
        autocast=autocast,
        linear_saves_input=sharder.linear_saves_input,
        split=split,
        images=images,
    )
    shared = {
        **activation_bytes(spec, compute, run),
        "gathered_params": sharder.gathered_bytes(spec.tensors, compute, world, hidden),
        "comm_buckets": sharder.bucket_bytes(spec.trainable, autocast or compute.adapter, world, hidden),
        "runtime": hardware.runtime_overhead if hardware.device == "cuda" else 0,
    }
    groups = 2 if cfg.train.loraplus_lr_ratio else 1  # LoRA+: DeepSpeed flattens and steps each group apart
    tensors = [dataclasses.replace(t, group=group_index(t.name, groups)) if t.trainable else t for t in spec.tensors]
    trainable = [t for t in tensors if t.trainable]
    ranks = []
    for rank in range(world):
        components = dict.fromkeys(COMPONENTS, 0)
        components.update(sharder.held_weights(tensors, world, rank))
        components.update(quant_states=spec.quant_state_bytes, buffers=spec.buffer_bytes)
        components.update(sharder.held_optimizer(trainable, world, rank))
        components.update(shared)
        host = {}
        # On CPU ranks host RAM is the memory the run is measured in: nothing moves.
        if hardware.device == "cuda":
            moved = sharder.spec.offloaded(cfg.train.offload) + (
                ("activations",) if cfg.train.activation_offload else ()
            )
            host = {name: components[name] for name in moved}
            components.update(dict.fromkeys(host, 0))
        ranks.append(RankBudget(rank, components, host))
    parameters = sum(t.numel for t in spec.tensors if t.component != "base_4bit") + spec.quantized_elements
    return Budget(cfg, hardware, strategy.name, mixed, parameters, spec, ranks)
