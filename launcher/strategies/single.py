"""One process: nothing to shard or synchronize (the run keeps its strategy's dtype policy)."""

from __future__ import annotations

from .base import Strategy, StrategySpec


class SingleProcess(Strategy):
    """What a strategy becomes on a world of one, in training and in the budget alike."""

    spec = StrategySpec(
        name="single",
        accelerate_config="",
        deepspeed_config=None,
        checkpoint_format="dcp",
        reshardable_checkpoints=True,
        shards_base=False,
        shards_adapter_state=False,
    )
