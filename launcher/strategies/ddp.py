"""DDP: every rank holds the whole model and the whole optimizer state (the unsharded baseline)."""

from __future__ import annotations

from . import handoff
from .base import Strategy, StrategySpec


class DDP(Strategy):
    spec = StrategySpec(
        name="ddp",
        accelerate_config="ddp.yaml",
        deepspeed_config=None,
        checkpoint_format="dcp",
        reshardable_checkpoints=True,
        shards_base=False,
        shards_adapter_state=False,
        offload_note="DDP keeps a whole copy on every GPU; zero3 and fsdp2 offload",
    )

    def before_prepare(self, model, accelerator):
        handoff.broadcast_whole(model, accelerator.device)
        return super().before_prepare(model, accelerator)

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        # DDP's reducer keeps flat buckets covering every trainable parameter besides `.grad`
        # (Accelerate leaves gradient_as_bucket_view off).
        return sum(t.numel for t in trainable) * grad_dtype.itemsize
