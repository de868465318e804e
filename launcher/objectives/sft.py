"""SFT: next-token cross-entropy over the target tokens (the loss chunked as launcher.model.loss computes it)."""

from __future__ import annotations

from .base import Objective


class SFT(Objective):
    name = "sft"

    def totals(self, rows, samples) -> dict[str, float]:
        return {"tokens": rows.targets(list(samples))}

    def collate(self, rows, samples, pad_id):
        return rows.collate(samples, pad_id)

    def loss(self, calls, batch, totals):
        return calls.loss(batch, totals["tokens"]), {}
