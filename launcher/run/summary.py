"""What a finished run reports: each rank's shard report and the summary it prints."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from .. import strategies


@dataclass
class RunSummary:
    steps: int
    first_loss: float
    last_loss: float
    tokens_per_s: float
    seconds: float
    adapter_dir: str
    world_size: int
    strategy: str
    eval_loss: float | None = None


def rank_report(
    model,
    optimizer,
    sharder: strategies.Strategy,
    strategy: str,
    adapter_total: int,
    peak_device_bytes: int | None,
    packed: dict | None,
) -> dict:
    """What this rank holds after sharding (by `sharder`, for the run's `strategy`): adapter and optimizer-state
    elements, for the report."""
    shards = [s for s in sharder.local_shards(model) if s.trainable]
    trainable_local = sum(min(s.local.numel(), s.full_numel - s.start) for s in shards)
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "strategy": strategy,
        "adapter_elements_total": adapter_total,
        "adapter_elements_local": trainable_local,
        "optimizer_state_elements_local": strategies.optimizer_state_numel(optimizer),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # torch.cuda's own peak would cover only the time since the meter's last per-step reset.
        "peak_device_bytes": peak_device_bytes,
        "packed_weights_in_first_forward": packed,
    }


def print_summary(s: RunSummary, output_dir: Path) -> None:
    print(
        f"\nDone: {s.steps} steps in {s.seconds:.1f} s on {s.world_size} rank(s) with {s.strategy}; "
        f"loss {s.first_loss:.4f} -> {s.last_loss:.4f}"
        + (f", eval loss {s.eval_loss:.4f}" if s.eval_loss is not None else "")
        + f"; {s.tokens_per_s:,.0f} tokens/s.\n"
        f"Adapter (PEFT format): {s.adapter_dir}\n"
        f"Metrics: {output_dir / 'metrics.jsonl'}   Check it reloads: qlaunch verify {output_dir}",
        flush=True,
    )
