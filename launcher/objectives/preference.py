"""Preference objectives on (prompt, chosen, rejected) pairs: the DPO family and ORPO.

A micro batch of B pairs is one forward of 2B sequences, the chosen ones first; each sequence's log-probability
of its completion comes through the chunked loss (launcher.model.loss), never the batch's logits. DPO's
reference is the same model with its adapter switched off, under no gradient: no second copy of the base; with
`dpo.precompute_reference` it is computed so once before training (reference.py).
The losses are TRL's (DPOTrainer, CPOTrainer's simpo, ORPOTrainer), checked against TRL in
tests/unit/test_objectives.py; the logged metrics carry TRL's names. Each micro batch's loss is its sum over
pairs divided by the pairs of the whole optimizer step, so that ranks and accumulation add up to one
process's loss over the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.batches import model_inputs, sequence
from .base import Objective, target_counts
from .reference import reference_table

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with a `label_smoothing` share of pairs taken as swapped (conservative DPO)."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PairObjective(Objective):
    sequences_per_sample = 2

    def totals(self, rows, samples) -> dict[str, float]:
        samples = list(samples)
        return {"pairs": len(samples), "chosen_tokens": rows.targets(samples)}

    def collate(self, rows, samples, pad_id):
        data = rows.data
        built = [sequence(*data.sample(s)) for s in samples] + [sequence(*data.rejected(s)) for s in samples]
        return model_inputs(built, pad_id)

    def reference_batch(self, rows, samples, pad_id):
        return PairObjective.collate(self, rows, samples, pad_id)

    def metrics(self, sums, totals):
        return {name: sums[name] / totals["pairs"] for name in PAIR_METRICS if name in sums}


def pair_sums(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """The per-pair metrics of TRL, summed over the micro batch's pairs."""
    margins = (chosen_rewards - rejected_rewards).detach()
    return {
        "rewards/chosen": chosen_rewards.detach().sum(),
        "rewards/rejected": rejected_rewards.detach().sum(),
        "rewards/margins": margins.sum(),
        "rewards/accuracies": (margins > 0).float().sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }


class DPO(PairObjective):
    """`dpo.loss_type`: sigmoid (DPO), ipo, hinge against the reference; simpo without one."""

    name = "dpo"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tables: dict[int, torch.Tensor] = {}
        """id(rows) -> the precomputed reference of each pair of those rows (dpo.precompute_reference)."""

    @property
    def precomputes(self) -> bool:
        """The reference is precomputed: asked for, or the adapter continued (its starting point is the reference)."""
        return self.uses_reference and (self.cfg.dpo.precompute_reference or bool(self.cfg.lora.init_from))

    @property
    def forwards_without_grad(self) -> int:
        return int(self.uses_reference and not self.precomputes)

    def prepare(self, calls, accelerator, splits, pad_id, groups):
        if self.precomputes:
            for rows in splits:
                self.tables[id(rows)] = reference_table(self.cfg, self, calls, accelerator, rows, pad_id, groups)

    def collate(self, rows, samples, pad_id):
        batch = super().collate(rows, samples, pad_id)
        if id(rows) in self.tables:
            table = self.tables[id(rows)][samples]
            batch["reference_logps"] = torch.cat([table[:, 0], table[:, 1]])
        return batch

    @property
    def uses_reference(self) -> bool:
        return self.cfg.dpo.loss_type != "simpo"

    def loss(self, calls, batch, totals):
        options = self.cfg.dpo
        beta = options.beta
        precomputed = batch.pop("reference_logps", None)
        chosen, rejected = calls.sequence_logps(batch).float().chunk(2)
        chosen_tokens, rejected_tokens = target_counts(batch).clamp(min=1).chunk(2)
        if options.loss_type == "simpo":
            chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens  # length-normalized
            chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
            logits = chosen - rejected - options.simpo_gamma / beta
            losses = smoothed_sigmoid_loss(beta * logits, options.label_smoothing)
        else:
            reference = precomputed if precomputed is not None else calls.reference_logps(batch)
            reference_chosen, reference_rejected = reference.float().chunk(2)
            chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
            chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
            if options.loss_type == "sigmoid":
                losses = smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), options.label_smoothing)
            elif options.loss_type == "hinge":
                losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
            else:  # ipo, on the ratios averaged over each completion's tokens (as TRL and IPO's authors do)
                margin = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
                losses = (margin - 1 / (2 * beta)) ** 2
        return losses.sum() / totals["pairs"], pair_sums(chosen_rewards, rejected_rewards, chosen, rejected)


class ORPO(PairObjective):
    """The chosen completion's NLL (over the step's chosen target tokens) minus `orpo.beta` x log sigmoid of the
    log odds ratio of the length-normalized log-probabilities; no reference."""

    name = "orpo"

    def loss(self, calls, batch, totals):
        beta = self.cfg.orpo.beta
        chosen_sum, rejected_sum = calls.sequence_logps(batch).float().chunk(2)
        chosen_tokens, rejected_tokens = target_counts(batch).clamp(min=1).chunk(2)
        chosen, rejected = chosen_sum / chosen_tokens, rejected_sum / rejected_tokens
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -chosen_sum.sum()
        loss = nll / totals["chosen_tokens"] - beta * ratio.sum() / totals["pairs"]
        sums = pair_sums(beta * chosen, beta * rejected, chosen, rejected)
        sums.update(
            {
                "nll_loss": nll.detach(),
                "log_odds_ratio": ratio.detach().sum(),
                "log_odds_chosen": log_odds.detach().sum(),
            }
        )
        return loss, sums

    def metrics(self, sums, totals):
        return {
            **super().metrics(sums, totals),
            "nll_loss": sums["nll_loss"] / totals["chosen_tokens"],
            "log_odds_ratio": sums["log_odds_ratio"] / totals["pairs"],
            "log_odds_chosen": sums["log_odds_chosen"] / totals["pairs"],
        }
