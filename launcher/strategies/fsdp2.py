"""FSDP2 (`fully_shard`): every parameter split by rows across ranks, each tensor with its own dtype."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

from .. import cpu_shims
from ..collectives import is_source_rank, scatter_rows_
from ..model.anatomy import decoder_layers
from . import handoff
from .base import OFFLOAD_PARAMS, LocalShard, Strategy, StrategySpec
from .layout import ADAM_STATES, TensorSpec, add, chunk_rows, root_and_two_layers, units
from .param_groups import regroup


class FSDP2(Strategy):
    spec = StrategySpec(
        name="fsdp2",
        accelerate_config="fsdp2.yaml",
        deepspeed_config=None,
        checkpoint_format="dcp",
        reshardable_checkpoints=True,
        shards_base=True,
        shards_adapter_state=True,
        offload=(OFFLOAD_PARAMS,),
        offload_note="FSDP2's CPUOffloadPolicy moves parameters, gradients and optimizer state together: use params",
        sequence_parallel=True,
    )
    # Accelerate's FSDP2 mixed-precision policy gathers every parameter in the autocast dtype.
    casts_parameters = True

    def model_refusal(self, model):
        # Accelerate shards the output layer in a unit with the final norm (and a tied input embedding); torch
        # refuses a parameter seen by two units, so none of the output layer's may also belong to another module.
        output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if output is None:
            return None
        own = {id(p) for p in output.parameters()} - {id(p) for p in embeddings.parameters()}
        inside = {id(m) for m in output.modules()}
        for name, module in model.named_modules():
            shared = [k for k, p in module._parameters.items() if p is not None and id(p) in own]
            if shared and id(module) not in inside:
                return (
                    f"its output layer's parameter is also `{name}.{shared[0]}`, a module outside it (BERT-style "
                    "heads register their output bias twice); FSDP2 shards the output layer in a unit of its own and "
                    "torch refuses a parameter in two units. zero3, zero2 and ddp shard it"
                )
        return None

    def plugins(self, train, device):
        from accelerate.utils import FullyShardedDataParallelPlugin

        # offload params: every sharded parameter (4-bit base, adapters), its gradient and so the optimizer
        # state live in host RAM, copied to the device for each all-gather. Pinned on CUDA; a CPU-only torch
        # cannot pin (there the host is the device anyway).
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if train.offload == "params" else OffloadPolicy()
        # Accelerate's own low-memory loading skips models with 4-bit weights; after_prepare does it.
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=False, cpu_offload=offload)
        return {"fsdp_plugin": plugin}

    def install_on_cpu(self, accelerator, plugins):
        cpu_shims.mark_fsdp(accelerator, plugins["fsdp_plugin"])

    def before_prepare(self, model, accelerator):
        super().before_prepare(model, accelerator)
        # Accelerate wraps every class of `_no_split_modules`; the units are the decoder layers the budget counts
        # (a BERT-style embeddings module is not one: its table is the output layer's too).
        layers = decoder_layers(model)
        classes = sorted({type(model.get_submodule(name)).__name__ for name in layers})
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = classes
        # fully_shard keeps only this rank's chunk of each parameter: keep the source's full tensors to
        # scatter, and the trainable parameters' names to find them again.
        # Every name of a tied parameter: after sharding, named_parameters may report it by another one (BERT's
        # output bias is `cls.predictions.bias` and `cls.predictions.decoder.bias`).
        named = model.named_parameters(remove_duplicate=False)
        full = {name: p.detach() for name, p in named} if is_source_rank() else None
        return full, [name for name, p in model.named_parameters() if p.requires_grad]

    def after_prepare(self, model, optimizer, accelerator, handed):
        full, trainable = handed
        # Accelerate maps the optimizer onto the sharded parameters by data pointer, which is 0 for
        # every meta tensor on non-source ranks; map by name instead (the optimizer state is empty).
        regroup(optimizer, dict(model.named_parameters()), trainable)
        if dist.get_world_size() == 1:
            return
        if not is_source_rank():
            # Under CPUOffloadPolicy the shards live in host RAM.
            offloaded = isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
            model.to_empty(device="cpu" if offloaded else accelerator.device)
        for name, param in model.named_parameters():
            scatter_rows_(param.to_local(), full[name] if full is not None else None, param.shape[0])
        handoff.materialize_and_broadcast(handoff.shared_tensors(model, buffers_only=True), accelerator.device)

    def gather_trainable(self, model):
        return {n: p.full_tensor().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def local_shards(self, model):
        world, rank = dist.get_world_size(), dist.get_rank()
        for name, param in model.named_parameters():
            local = param.to_local().detach()
            rows_per_rank = -(-param.shape[0] // world)
            row_numel = param[0].numel() if param.dim() > 1 else 1
            yield LocalShard(name, local, rank * rows_per_rank * row_numel, param.numel(), param.requires_grad)

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
            add(
                held,
                {t.component: rows * row_numel * t.itemsize, "shard_padding": (stored - rows) * row_numel * t.itemsize},
            )
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
        return root_and_two_layers(tensors, compute)

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        # The reduce-scatter input: one layer's full gradients.
        per_layer = units(trainable, lambda t: t.layer)
        return max((sum(t.numel for t in members) * grad_dtype.itemsize for members in per_layer.values()), default=0)
