"""torch.cuda's own memory statistics per optimizer step, beside the budget's byte counts (launcher/memory/measure.py)."""

from __future__ import annotations

import torch


class CudaPeaks:
    """torch.cuda's own statistics, per optimizer step: peak allocated and reserved bytes."""

    KEPT_STEPS = 10

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.after_sharding = torch.cuda.memory_allocated()
        self.peak_before_training = torch.cuda.max_memory_allocated()
        self.steps: list[dict[str, int]] = []
        self.max_allocated = self.max_reserved = 0
        torch.cuda.reset_peak_memory_stats()
        self.handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs):
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        self.max_allocated, self.max_reserved = max(self.max_allocated, allocated), max(self.max_reserved, reserved)
        if len(self.steps) < self.KEPT_STEPS:
            self.steps.append({"peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved})
        torch.cuda.reset_peak_memory_stats()

    def peak_allocated(self) -> int:
        """Peak allocated bytes over the whole run: loading and sharding, every step, and what came after
        the last step's reset."""
        return max(self.peak_before_training, self.max_allocated, torch.cuda.max_memory_allocated())

    def report(self) -> dict:
        self.handle.remove()
        return {
            "allocated_after_sharding_bytes": self.after_sharding,
            "peak_allocated_bytes": self.max_allocated,
            "peak_reserved_bytes": self.max_reserved,
            "first_steps": self.steps,
        }
