"""Labels: which tokens the loss counts."""

from __future__ import annotations

IGNORE_INDEX = -100
"""The label of a token the loss does not count (prompt, padding), as transformers uses it."""


def completion_start(labels: list[int]) -> int:
    """The first token the loss counts (the end of the prompt), or the length where none does."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def target_tokens(labels: list[int]) -> int:
    """Tokens that count in the loss: shifted labels that are not ignored."""
    return len(labels) - 1 - labels[1:].count(IGNORE_INDEX) if labels else 0
