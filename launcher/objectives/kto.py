"""KTO: completions labelled desirable or not, each against the reference, around a KL estimate.

A desirable completion's loss is 1 - sigmoid(beta (r - z)), an undesirable one's 1 - sigmoid(beta (z - r)), with r
the completion's log-ratio to the reference (the base with the adapter switched off, as DPO's) and z the KL term:
the mean log-ratio of mismatched completions (a prompt with another sample's completion), without gradient,
clamped at 0. These are TRL's KTOTrainer losses, checked against it in tests/unit/test_objectives.py.

TRL estimates z per micro batch (rotating completions within it; its trainer then needs sequential sampling and a
micro batch above 1). Here z is the mean over the whole optimizer step, on every rank, from one pass without
gradient before the step's micro batches (`begin`): a 2-rank run computes the number one process computes on the
same global batch, whatever the micro batch. Each sample's mismatched completion is a fixed one, another sample's
by a seeded rotation of the split, so the reference's share of z can be precomputed (`kto.precompute_reference`)
like its share of r. Each micro batch's loss is its sum over samples divided by the samples of the step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.batches import model_inputs, sequence
from ..data.labels import completion_start
from ..node_cache import say
from .base import Objective
from .reference import reference_table

KTO_METRICS = ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")


def mismatched_partners(samples: int, seed: int) -> np.ndarray:
    """For each sample, the sample whose completion it is paired with for the KL term: the previous one in a seeded
    order, so that no sample is its own partner (but with a single sample) and every completion is used once."""
    order = np.random.default_rng(seed).permutation(samples)
    partners = np.empty(samples, dtype=np.int64)
    partners[order] = np.roll(order, 1)
    return partners


class KTO(Objective):
    name = "kto"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tables: dict[int, torch.Tensor] = {}
        """id(rows) -> each sample's precomputed reference: its completion's, its mismatched completion's."""
        self.partners: dict[int, np.ndarray] = {}
        self.kl = torch.zeros(())
        """The KL term of the step (or evaluation) under way."""

    @property
    def uses_reference(self) -> bool:
        return True

    @property
    def precomputes(self) -> bool:
        return self.cfg.kto.precompute_reference or bool(self.cfg.lora.init_from)

    @property
    def forwards_without_grad(self) -> int:
        return 1 if self.precomputes else 3  # the policy on the mismatched completions; the reference on both

    def prepare(self, calls, accelerator, splits, pad_id, groups):
        if accelerator.is_main_process:
            say(balance_note(splits[0].data.desirable, self.cfg.kto))
        if self.precomputes:
            for rows in splits:
                self.tables[id(rows)] = reference_table(self.cfg, self, calls, accelerator, rows, pad_id, groups)

    def partner_of(self, rows, samples: list[int]) -> list[int]:
        if id(rows) not in self.partners:
            self.partners[id(rows)] = mismatched_partners(len(rows), self.cfg.train.seed)
        return self.partners[id(rows)][samples].tolist()

    def totals(self, rows, samples) -> dict[str, float]:
        desirable = int(rows.data.desirable[list(samples)].sum())
        samples = len(list(samples))
        return {"samples": samples, "desirable": desirable, "undesirable": samples - desirable}

    def collate(self, rows, samples, pad_id):
        data = rows.data
        batch = model_inputs([sequence(*data.sample(s)) for s in samples], pad_id)
        batch["desirable"] = torch.as_tensor(data.desirable[samples], dtype=torch.bool)
        if id(rows) in self.tables:
            batch["reference_logps"] = self.tables[id(rows)][samples, 0]
        return batch

    def mismatched(self, rows, samples: list[int]) -> list:
        """Each sample's prompt with its partner's completion, cut to data.max_seq_len (as `sequence` builds)."""
        data, limit, built = rows.data, self.cfg.data.max_seq_len, []
        for sample, partner in zip(samples, self.partner_of(rows, samples), strict=True):
            prompt_ids, prompt_labels = data.sample(sample)
            ids, labels = data.sample(partner)
            cut, start = completion_start(prompt_labels), completion_start(labels)
            joined_ids, joined_labels = prompt_ids[:cut] + ids[start:], prompt_labels[:cut] + labels[start:]
            built.append(sequence(joined_ids[:limit], joined_labels[:limit]))
        return built

    def reference_batch(self, rows, samples, pad_id):
        matched = [sequence(*rows.data.sample(s)) for s in samples]
        return model_inputs(matched + self.mismatched(rows, samples), pad_id)

    def begin(self, calls, accelerator, rows, batches, pad_id):
        total = torch.zeros(2, device=accelerator.device)
        table = self.tables.get(id(rows))
        with torch.no_grad():
            for chunk in batches:
                sequences = model_inputs(self.mismatched(rows, chunk or [0]), pad_id)
                batch = {k: v.to(accelerator.device) for k, v in sequences.items()}
                policy = calls.sequence_logps(batch).float()
                reference = table[chunk, 1].to(policy.device) if table is not None else calls.reference_logps(batch)
                if chunk:
                    total += torch.stack([(policy - reference.float()).sum(), policy.new_tensor(len(chunk))])
        total = accelerator.reduce(total, "sum")
        self.kl = (total[0] / total[1]).clamp(min=0)

    def loss(self, calls, batch, totals):
        options = self.cfg.kto
        desirable = batch.pop("desirable")
        precomputed = batch.pop("reference_logps", None)
        policy = calls.sequence_logps(batch).float()
        reference = precomputed if precomputed is not None else calls.reference_logps(batch)
        ratio = policy - reference.float()
        kl = self.kl.to(ratio.device)
        losses = torch.where(
            desirable,
            options.desirable_weight * (1 - torch.sigmoid(options.beta * (ratio - kl))),
            options.undesirable_weight * (1 - torch.sigmoid(options.beta * (kl - ratio))),
        )
        rewards, logps = options.beta * ratio.detach(), policy.detach()
        sums = {
            "rewards/chosen": rewards[desirable].sum(),
            "logps/chosen": logps[desirable].sum(),
            "rewards/rejected": rewards[~desirable].sum(),
            "logps/rejected": logps[~desirable].sum(),
        }
        return losses.sum() / totals["samples"], sums

    def metrics(self, sums, totals):
        out = {"kl": float(self.kl)}
        for side, count in (("chosen", totals["desirable"]), ("rejected", totals["undesirable"])):
            if count:
                out[f"rewards/{side}"] = sums[f"rewards/{side}"] / count
                out[f"logps/{side}"] = sums[f"logps/{side}"] / count
        if totals["desirable"] and totals["undesirable"]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def balance_note(desirable: np.ndarray, options) -> str:
    """KTO's authors advise desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3]."""
    wanted, unwanted = int(desirable.sum()), int((~desirable).sum())
    ratio = options.desirable_weight * wanted / max(1, options.undesirable_weight * unwanted)
    advice = (
        ""
        if 1 <= ratio <= 4 / 3
        else " (KTO's authors advise 1 to 4/3: set kto.desirable_weight or undesirable_weight)"
    )
    return (
        f"KTO trains on {wanted:,} desirable and {unwanted:,} undesirable completions; weighted, their ratio is "
        f"{ratio:.2f}{advice}"
    )
