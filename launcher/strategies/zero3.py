"""DeepSpeed ZeRO-3: every parameter partitioned across ranks, gathered module by module."""

from __future__ import annotations

import torch.distributed as dist

from . import handoff
from .base import OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, LocalShard, StrategySpec
from .layout import add, bytes_as, chunk_rows
from .zero import ZeRO


class ZeRO3(ZeRO):
    spec = StrategySpec(
        name="zero3",
        accelerate_config="zero3.yaml",
        deepspeed_config="zero3.json",
        checkpoint_format="deepspeed",
        reshardable_checkpoints=False,
        shards_base=True,
        shards_adapter_state=True,
        offload=(OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS),
        sequence_parallel=True,
    )
    stage = 3
    linear_saves_input = True
    """zero.Init replaces torch.nn.functional.linear with a version that saves its input and weight."""

    def model_refusal(self, model):
        from ..model.roles import written_in_eval

        # The end-of-run check (and the eval loss) runs the model in eval mode, where some models rewrite their
        # weights in place: ZeRO-3 holds each as an empty placeholder outside its module's forward.
        written = written_in_eval(model)
        if written:
            return (
                f"its eval-mode forward writes into its weights ({', '.join(written[:2])}, ...: RWKV rescales them for "
                "inference), which ZeRO-3 keeps partitioned outside their modules' forward; fsdp2, zero2 and ddp "
                "shard it"
            )
        return None

    def before_prepare(self, model, accelerator):
        import deepspeed

        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # ZeRO-3's own path: `zero.Init(module=...)` broadcasts each module's parameters from rank 0
        # and keeps this rank's partition. One module at a time, so a non-source rank allocates at
        # most one module's full weights before partitioning frees them. A tied weight is converted
        # once, with its first module; later owners already hold it partitioned.
        pending = {id(shared.tensor): shared for shared in handoff.shared_tensors(model) if shared.is_parameter}
        for module in model.modules():
            if not module._parameters:
                continue
            mine = [pending.pop(id(p)) for p in module.parameters() if id(p) in pending]
            handoff.materialize_empty(mine, accelerator.device)
            deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
        handoff.materialize_and_broadcast(handoff.shared_tensors(model, buffers_only=True), accelerator.device)
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

    def held_weights(self, tensors, world, rank):
        held: dict[str, int] = {"shard_padding": 0}
        for t in tensors:
            # Each parameter is flattened and padded to a multiple of the world size; the optimizer
            # later moves the trainable partitions into one flat buffer, back to back.
            valid, stored = chunk_rows(t.numel, world, rank)
            add(held, {t.component: valid * t.itemsize, "shard_padding": (stored - valid) * t.itemsize})
        return held

    def partition_numel(self, trainable, world, rank):
        return sum(chunk_rows(t.numel, world, rank)[1] for t in trainable)

    def gathered_bytes(self, tensors, compute, world, hidden_size):
        zero = self.shipped_zero_config()
        threshold = zero.get("stage3_param_persistence_threshold", "auto")
        threshold = 10 * hidden_size if threshold == "auto" else int(threshold)
        # Parameters under the persistence threshold stay gathered after their first use; the others
        # are gathered module by module and released once reused, at most max_live_parameters at once.
        persistent = sum(bytes_as(t, compute) for t in tensors if t.numel < threshold)
        others = [t for t in tensors if t.numel >= threshold]
        numel = sum(t.numel for t in others)
        live = min(numel, int(zero.get("stage3_max_live_parameters", 1e9)))
        return persistent + (sum(bytes_as(t, compute) for t in others) * live // numel if numel else 0)
