"""Every difference between FSDP2, FSDP1, ZeRO-2, ZeRO-3 and DDP lives in this module.

A strategy decides four things, and the train loop asks it through this small interface:
  * which dtypes the 4-bit storage, norms, embeddings and adapters use (`dtype_policy`);
  * how Accelerate is configured for it (`plugins`, `install_on_cpu`);
  * how each rank gets the source rank's weights around `accelerator.prepare`
    (`before_prepare`, `after_prepare`);
  * which tensors each rank owns after sharding (`local_shards`), for the reports and checks.
The memory budget (launcher.budget) asks it the same questions before any tensor exists: how many
bytes of each parameter, gradient and optimizer state a rank holds, padding included
(`held_weights`, `held_gradients`, `held_optimizer`), which dtypes parameters are stored and
computed in, and what it gathers and buffers while training (`gathered_bytes`, `bucket_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import sync
from .config import STRATEGIES, ConfigError, RunConfig


@dataclass(frozen=True)
class DtypePolicy:
    quant_storage: torch.dtype
    """dtype the packed 4-bit bytes are viewed as; a float dtype so every sharder treats it as a weight."""
    norm: torch.dtype
    dense: torch.dtype
    """Frozen unquantized weights the hidden states meet without a cast: embeddings, lm_head, MoE routers."""
    adapter: torch.dtype
    bias: torch.dtype
    """Biases of the 4-bit linears. bitsandbytes recasts a bias to the compute dtype inside every forward
    (`bias.data = ...`), which a sharded parameter must not see: they are kept in that dtype where they can be."""
    experts: torch.dtype
    """Fused 3D MoE expert weights (bitsandbytes quantizes nn.Linear only); transformers casts the
    input to their dtype, so they can stay in the compute dtype."""

    def of(self, component: str) -> torch.dtype | None:
        """The dtype of a frozen or adapter weight by its budget component (None: packed 4-bit bytes)."""
        return {"norms": self.norm, "frozen_dense": self.dense, "lora": self.adapter, "biases": self.bias, "experts": self.experts}.get(component)

    def cast_to(self, dtype: torch.dtype) -> DtypePolicy:
        """Every weight but the packed 4-bit bytes in `dtype` (what a mixed-precision cast of all parameters does)."""
        return dataclasses.replace(self, norm=dtype, dense=dtype, adapter=dtype, bias=dtype, experts=dtype)


@dataclass
class LocalShard:
    """The part of one parameter a rank holds: elements [start, start + numel) of the flattened full tensor."""

    name: str
    local: torch.Tensor
    start: int
    full_numel: int
    trainable: bool


@dataclass(frozen=True)
class TensorSpec:
    """One parameter as the memory budget sees it before any rank holds it."""

    name: str
    component: str
    """Budget component it belongs to (launcher.budget.COMPONENTS)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool
    module: str
    """Path of the module that owns it."""
    layer: str
    """Path of the decoder layer that holds it, "" outside the layers (FSDP wraps each layer on its own)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


ADAM_STATES = 2
"""AdamW keeps two moments per parameter element, in the parameter's dtype."""
MASTER_DTYPE = torch.float32
"""dtype of DeepSpeed's master copies and of the gradients its optimizer steps with."""
OPTIMIZER_STATE_COMPONENTS = ("gradients", "master_weights", "optimizer_states")


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(rows this rank holds, rows its storage has) when dim 0 is split like torch.chunk and every
    rank's part is padded to the first part's size (FSDP2's layout)."""
    per_rank = -(-rows // world)
    return max(0, min(per_rank, rows - rank * per_rank)), per_rank


def split_flat(pieces: list[tuple[str, int]], itemsize: int, align: int, pad_to: int, world: int, rank: int) -> dict[str, int]:
    """Bytes per component that `rank` holds of one flat buffer built from `pieces` (component,
    elements): each piece starts at a multiple of `align` elements, the whole is padded to a multiple
    of `pad_to`, then cut into `world` equal parts. Gaps count as "shard_padding"."""
    spans, end = [], 0
    for component, numel in pieces:
        end += -end % align
        spans.append((component, end, end + numel))
        end += numel
    end += -end % pad_to
    part = -(-end // world)
    lo, hi = rank * part, (rank + 1) * part
    held = {"shard_padding": part * itemsize}
    for component, start, stop in spans:
        overlap = max(0, min(hi, stop) - max(lo, start)) * itemsize
        held[component] = held.get(component, 0) + overlap
        held["shard_padding"] -= overlap
    return held


def _whole(tensors: list[TensorSpec]) -> dict[str, int]:
    held: dict[str, int] = {}
    for t in tensors:
        held[t.component] = held.get(t.component, 0) + t.numel * t.itemsize
    return held


def _add(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value
    return total


def _bytes_as(t: TensorSpec, policy: DtypePolicy) -> int:
    """Bytes of `t` when held in `policy`'s dtypes (packed 4-bit bytes keep their size in any view)."""
    dtype = policy.of(t.component)
    return t.numel * (dtype.itemsize if dtype else t.itemsize)


def _units(tensors: list[TensorSpec], unit_of) -> dict[str, list[TensorSpec]]:
    units: dict[str, list[TensorSpec]] = {}
    for t in tensors:
        units.setdefault(unit_of(t), []).append(t)
    return units


def _root_and_two_layers(tensors: list[TensorSpec], compute: DtypePolicy) -> int:
    """What FSDP keeps gathered: the root unit (embeddings, final norm, lm_head) from forward through
    backward, the layer that runs and the next one, prefetched; all in their compute dtypes."""
    units = _units(tensors, lambda t: t.layer)
    full = {unit: sum(_bytes_as(t, compute) for t in members) for unit, members in units.items()}
    root = full.pop("", 0)
    return root + 2 * max(full.values(), default=0)


class Strategy:
    name: ClassVar[str]
    checkpoint_format: ClassVar[str] = "dcp"
    """"dcp" (torch.distributed.checkpoint, reshardable) or "deepspeed" (DeepSpeed's own, per world size)."""
    shards_base: ClassVar[bool]
    """The frozen base weights are split across ranks."""
    shards_adapter_state: ClassVar[bool]
    """Adapter gradients and optimizer states are split across ranks."""

    @property
    def accelerate_config(self) -> str:
        return f"{self.name}.yaml"

    def refusal(self, cfg: RunConfig) -> str | None:
        """Why this strategy cannot run `cfg`, or None: checked before any process starts."""
        return None

    def check(self, cfg: RunConfig) -> None:
        reason = self.refusal(cfg)
        if reason:
            working = ", ".join(name for name, cls in BY_NAME.items() if not cls().refusal(cfg))
            raise ConfigError(f"{self.name} cannot run this config: {reason}. Strategies that can: {working}.")

    def dtype_policy(self, compute_dtype: torch.dtype, mixed_precision: bool) -> DtypePolicy:
        # FSDP2 and ZeRO shard each tensor on its own, so dtypes may differ: the packed 4-bit data is
        # stored as the compute dtype (a float dtype, which FSDP2 and ZeRO-3 shard and cast without
        # touching the bits, since the cast to the compute dtype is a no-op), norms and adapters stay
        # fp32. Embeddings and lm_head take the compute dtype under mixed precision (autocast bridges
        # the fp32 activations) and fp32 without it, where lm_head must match the fp32 hidden states.
        dense = compute_dtype if mixed_precision else torch.float32
        return DtypePolicy(
            quant_storage=compute_dtype, norm=torch.float32, dense=dense, adapter=torch.float32,
            bias=compute_dtype, experts=compute_dtype,
        )

    def plugins(self, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
        """Keyword arguments for `Accelerator(...)`: the plugin this strategy runs under, if any."""
        return {}

    def install_on_cpu(self, accelerator, plugins: dict[str, Any]) -> None:
        """CPU shim: on a machine without CUDA, Accelerate only offers DDP over gloo (see distributed.py)."""

    def before_prepare(self, model: nn.Module, accelerator) -> Any:
        sync.broadcast_quant_states(model, accelerator.device)
        return None

    def after_prepare(self, model: nn.Module, accelerator, handoff: Any) -> None:
        pass

    def shard(self, model: nn.Module, make_optimizer, accelerator):
        """Wraps the model for this strategy; every rank ends with its shard of the source rank's weights."""
        handoff = self.before_prepare(model, accelerator)
        optimizer = make_optimizer(model)
        model, prepared_optimizer = accelerator.prepare(model, optimizer)
        self.after_prepare(model, accelerator, handoff)
        return model, prepared_optimizer, optimizer

    def local_shards(self, model: nn.Module) -> Iterator[LocalShard]:
        for name, param in model.named_parameters():
            yield LocalShard(name, param.detach(), 0, param.numel(), param.requires_grad)

    def trainable_fqns(self, model: nn.Module) -> set[str]:
        return {clean_fqn(n) for n, p in model.named_parameters() if p.requires_grad}

    def save_trainable(self, model: nn.Module, optimizer, directory) -> None:
        """Adapter and optimizer state, each rank writing its own shards (a collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._trainable_state(model, optimizer), checkpoint_id=str(directory))

    def load_trainable(self, model: nn.Module, optimizer, directory) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._trainable_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(
            model, torch_optimizer(optimizer),
            model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=False),
        )

    def _trainable_state(self, model, optimizer) -> dict:
        """The adapter (and nothing of the frozen base) and its optimizer state, keyed by parameter name."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optimizer_state = get_state_dict(
            model, torch_optimizer(optimizer), options=StateDictOptions(ignore_frozen_params=True)
        )
        trainable = self.trainable_fqns(model)
        # bitsandbytes adds its quantization constants to the state dict as extra, non-parameter entries.
        return {"model": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optimizer_state}

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full values of the trainable parameters, on CPU (a collective: every rank calls it)."""
        return {clean_fqn(n): p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    # Prediction (launcher.budget). The defaults describe one whole copy on every rank (DDP, one process).

    def stored_policy(self, policy: DtypePolicy, mixed_precision: torch.dtype | None) -> DtypePolicy:
        """dtypes the parameters are stored in while training (`mixed_precision`: the autocast dtype, or None)."""
        return policy

    def compute_policy(self, policy: DtypePolicy, mixed_precision: torch.dtype | None) -> DtypePolicy:
        """dtypes the parameters have inside forward and backward."""
        return self.stored_policy(policy, mixed_precision)

    linear_saves_input: ClassVar[bool] = False
    """Every nn.Linear saves its input for backward, even when its weight is frozen."""

    def held_weights(self, tensors: list[TensorSpec], world: int, rank: int) -> dict[str, int]:
        return _whole(tensors)

    def held_gradients(self, trainable: list[TensorSpec], world: int, rank: int) -> int:
        return sum(t.numel * t.itemsize for t in trainable)

    def held_optimizer(self, trainable: list[TensorSpec], world: int, rank: int) -> dict[str, int]:
        """Gradients the optimizer steps with, master copies it updates, its states (AdamW)."""
        return {
            "gradients": self.held_gradients(trainable, world, rank),
            "master_weights": 0,
            "optimizer_states": ADAM_STATES * sum(t.numel * t.itemsize for t in trainable),
        }

    def gathered_bytes(self, tensors: list[TensorSpec], compute: DtypePolicy, world: int, hidden_size: int) -> int:
        """Full parameters gathered from the other ranks while a forward or backward runs."""
        return 0

    def bucket_bytes(self, trainable: list[TensorSpec], grad_dtype: torch.dtype, world: int, hidden_size: int) -> int:
        """Gradient communication buffers."""
        return 0


class _Replicated(Strategy):
    """Every rank holds the whole base: the source rank's weights are broadcast before wrapping."""

    def before_prepare(self, model, accelerator):
        sync.materialize_and_broadcast(sync.shared_tensors(model), accelerator.device)
        return super().before_prepare(model, accelerator)


class DDP(_Replicated):
    name = "ddp"
    shards_base = False
    shards_adapter_state = False

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        # DDP's reducer keeps flat buckets covering every trainable parameter besides `.grad`
        # (Accelerate leaves gradient_as_bucket_view off).
        return sum(t.numel for t in trainable) * grad_dtype.itemsize


class FSDP2(Strategy):
    name = "fsdp2"
    shards_base = True
    shards_adapter_state = True

    def plugins(self, cfg, device):
        from accelerate.utils import FullyShardedDataParallelPlugin

        # Accelerate's own low-memory loading skips models with 4-bit weights; after_prepare does it.
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=False)}

    def install_on_cpu(self, accelerator, plugins):
        from accelerate.utils import DistributedType

        from .distributed import set_shared_state

        set_shared_state(accelerator, distributed_type=DistributedType.FSDP)
        accelerator.state.fsdp_plugin = plugins["fsdp_plugin"]

    def shard(self, model, make_optimizer, accelerator):
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        model, prepared_optimizer, optimizer = super().shard(model, make_optimizer, accelerator)
        # Accelerate maps the optimizer onto the sharded parameters by data pointer, which is 0 for
        # every meta tensor on non-source ranks; map by name instead (the optimizer state is empty).
        params = dict(model.named_parameters())
        optimizer.param_groups[0]["params"] = [params[name] for name in trainable]
        return model, prepared_optimizer, optimizer

    def before_prepare(self, model, accelerator):
        super().before_prepare(model, accelerator)
        # fully_shard keeps only this rank's chunk of each parameter; keep the source's full tensors to scatter.
        return {name: p.detach() for name, p in model.named_parameters()} if sync.is_source_rank() else None

    def after_prepare(self, model, accelerator, handoff):
        if dist.get_world_size() == 1:
            return
        if not sync.is_source_rank():
            model.to_empty(device=accelerator.device)
        for name, param in model.named_parameters():
            full = handoff[name] if handoff is not None else None
            sync.scatter_rows_(param.to_local(), full, param.shape[0])
        sync.materialize_and_broadcast(sync.shared_tensors(model, buffers_only=True), accelerator.device)

    def gather_trainable(self, model):
        return {n: p.full_tensor().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def local_shards(self, model):
        world, rank = dist.get_world_size(), dist.get_rank()
        for name, param in model.named_parameters():
            local = param.to_local().detach()
            rows_per_rank = -(-param.shape[0] // world)
            row_numel = param[0].numel() if param.dim() > 1 else 1
            yield LocalShard(name, local, rank * rows_per_rank * row_numel, param.numel(), param.requires_grad)

    def compute_policy(self, policy, mixed_precision):
        # Accelerate's FSDP2 mixed-precision policy gathers every parameter in the autocast dtype.
        if mixed_precision is None:
            return policy
        return policy.cast_to(mixed_precision)

    @staticmethod
    def _rows(t: TensorSpec, world: int, rank: int) -> tuple[int, int, int]:
        """(rows held, rows stored, elements per row) of this rank's dim-0 chunk, padded like fully_shard."""
        rows = t.shape[0] if t.shape else 1
        held, stored = chunk_rows(rows, world, rank)
        return held, stored, t.numel // rows if rows else 0

    def held_weights(self, tensors, world, rank):
        held: dict[str, int] = {"shard_padding": 0}
        for t in tensors:
            rows, stored, row_numel = self._rows(t, world, rank)
            _add(held, {t.component: rows * row_numel * t.itemsize, "shard_padding": (stored - rows) * row_numel * t.itemsize})
        return held

    def held_gradients(self, trainable, world, rank):
        # Each layer's reduce-scatter output is one padded flat buffer; the gradients are views of it,
        # cast back to the stored dtype (one whole cast under mixed precision).
        total = 0
        for t in trainable:
            _, stored, row_numel = self._rows(t, world, rank)
            total += stored * row_numel * t.itemsize
        return total

    def held_optimizer(self, trainable, world, rank):
        held = super().held_optimizer(trainable, world, rank)
        # AdamW's moments are `zeros_like` the unpadded local shard.
        held["optimizer_states"] = 0
        for t in trainable:
            rows, _, row_numel = self._rows(t, world, rank)
            held["optimizer_states"] += ADAM_STATES * rows * row_numel * t.itemsize
        return held

    def gathered_bytes(self, tensors, compute, world, hidden_size):
        return _root_and_two_layers(tensors, compute)

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        # The reduce-scatter input: one layer's full gradients.
        per_layer = _units(trainable, lambda t: t.layer)
        return max((sum(t.numel for t in members) * grad_dtype.itemsize for members in per_layer.values()), default=0)


class FSDP1(Strategy):
    name = "fsdp1"
    shards_base = True
    shards_adapter_state = True

    def dtype_policy(self, compute_dtype, mixed_precision):
        # FSDP1 flattens each unit into one tensor of one dtype, and its mixed-precision cast of that
        # tensor would rewrite packed 4-bit bytes stored in another dtype. So everything is fp32
        # (norms stay safe, the packed bytes are only viewed as fp32) and FSDP1 casts no parameters;
        # bf16 compute comes from autocast and from the 4-bit compute dtype instead.
        return DtypePolicy(*[torch.float32] * len(dataclasses.fields(DtypePolicy)))

    def plugins(self, cfg, device):
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecision

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            use_orig_params=True,
            cpu_ram_efficient_loading=False,
            sync_module_states=False,
            mixed_precision_policy=MixedPrecision(param_dtype=None, reduce_dtype=None, buffer_dtype=None),
        )
        # Ranks other than the source hold meta tensors: FSDP1 allocates them on the device and
        # broadcasts the source rank's values (set after construction so that Accelerate does not
        # look for a GPU to allocate on; `device` is this rank's device on CUDA and on CPU).
        plugin.sync_module_states = True
        plugin.param_init_fn = lambda module: module.to_empty(device=device, recurse=False)
        return {"fsdp_plugin": plugin}

    install_on_cpu = FSDP2.install_on_cpu

    def refusal(self, cfg):
        if cfg.lora.target_parameters:
            # Measured: `RuntimeError: shape '[4, -1, 4096]' is invalid` in peft's get_delta_factors.
            return (
                "peft's LoRA on parameters (lora.target_parameters) reads the adapter weights outside their modules' "
                "forward, where FSDP1 holds only this rank's flat shard of them"
            )
        return None

    def shard(self, model, make_optimizer, accelerator):
        from .distributed import fsdp1_cpu_sync_allowed

        # FSDP1 replaces parameters with flat ones: the optimizer is built on the wrapped model.
        self.before_prepare(model, accelerator)
        with fsdp1_cpu_sync_allowed() if accelerator.device.type == "cpu" else contextlib.nullcontext():
            model = accelerator.prepare(model)
        optimizer = make_optimizer(model)
        return model, accelerator.prepare(optimizer), optimizer

    def gather_trainable(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        out = {}
        for unit in FSDP.fsdp_modules(model):
            if unit._handle is None or not unit._handle.flat_param.requires_grad:
                continue
            prefix = _module_path(model, unit._fsdp_wrapped_module)
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                for name, param in unit._fsdp_wrapped_module.named_parameters():
                    if param.requires_grad and "_fsdp_wrapped_module" not in name:
                        out[clean_fqn(prefix + name)] = param.detach().cpu().clone()
        return out

    def before_prepare(self, model, accelerator):
        from peft.utils.other import fsdp_auto_wrap_policy

        super().before_prepare(model, accelerator)
        # Each LoRA matrix is its own FSDP unit, so adapter states split evenly and the frozen
        # units hold frozen weights only.
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)

    def local_shards(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for unit in FSDP.fsdp_modules(model):
            handle = unit._handle
            if handle is None:
                continue
            flat = handle.flat_param
            for fqn, info, numel in zip(flat._fqns, flat._shard_param_infos, flat._numels):
                if not info.in_shard:
                    continue
                prefix = unit._fsdp_wrapped_module
                name = clean_fqn(_module_path(model, prefix) + fqn)
                local = flat.detach()[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard]
                yield LocalShard(name, local, info.intra_param_start_idx, numel, flat.requires_grad)

    @staticmethod
    def _unit(t: TensorSpec) -> str:
        # before_prepare's wrap policy: each LoRA matrix, each decoder layer, and the root for the rest.
        return t.module if t.trainable else t.layer

    def _flat_parts(self, tensors: list[TensorSpec], world: int, rank: int) -> Iterator[tuple[list[TensorSpec], dict[str, int]]]:
        """Each unit's tensors and this rank's bytes of its flat parameter: every tensor starts at a
        16-byte boundary (use_orig_params), the whole is padded to a multiple of the world size."""
        for members in _units(tensors, self._unit).values():
            itemsize = members[0].itemsize
            pieces = [(t.component, t.numel) for t in members]
            yield members, split_flat(pieces, itemsize, 16 // itemsize, world, world, rank)

    def held_weights(self, tensors, world, rank):
        held: dict[str, int] = {}
        for _, part in self._flat_parts(tensors, world, rank):
            _add(held, part)
        return held

    def held_gradients(self, trainable, world, rank):
        return sum(sum(part.values()) for _, part in self._flat_parts(trainable, world, rank))

    def held_optimizer(self, trainable, world, rank):
        held = super().held_optimizer(trainable, world, rank)
        # AdamW's moments are `zeros_like` each parameter's view into the local flat shard.
        held["optimizer_states"] = ADAM_STATES * sum(
            part.get("lora", 0) for _, part in self._flat_parts(trainable, world, rank)
        )
        return held

    def gathered_bytes(self, tensors, compute, world, hidden_size):
        # As FSDP2 (the running layer and the prefetched one each with their LoRA units).
        return _root_and_two_layers(tensors, compute)

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        return max((t.numel * t.itemsize for t in trainable), default=0)


class _ZeRO(Strategy):
    stage: ClassVar[int]
    checkpoint_format = "deepspeed"
    TAG = "zero"

    def save_trainable(self, model, optimizer, directory):
        # DeepSpeed's own format: each rank writes its optimizer partition. Its `latest` file is not
        # written: checkpoint.py names a checkpoint only after every rank has finished.
        with sync.quant_states_hidden_from_state_dict(model):
            model.save_checkpoint(str(directory), tag=self.TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_trainable(self, model, optimizer, directory):
        path, _ = model.load_checkpoint(
            str(directory), tag=self.TAG, load_module_strict=False, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}.")

    @property
    def accelerate_config(self):
        return f"zero{self.stage}.yaml"

    def plugins(self, cfg, device):
        from accelerate.utils import DeepSpeedPlugin

        # zero3_init_flag off: transformers never builds a quantized model under zero.Init; this
        # launcher partitions it module by module instead (ZeRO3.before_prepare).
        plugin = DeepSpeedPlugin(zero3_init_flag=False)
        ds = plugin.deepspeed_config
        # The run config is the single source of these values; the shipped JSON says "auto".
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum_steps
        ds["gradient_clipping"] = cfg.train.max_grad_norm
        ds.pop("train_batch_size", None)
        if ds.get("zero_optimization", {}).get("stage") != self.stage:
            raise ConfigError(
                f"The DeepSpeed config says ZeRO stage {ds.get('zero_optimization', {}).get('stage')} but the "
                f"strategy is {self.name}. Use ds_configs/{self.name}.json or set the matching strategy."
            )
        return {"deepspeed_plugin": plugin}

    @classmethod
    def shipped_zero_config(cls) -> dict[str, Any]:
        """The `zero_optimization` section of the shipped DeepSpeed config for this stage."""
        from .launch import shipped_dir

        return json.loads((shipped_dir("ds_configs") / f"{cls.name}.json").read_text())["zero_optimization"]

    def stored_policy(self, policy, mixed_precision):
        # Under bf16/fp16 DeepSpeed casts every parameter to that dtype (it keeps fp32 master copies).
        if mixed_precision is None:
            return policy
        return policy.cast_to(mixed_precision)

    def _reduce_bucket_elements(self, hidden_size: int) -> int:
        size = self.shipped_zero_config().get("reduce_bucket_size", "auto")
        # Accelerate fills "auto" with hidden_size squared.
        return hidden_size * hidden_size if size == "auto" else int(size)

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        # The contiguous reduce bucket, allocated whole at the first backward.
        return self._reduce_bucket_elements(hidden_size) * grad_dtype.itemsize

    @staticmethod
    def _fp32_partition(numel: int) -> dict[str, int]:
        """What DeepSpeed's optimizer holds for a partition of `numel` trainable elements: fp32 gradients,
        master copies and AdamW moments."""
        partition = numel * MASTER_DTYPE.itemsize
        return {"gradients": partition, "master_weights": partition, "optimizer_states": ADAM_STATES * partition}

    def install_on_cpu(self, accelerator, plugins):
        from accelerate.utils import DistributedType

        from .distributed import set_shared_state

        plugin = plugins["deepspeed_plugin"]
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        accelerator.state.deepspeed_plugins = plugin
        set_shared_state(accelerator, distributed_type=DistributedType.DEEPSPEED)
        accelerator.deepspeed_engine_wrapped = None


class ZeRO2(_ZeRO, _Replicated):
    name = "zero2"
    stage = 2
    shards_base = False
    shards_adapter_state = True

    @staticmethod
    def _flat(trainable: list[TensorSpec], world: int) -> tuple[int, int]:
        """(elements of the flat trainable buffer, elements of each rank's partition): the
        parameters back to back, padded to a multiple of 2 x world size (4-byte NCCL alignment)."""
        numel = sum(t.numel for t in trainable)
        numel += -numel % (2 * world)
        return numel, numel // world

    def held_weights(self, tensors, world, rank):
        trainable = [t for t in tensors if t.trainable]
        held = _whole(tensors)
        # The trainable parameters become views of one flat buffer, whole on every rank.
        if trainable:
            held["shard_padding"] = (self._flat(trainable, world)[0] - sum(t.numel for t in trainable)) * trainable[0].itemsize
        return held

    def held_optimizer(self, trainable, world, rank):
        return self._fp32_partition(self._flat(trainable, world)[1])


class ZeRO3(_ZeRO):
    name = "zero3"
    stage = 3
    shards_base = True
    shards_adapter_state = True

    def before_prepare(self, model, accelerator):
        import deepspeed

        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # ZeRO-3's own path: `zero.Init(module=...)` broadcasts each module's parameters from rank 0
        # and keeps this rank's partition. One module at a time, so a non-source rank allocates at
        # most one module's full weights before partitioning frees them.
        # A tied weight is converted once, with its first module; later owners already hold it partitioned.
        pending = {id(shared.tensor): shared for shared in sync.shared_tensors(model) if shared.is_parameter}
        for module in model.modules():
            if not module._parameters:
                continue
            mine = [pending.pop(id(p)) for p in module.parameters() if id(p) in pending]
            sync.materialize_empty(mine, accelerator.device)
            deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
        sync.materialize_and_broadcast(sync.shared_tensors(model, buffers_only=True), accelerator.device)
        # Last, so the constants attach to the partitioned weight objects.
        return super().before_prepare(model, accelerator)

    def gather_trainable(self, model):
        import deepspeed

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in trainable}

    def local_shards(self, model):
        rank = dist.get_rank()
        for name, param in model.named_parameters():
            part = param.ds_tensor.detach()
            yield LocalShard(name, part, rank * part.numel(), param.ds_numel, param.requires_grad)

    linear_saves_input = True
    """zero.Init replaces torch.nn.functional.linear with a version that saves its input and weight."""

    def held_weights(self, tensors, world, rank):
        held: dict[str, int] = {"shard_padding": 0}
        for t in tensors:
            # Each parameter is flattened and padded to a multiple of the world size; the optimizer
            # later moves the trainable partitions into one flat buffer, back to back.
            valid, stored = chunk_rows(t.numel, world, rank)
            _add(held, {t.component: valid * t.itemsize, "shard_padding": (stored - valid) * t.itemsize})
        return held

    def held_optimizer(self, trainable, world, rank):
        return self._fp32_partition(sum(chunk_rows(t.numel, world, rank)[1] for t in trainable))

    def gathered_bytes(self, tensors, compute, world, hidden_size):
        zero = self.shipped_zero_config()
        threshold = zero.get("stage3_param_persistence_threshold", "auto")
        threshold = 10 * hidden_size if threshold == "auto" else int(threshold)
        # Parameters under the persistence threshold stay gathered after their first use; the others
        # are gathered module by module and released once reused, at most max_live_parameters at once.
        persistent = sum(_bytes_as(t, compute) for t in tensors if t.numel < threshold)
        others = [t for t in tensors if t.numel >= threshold]
        numel = sum(t.numel for t in others)
        live = min(numel, int(zero.get("stage3_max_live_parameters", 1e9)))
        return persistent + (sum(_bytes_as(t, compute) for t in others) * live // numel if numel else 0)


class SingleProcess(Strategy):
    """One process: nothing to shard or synchronize (the run keeps its strategy's dtype policy).
    The budget predicts a world size of 1 with it too, as training runs it."""

    name = "single"
    shards_base = False
    shards_adapter_state = False


def dtype_policy(cfg: RunConfig, strategy: Strategy, mixed_precision: str) -> DtypePolicy:
    from .model import DTYPE_BY_NAME

    policy = strategy.dtype_policy(DTYPE_BY_NAME[cfg.quant.compute_dtype], mixed_precision != "no")
    if cfg.quant.storage_dtype == "auto":
        return policy
    wanted = DTYPE_BY_NAME[cfg.quant.storage_dtype]
    if isinstance(strategy, FSDP1) and wanted != policy.quant_storage:
        raise ConfigError(
            f"`quant.storage_dtype: {cfg.quant.storage_dtype}` cannot be sharded by fsdp1, which needs one dtype per "
            "unit (float32 here). Use `quant.storage_dtype: auto`."
        )
    return dataclasses.replace(policy, quant_storage=wanted)


BY_NAME: dict[str, type[Strategy]] = {cls.name: cls for cls in (FSDP2, FSDP1, ZeRO2, ZeRO3, DDP)}
assert tuple(BY_NAME) == STRATEGIES


def get(name: str) -> Strategy:
    if name not in BY_NAME:
        raise ConfigError(f"Unknown strategy `{name}`. Choose one of: {', '.join(STRATEGIES)}.")
    return BY_NAME[name]()


def from_accelerate_env() -> str | None:
    """The strategy the running `accelerate launch` config asks for, or None if it names none."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and os.path.isfile(config_file):
            with open(config_file) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage", stage)
        if str(stage) in ("2", "3"):
            return f"zero{stage}"
        raise ConfigError(f"The DeepSpeed config asks for ZeRO stage {stage}; this launcher runs stages 2 and 3.")
    # `accelerate launch` always sets ACCELERATE_MIXED_PRECISION; with neither FSDP nor DeepSpeed and
    # several processes, its config asks for plain data parallelism.
    if "ACCELERATE_MIXED_PRECISION" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "ddp"
    return None


def resolve(cfg: RunConfig) -> Strategy:
    """The run's strategy: the accelerate config's and the run config's must agree when both are set."""
    launched = from_accelerate_env()
    wanted = cfg.strategy or None
    if wanted is not None and wanted not in BY_NAME:
        get(wanted)
    if launched and wanted and launched != wanted:
        raise ConfigError(
            f"The run config asks for strategy `{wanted}` but `accelerate launch` was given a config for "
            f"`{launched}`. Use accelerate_configs/{get(wanted).accelerate_config}, or drop `strategy` from the "
            "run config to follow the accelerate config."
        )
    return get(launched or wanted or "fsdp2")


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found in model")


def clean_fqn(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (FSDP1 units, DDP's `module.`)."""
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    name = name.replace(f"{FSDP_WRAPPED_MODULE}.", "")
    return name[len("module."):] if name.startswith("module.") else name


def torch_optimizer(optimizer):
    """The torch optimizer inside Accelerate's and DeepSpeed's wrappers."""
    while not type(optimizer).__module__.startswith("torch.optim"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_numel(optimizer) -> int:
    """Elements of optimizer state (e.g. Adam's two moments) this rank holds."""
    optimizer = torch_optimizer(optimizer)
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel()
    return total
