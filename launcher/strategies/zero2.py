"""DeepSpeed ZeRO-2: the base whole on every rank; adapter gradients and optimizer states partitioned."""

from __future__ import annotations

from . import handoff
from .base import OFFLOAD_OPTIMIZER, StrategySpec
from .layout import TensorSpec, by_group, whole
from .zero import ZeRO


class ZeRO2(ZeRO):
    spec = StrategySpec(
        name="zero2",
        accelerate_config="zero2.yaml",
        deepspeed_config="zero2.json",
        checkpoint_format="deepspeed",
        reshardable_checkpoints=False,
        shards_base=False,
        shards_adapter_state=True,
        offload=(OFFLOAD_OPTIMIZER,),
        offload_note="ZeRO-2 keeps the whole base on every rank and has no parameter offload (ZeRO-3 does)",
    )
    stage = 2

    def before_prepare(self, model, accelerator):
        handoff.broadcast_whole(model, accelerator.device)
        return super().before_prepare(model, accelerator)

    @staticmethod
    def _flat(trainable: list[TensorSpec], world: int) -> tuple[int, int]:
        """(elements of the flat trainable buffer, elements of each rank's partition): the
        parameters back to back, padded to a multiple of 2 x world size (4-byte NCCL alignment)."""
        numel = sum(t.numel for t in trainable)
        numel += -numel % (2 * world)
        return numel, numel // world

    def held_weights(self, tensors, world, rank):
        trainable = [t for t in tensors if t.trainable]
        held = whole(tensors)
        # The trainable parameters become views of one flat buffer, whole on every rank.
        # DeepSpeed flattens each optimizer group into a buffer of its own, each padded.
        padding = sum(self._flat(group, world)[0] - sum(t.numel for t in group) for group in by_group(trainable))
        if trainable:
            held["shard_padding"] = padding * trainable[0].itemsize
        return held

    def partition_numel(self, trainable, world, rank):
        return self._flat(trainable, world)[1]
