"""Eval loss on the sharded model.

Each data-parallel group evaluates every `world`-th row (a sequence-parallel group splits each row as in
training); all ranks run the same number of forwards (a sharded forward is a collective), a rank with no
row left repeating row 0 and counting nothing. The loss is summed over
target tokens on every rank and divided once by the target tokens of the whole split: the same number
a single process gets on the same rows.
"""

from __future__ import annotations

import math

import torch

from ..data.batches import Rows
from .sequence_parallel import SequenceGroups


def eval_loss(model, accelerator, rows: Rows, micro_batch_size: int, pad_id: int, groups: SequenceGroups) -> float:
    world, rank = groups.data_world, groups.data_rank
    mine = list(range(rank, len(rows), world))
    forwards = math.ceil(math.ceil(len(rows) / world) / micro_batch_size)
    loss_sum = torch.zeros((), device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for n in range(forwards):
            chunk = mine[n * micro_batch_size : (n + 1) * micro_batch_size]
            rows_batch = {k: v.to(accelerator.device) for k, v in rows.collate(chunk or [0], pad_id).items()}
            with groups.splitting(rows_batch, pad_id) as batch:
                loss = model(**batch, num_items_in_batch=1, use_cache=False).loss  # 1: the sum, not the mean
            if chunk:
                loss_sum += loss.float()
    model.train()
    return accelerator.reduce(loss_sum, "sum").item() / rows.targets(range(len(rows)))
