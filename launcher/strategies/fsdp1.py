"""FSDP1 (`FullyShardedDataParallel`): each unit flattened into one tensor of one dtype, split across ranks.

One dtype per unit is FSDP1's rule, and a QLoRA layer mixes them: packed 4-bit data, biases and experts
in the compute dtype, norms (and without mixed precision the routers) in fp32, adapters in fp32. So
besides each decoder layer, every module whose weights' dtype differs from the rest of its layer is a
unit of its own (each LoRA matrix, each norm): every unit is uniform, each tensor keeps the dtype the
other strategies keep it in, and FSDP1's mixed-precision cast to the compute dtype is a no-op on the
units that hold packed 4-bit data, so their bytes are gathered untouched.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator

from .. import cpu_shims
from ..dtypes import AUTOCAST_DTYPES
from ..model.anatomy import decoder_layers, parameter_component
from .base import LocalShard, Strategy, StrategySpec, clean_fqn, module_path
from .layout import (
    ADAM_STATES,
    TensorSpec,
    add,
    parameter_specs,
    root_and_two_layers,
    split_flat,
    units,
)


def wrapped_modules(tensors: list[TensorSpec]) -> set[str]:
    """Paths of the modules FSDP1 wraps as units (the root aside): the decoder layers, every module with
    trainable weights, and every module whose frozen weights' dtype is not the one most of its layer's
    (or, outside the layers, the root's) frozen bytes have."""
    by_dtype: dict[str, Counter] = {}
    module_dtypes: dict[str, set] = {}
    # A convolution's weights are gathered with its parent: the convolution kernels of SSM and short-convolution
    # layers take `conv.weight` as an argument, outside the convolution module's forward.
    convolutions = {
        t.module for t in tensors if not t.trainable and t.component == "frozen_dense" and len(t.shape) == 3
    }
    home = {t.name: t.module.rpartition(".")[0] if t.module in convolutions else t.module for t in tensors}
    for t in tensors:
        module_dtypes.setdefault(home[t.name], set()).add(t.dtype)
        if not t.trainable:
            by_dtype.setdefault(t.layer, Counter())[t.dtype] += t.numel * t.itemsize
    main = {layer: max(sorted(counts, key=str), key=counts.__getitem__) for layer, counts in by_dtype.items()}
    own = {home[t.name] for t in tensors if t.trainable or t.dtype != main[t.layer]}
    # Inside a frozen unit of its own dtype a frozen module joins that unit: its weights are gathered with its parent's, which
    # may read them outside the module's forward (Qwen3-Next's linear attention passes `conv1d.weight` to its
    # convolution function).
    trained = {t.module for t in tensors if t.trainable}
    own = {m for m in own if m in trained or not _inside_unit_of(m, own - trained, module_dtypes)}
    mixed = sorted(m for m in own if len(module_dtypes[m]) > 1)
    if mixed:
        raise ValueError(f"FSDP1 needs one dtype per unit, and `{mixed[0]}` holds weights of several dtypes")
    # A unit of its own whose submodules hold another dtype (gpt-oss's attention: fp32 sinks beside its
    # 4-bit projections) would flatten both: those submodules become units too.
    return (
        {t.layer for t in tensors if t.layer}
        | own
        | {t.module for t in tensors if _under_unit_of_other_dtype(t, own, module_dtypes)}
    )


def _inside_unit_of(module: str, own: set[str], module_dtypes: dict[str, set]) -> bool:
    """Whether an ancestor of `module` is a unit (of `own`, frozen weights) holding only `module`'s (one) dtype."""
    parent = module.rpartition(".")[0]
    while parent:
        if parent in own and module_dtypes[parent] == module_dtypes[module] and len(module_dtypes[module]) == 1:
            return True
        parent = parent.rpartition(".")[0]
    return False


def _under_unit_of_other_dtype(t: TensorSpec, own: set[str], module_dtypes: dict[str, set]) -> bool:
    parent = t.module.rpartition(".")[0]
    while parent:
        if parent in own and t.dtype not in module_dtypes[parent]:
            return True
        parent = parent.rpartition(".")[0]
    return False


def unit_of(tensors: list[TensorSpec]) -> dict[str, str]:
    """Parameter name -> the unit whose flat parameter holds it (its innermost wrapped module, "" the root)."""
    wrapped = wrapped_modules(tensors)

    def innermost(module: str) -> str:
        while module and module not in wrapped:
            module = module.rpartition(".")[0]
        return module

    return {t.name: innermost(t.module) for t in tensors}


class FSDP1(Strategy):
    spec = StrategySpec(
        name="fsdp1",
        accelerate_config="fsdp1.yaml",
        deepspeed_config=None,
        checkpoint_format="dcp",
        reshardable_checkpoints=True,
        shards_base=True,
        shards_adapter_state=True,
        # Tried: with CPUOffload(offload_params=True) on CPU ranks FSDP1 pins buffers (no accelerator to pin
        # for), and its gradient handling branches on "gradient device != compute device", never true there: a
        # 2-rank run added the previous step's gradients into the next (grad norm 0.94 vs 0.62 resident at
        # step 2). Nothing a CPU test could check, so not offered.
        offload_note=(
            "FSDP1's CPUOffload(offload_params=True) cannot be tested on CPU ranks (its gradient offload only "
            "works where the device is not the host), so it is not offered; use fsdp2 or zero3"
        ),
    )
    # FSDP1 replaces the parameters with flat ones: the optimizer is built on the wrapped model.
    optimizer_after_wrap = True
    stores_4bit_as_compute_dtype = True
    casts_parameters = True

    def refusal(self, cfg):
        if cfg.lora.target_parameters:
            # Measured: `RuntimeError: shape '[4, -1, 4096]' is invalid` in peft's get_delta_factors.
            return (
                "peft's LoRA on parameters (lora.target_parameters) reads the adapter weights outside their modules' "
                "forward, where FSDP1 holds only this rank's flat shard of them"
            )
        if cfg.quant.storage_dtype not in ("auto", cfg.quant.compute_dtype):
            return (
                f"`quant.storage_dtype: {cfg.quant.storage_dtype}`: FSDP1 flattens a 4-bit linear's packed data "
                f"and its bias into one tensor of one dtype, the compute dtype ({cfg.quant.compute_dtype}); use auto"
                + (", or set `quant.compute_dtype` to the same dtype" if cfg.quant.compute_dtype == "auto" else "")
            )
        return None

    def plugins(self, train, device):
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecision

        # Gathered in the autocast dtype, as FSDP2 does (a no-op on the units of packed 4-bit data, stored in
        # it); buffers are left alone (Accelerate's default would cast the rotary frequencies).
        autocast = AUTOCAST_DTYPES.get(train.mixed_precision)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            use_orig_params=True,
            cpu_ram_efficient_loading=False,
            sync_module_states=False,
            mixed_precision_policy=MixedPrecision(param_dtype=autocast, reduce_dtype=autocast, buffer_dtype=None),
        )
        # Ranks other than the source hold meta tensors: FSDP1 allocates them on the device and
        # broadcasts the source rank's values (set after construction so that Accelerate does not
        # look for a GPU to allocate on; `device` is this rank's device on CUDA and on CPU).
        plugin.sync_module_states = True
        plugin.param_init_fn = lambda module: module.to_empty(device=device, recurse=False)
        return {"fsdp_plugin": plugin}

    def install_on_cpu(self, accelerator, plugins):
        cpu_shims.mark_fsdp(accelerator, plugins["fsdp_plugin"])

    def before_prepare(self, model, accelerator):
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        super().before_prepare(model, accelerator)
        # The components the budget's prediction gives them (wrapped_modules tells convolutions by theirs).
        tensors = parameter_specs(model, decoder_layers(model), parameter_component)
        names = wrapped_modules(tensors)
        wrapped = {id(module) for name, module in model.named_modules() if name in names}
        accelerator.state.fsdp_plugin.auto_wrap_policy = functools.partial(
            lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in wrapped
        )

    def prepare_context(self, accelerator):
        return (
            cpu_shims.fsdp1_sync_allowed() if accelerator.device.type == "cpu" else super().prepare_context(accelerator)
        )

    def gather_trainable(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        out = {}
        for unit in FSDP.fsdp_modules(model):
            if unit._handle is None or not unit._handle.flat_param.requires_grad:
                continue
            prefix = module_path(model, unit._fsdp_wrapped_module)
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                for name, param in unit._fsdp_wrapped_module.named_parameters():
                    if param.requires_grad and "_fsdp_wrapped_module" not in name:
                        out[clean_fqn(prefix + name)] = param.detach().cpu().clone()
        return out

    def local_shards(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for unit in FSDP.fsdp_modules(model):
            handle = unit._handle
            if handle is None:
                continue
            flat = handle.flat_param
            for fqn, info, numel in zip(flat._fqns, flat._shard_param_infos, flat._numels, strict=True):
                if not info.in_shard:
                    continue
                name = clean_fqn(module_path(model, unit._fsdp_wrapped_module) + fqn)
                local = flat.detach()[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard]
                yield LocalShard(name, local, info.intra_param_start_idx, numel, flat.requires_grad)

    @staticmethod
    def _flat_parts(tensors: list[TensorSpec], world: int, rank: int) -> Iterator[dict[str, int]]:
        """This rank's bytes of each unit's flat parameter: every tensor starts at a 16-byte boundary
        (use_orig_params), the whole is padded to a multiple of the world size."""
        unit = unit_of(tensors)
        for members in units(tensors, lambda t: unit[t.name]).values():
            itemsize = members[0].itemsize
            yield split_flat([(t.component, t.numel) for t in members], itemsize, 16 // itemsize, world, world, rank)

    def held_weights(self, tensors, world, rank):
        held: dict[str, int] = {}
        for part in self._flat_parts(tensors, world, rank):
            add(held, part)
        return held

    def held_gradients(self, trainable, world, rank):
        return sum(sum(part.values()) for part in self._flat_parts(trainable, world, rank))

    def held_optimizer(self, trainable, world, rank):
        held = super().held_optimizer(trainable, world, rank)
        # AdamW's moments are `zeros_like` each parameter's view into the local flat shard.
        held["optimizer_states"] = ADAM_STATES * sum(
            part.get("lora", 0) for part in self._flat_parts(trainable, world, rank)
        )
        return held

    def gathered_bytes(self, tensors, compute, world, hidden_size):
        # As FSDP2 (the running layer and the prefetched one each with their LoRA units).
        return root_and_two_layers(tensors, compute)

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        # The reduce-scatter input: one LoRA matrix's gradient, in the reduce dtype.
        return max((t.numel * grad_dtype.itemsize for t in trainable), default=0)
