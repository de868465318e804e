"""Objectives: what a run's loss is. One small interface (base.py), one module per objective, this registry.

The train loop, eval, `qlaunch data`, the budget and the planner ask the run's objective what it trains on, how a
micro batch is collated, the loss and metrics from the model's outputs, and how many sequences a sample makes.
"""

from __future__ import annotations

from ..objective_config import OBJECTIVES
from .base import ModelCalls, Objective
from .kto import KTO
from .preference import DPO, ORPO
from .sft import SFT

REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (SFT, DPO, ORPO, KTO)}
assert tuple(REGISTRY) == OBJECTIVES, "objective_config.OBJECTIVES lists the registry's names"

__all__ = ["ModelCalls", "Objective", "REGISTRY", "get", "sequences_per_sample"]


def get(cfg) -> Objective:
    """The run's objective (`cfg.train.objective`) with its options."""
    return REGISTRY[cfg.train.objective](cfg)


def sequences_per_sample(train) -> int:
    """Sequences one sample makes in a micro batch (a pair: two)."""
    return REGISTRY[train.objective].sequences_per_sample
