"""The run config's sections of the objectives (`dpo:`, `orpo:`, `kto:`) and their names; launcher.config holds
them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Rule = tuple[bool, str]
OBJECTIVES = ("sft", "dpo", "orpo", "kto")
"""`train.objective`: what the loss is (launcher.objectives)."""
Objective = Literal["sft", "dpo", "orpo", "kto"]
RECORDS = {"sft": "sft", "dpo": "pairs", "orpo": "pairs", "kto": "unpaired"}
"""What each objective trains on, as the tokenized data holds it: SFT samples, preference pairs (prompt, chosen,
rejected), or unpaired completions labelled desirable or not (pairs given to kto are split into one of each)."""


@dataclass(frozen=True)
class DPOConfig:
    """`train.objective: dpo`: the DPO family, on (prompt, chosen, rejected) pairs."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC): against the reference (the base with the adapter off); simpo: no reference,
    each completion's log-probability averaged over its tokens, with a target margin `simpo_gamma`."""
    beta: float = 0.1
    """How far the policy may move from the reference (IPO's tau; SimPO's reward scale, 2.0 in its paper)."""
    label_smoothing: float = 0.0
    """sigmoid and simpo: the share of pairs assumed mislabeled (conservative DPO); 0 is plain DPO."""
    simpo_gamma: float = 0.5
    """simpo: the reward margin the chosen completion must win by."""
    precompute_reference: bool = False
    """Compute the reference's log-probabilities once, before the first step (kept beside the data cache), instead
    of a reference forward per micro batch."""

    def rules(self, at: str) -> list[Rule]:
        return [
            (self.beta > 0, f"`{at}beta` must be positive, got {self.beta}."),
            (
                0 <= self.label_smoothing < 0.5,
                f"`{at}label_smoothing` must be in [0, 0.5), got {self.label_smoothing}.",
            ),
            (
                self.label_smoothing == 0 or self.loss_type in ("sigmoid", "simpo"),
                f"`{at}label_smoothing` applies to the sigmoid and simpo losses, not `{self.loss_type}`.",
            ),
            (
                not (self.precompute_reference and self.loss_type == "simpo"),
                f"`{at}precompute_reference` with `{at}loss_type: simpo`: SimPO has no reference to precompute.",
            ),
        ]


@dataclass(frozen=True)
class ORPOConfig:
    """`train.objective: orpo`: the chosen completion's NLL plus `beta` times the odds-ratio term; no reference."""

    beta: float = 0.1
    """The odds-ratio term's weight (the paper's lambda; TRL calls it beta)."""

    def rules(self, at: str) -> list[Rule]:
        return [(self.beta > 0, f"`{at}beta` must be positive, got {self.beta}.")]


@dataclass(frozen=True)
class KTOConfig:
    """`train.objective: kto`: completions labelled desirable or not (or pairs, each split into one of each), against
    the reference (the base with the adapter off), with the KL term estimated from mismatched completions."""

    beta: float = 0.1
    """How far the policy may move from the reference."""
    desirable_weight: float = 1.0
    """The desirable completions' loss weight (KTO's lambda_D)."""
    undesirable_weight: float = 1.0
    """The undesirable completions' loss weight (lambda_U): KTO's authors advise desirable_weight x desirable
    completions / (undesirable_weight x undesirable ones) between 1 and 4/3."""
    precompute_reference: bool = False
    """Compute the reference's log-probabilities (of each completion and of its mismatched one) once, before the
    first step (kept beside the data cache), instead of reference forwards at every step."""

    def rules(self, at: str) -> list[Rule]:
        return [
            (self.beta > 0, f"`{at}beta` must be positive, got {self.beta}."),
            (
                self.desirable_weight > 0 and self.undesirable_weight > 0,
                f"`{at}desirable_weight` and `{at}undesirable_weight` must be positive, got "
                f"{self.desirable_weight} and {self.undesirable_weight}.",
            ),
        ]
