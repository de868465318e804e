"""Evaluation of the sharded model on the eval split: the objective's loss and metrics.

Each data-parallel group evaluates every `world`-th row (a sequence-parallel group splits each row as in
training); all ranks run the same number of forwards (a sharded forward is a collective), a rank with no
row left repeating row 0 and counting nothing. Each forward's loss is its sums divided by the totals of the
whole split (target tokens, pairs), so summing every forward on every rank gives the number a single process
gets on the same rows.
"""

from __future__ import annotations

import math

import torch

from ..data.batches import Rows
from ..objectives import ModelCalls, Objective
from .sequence_parallel import SequenceGroups


def evaluate(
    objective: Objective,
    calls: ModelCalls,
    accelerator,
    rows: Rows,
    micro_batch_size: int,
    pad_id: int,
    groups: SequenceGroups,
) -> dict[str, float]:
    """`eval_loss` and the objective's metrics as `eval_<name>`."""
    world, rank = groups.data_world, groups.data_rank
    mine = list(range(rank, len(rows), world))
    forwards = math.ceil(math.ceil(len(rows) / world) / micro_batch_size)
    totals = objective.totals(rows, range(len(rows)))
    loss_sum, sums = torch.zeros((), device=accelerator.device), {}
    chunks = [mine[n * micro_batch_size : (n + 1) * micro_batch_size] for n in range(forwards)]
    calls.model.eval()
    with torch.no_grad():
        objective.begin(calls, accelerator, rows, chunks, pad_id)
        for chunk in chunks:
            rows_batch = {k: v.to(accelerator.device) for k, v in objective.collate(rows, chunk or [0], pad_id).items()}
            with groups.splitting(rows_batch, pad_id) as batch:
                loss, forward_sums = objective.loss(calls, batch, totals)
            if chunk:
                loss_sum += loss.float()
                add_sums(sums, forward_sums)
    calls.model.train()
    loss, reduced = reduce_sums(accelerator, loss_sum, sums)
    return {"eval_loss": loss, **{f"eval_{k}": v for k, v in objective.metrics(reduced, totals).items()}}


def add_sums(into: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    for name, value in sums.items():
        into[name] = into[name] + value.float() if name in into else value.float()


def reduce_sums(accelerator, loss_sum: torch.Tensor, sums: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """`loss_sum` and `sums` summed over every rank, in one all-reduce."""
    names = sorted(sums)
    stacked = torch.stack([loss_sum.float(), *(sums[name] for name in names)])
    values = accelerator.reduce(stacked, "sum").tolist()
    return values[0], dict(zip(names, values[1:], strict=True))
