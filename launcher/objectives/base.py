"""The objective interface, and the forwards an objective may ask of the model being trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..data.batches import Rows
from ..data.labels import IGNORE_INDEX
from ..objective_config import RECORDS


@dataclass
class ModelCalls:
    """The forwards of the model being trained: all go through what the strategy wrapped (FSDP and ZeRO-3 gather
    there, in the same order on every rank)."""

    model: nn.Module
    peft_model: nn.Module
    """The PEFT model inside `model` (its adapter is switched off for the reference)."""

    def loss(self, batch: dict, num_items) -> torch.Tensor:
        """The model's next-token loss over the batch's targets, summed and divided by `num_items`."""
        return self.model(**batch, num_items_in_batch=num_items, use_cache=False).loss

    def sequence_logps(self, batch: dict) -> torch.Tensor:
        """Each sequence's summed log-probability of its targets (launcher.model.loss, `sequence_logps`)."""
        return self.model(**batch, sequence_logps=True, use_cache=False).sequence_logps

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """`sequence_logps` of the base alone: the adapter switched off, no gradient. Not a second model."""
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.sequence_logps(batch)


def target_counts(batch: dict) -> torch.Tensor:
    """Each sequence's target tokens (labels are shifted by the loss: the first never counts)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)


class Objective:
    """What a run optimizes. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    sequences_per_sample: ClassVar[int] = 1
    """Sequences a sample makes in a micro batch (the budget's and the loss chunks' batch)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @property
    def records(self) -> str:
        """What it trains on: sft, pairs or unpaired (objective_config.RECORDS)."""
        return RECORDS[self.name]

    @property
    def uses_reference(self) -> bool:
        """Runs a reference forward (no gradient) beside each training forward."""
        return False

    @property
    def forwards_without_grad(self) -> int:
        """Forwards without gradient per micro batch (the reference's, the KL term's), each over as many
        sequences as the training forward: the planner counts their time."""
        return 0

    def check(self) -> None:
        """Refuses, before launch, what this objective cannot train with (ConfigError)."""
        if self.records != "sft" and self.cfg.data.packing:
            raise ConfigError(
                f"train.objective `{self.name}` sums each completion's log-probability, and its sequences are not "
                "packed: set data.packing false."
            )
        if self.records != "sft" and self.cfg.train.sequence_parallel > 1:
            raise ConfigError(
                f"train.objective `{self.name}` does not split sequences across ranks yet (each completion's "
                "log-probability is summed over its whole sequence): set train.sequence_parallel 1."
            )

    def prepare(self, calls: ModelCalls, accelerator, splits: list[Rows], pad_id: int, groups) -> None:
        """What the objective computes once, after sharding and before the first step (every rank calls it)."""

    def begin(self, calls: ModelCalls, accelerator, rows: Rows, batches: list[list[int]], pad_id: int) -> None:
        """What a step (or an evaluation) computes before its micro batches, from this rank's: `batches` holds
        one list of samples per forward (every rank runs as many forwards; an empty list counts nothing)."""

    def reference_batch(self, rows: Rows, samples: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The sequences whose reference log-probabilities are precomputed for these samples: two per sample, in
        two halves (objectives/reference.py)."""
        raise NotImplementedError

    def totals(self, rows: Rows, samples) -> dict[str, float]:
        """What the loss of these samples is normalized by (summed over them), e.g. target tokens or pairs."""
        raise NotImplementedError

    def collate(self, rows: Rows, samples: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """A micro batch of these samples (rows), as the model's forward takes it."""
        raise NotImplementedError

    def loss(self, calls: ModelCalls, batch: dict, totals: dict[str, float]) -> tuple[torch.Tensor, dict]:
        """The batch's share of the loss (its sums divided by `totals`) and its metric sums (tensors)."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], totals: dict[str, float]) -> dict[str, float]:
        """The logged metrics from the sums over a whole batch (every rank) and that batch's totals."""
        return {}
