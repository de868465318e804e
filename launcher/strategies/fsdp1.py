"""FSDP1 (`FullyShardedDataParallel`): each unit flattened into one tensor of one dtype, split across ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..dtypes import DtypePolicy
from . import cpu
from .base import LocalShard, Strategy, StrategySpec, clean_fqn, module_path
from .layout import ADAM_STATES, TensorSpec, add, root_and_two_layers, split_flat, units


class FSDP1(Strategy):
    spec = StrategySpec(
        name="fsdp1",
        accelerate_config="fsdp1.yaml",
        deepspeed_config=None,
        checkpoint_format="dcp",
        reshardable_checkpoints=True,
        shards_base=True,
        shards_adapter_state=True,
        offload_note=(
            "FSDP1's CPUOffload(offload_params=True) is not wired here: its parameters are allocated from meta modules "
            "on the device and broadcast (sync_module_states), which has not been tested with host-resident shards; "
            "use fsdp2 or zero3"
        ),
    )
    # FSDP1 replaces the parameters with flat ones: the optimizer is built on the wrapped model.
    optimizer_after_wrap = True

    def refusal(self, cfg):
        if cfg.lora.target_parameters:
            # Measured: `RuntimeError: shape '[4, -1, 4096]' is invalid` in peft's get_delta_factors.
            return (
                "peft's LoRA on parameters (lora.target_parameters) reads the adapter weights outside their modules' "
                "forward, where FSDP1 holds only this rank's flat shard of them"
            )
        if cfg.quant.storage_dtype not in ("auto", "float32"):
            return f"`quant.storage_dtype: {cfg.quant.storage_dtype}`: FSDP1 needs one dtype per unit (float32 here); use auto"
        return None

    def dtype_policy(self, compute_dtype, mixed_precision):
        # FSDP1 flattens each unit into one tensor of one dtype, and its mixed-precision cast of that
        # tensor would rewrite packed 4-bit bytes stored in another dtype. So everything is fp32
        # (norms stay safe, the packed bytes are only viewed as fp32) and FSDP1 casts no parameters;
        # bf16 compute comes from autocast and from the 4-bit compute dtype instead.
        return DtypePolicy.uniform(torch.float32)

    def plugins(self, train, device):
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

    def install_on_cpu(self, accelerator, plugins):
        cpu.mark_fsdp(accelerator, plugins["fsdp_plugin"])

    def before_prepare(self, model, accelerator):
        from peft.utils.other import fsdp_auto_wrap_policy

        super().before_prepare(model, accelerator)
        # Each LoRA matrix is its own FSDP unit, so adapter states split evenly and the frozen
        # units hold frozen weights only.
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)

    def prepare_context(self, accelerator):
        return cpu.fsdp1_sync_allowed() if accelerator.device.type == "cpu" else super().prepare_context(accelerator)

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
    def _unit(t: TensorSpec) -> str:
        # before_prepare's wrap policy: each LoRA matrix, each decoder layer, and the root for the rest.
        return t.module if t.trainable else t.layer

    def _flat_parts(self, tensors: list[TensorSpec], world: int, rank: int) -> Iterator[dict[str, int]]:
        """This rank's bytes of each unit's flat parameter: every tensor starts at a 16-byte boundary
        (use_orig_params), the whole is padded to a multiple of the world size."""
        for members in units(tensors, self._unit).values():
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
        return max((t.numel * t.itemsize for t in trainable), default=0)
