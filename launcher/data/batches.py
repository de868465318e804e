"""Batches: which samples each rank sees at each step (a pure function of the seed and the step), packed
into rows of `max_seq_len` tokens or not, and collated into tensors.

Every rank can compute which samples every other rank sees, so a 2-rank run and a 1-process run with
the same global batch see the same data, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from functools import lru_cache

import numpy as np
import torch

from .labels import IGNORE_INDEX
from .tokenized import TokenizedData


@lru_cache(maxsize=2)
def epoch_permutation(num_samples: int, seed: int) -> list[int]:
    """The sample order of one epoch (cached: every micro step of the epoch asks for it)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()


class GlobalBatches:
    """Which samples each rank sees at each optimizer step; pure function of the seed and the step.

    One optimizer step consumes `micro * accum * world` samples of a per-epoch permutation, laid out
    as [accum][world][micro]: a run with world size 1 and micro batch `micro * world` sees exactly the
    samples a `world`-rank run sees, micro step by micro step.
    """

    def __init__(self, num_samples: int, micro: int, accum: int, world: int, seed: int):
        self.num_samples, self.micro, self.accum, self.world, self.seed = num_samples, micro, accum, world, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = num_samples // self.global_batch

    def step_samples(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return epoch_permutation(self.num_samples, self.seed + epoch)[start : start + self.global_batch]

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        samples = self.step_samples(step)
        return [
            samples[(a * self.world + rank) * self.micro : (a * self.world + rank + 1) * self.micro]
            for a in range(self.accum)
        ]


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Samples grouped into rows of at most `capacity` tokens, best fit, longest first (deterministic)."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> rows with that much room
    rooms: list[int] = []  # the keys of by_room, sorted
    for sample in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[sample])
        k = bisect_left(rooms, need)
        if k == len(rooms):
            row, room = len(rows), capacity
            rows.append([])
        else:
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        rows[row].append(sample)
        room -= need
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                insort(rooms, room)
            by_room[room].append(row)
    return [sorted(row) for row in rows]


class Rows:
    """The rows micro batches are made of: one sample each, or, packed, several samples per row whose
    positions restart at each sample and whose attention stops at its start (transformers builds the
    block-diagonal mask from the position ids when no attention mask and no KV cache are given: the forward
    needs `use_cache=False`, or an eval-mode model builds a cache and attends across samples)."""

    def __init__(self, data: TokenizedData, packing: bool, max_seq_len: int, pixels=None):
        self.data, self.packing, self.pixels = data, packing, pixels
        self._targets, self._lengths = data.targets, data.lengths
        self.groups = pack(self._lengths, max_seq_len) if packing else None

    def __len__(self) -> int:
        return len(self.groups) if self.packing else len(self.data)

    def samples(self, row: int) -> list[int]:
        return self.groups[row] if self.packing else [row]

    def targets(self, rows: list[int]) -> int:
        """Tokens the loss counts in these rows (packing keeps every sample's count)."""
        return int(sum(self._targets[self.samples(r)].sum() for r in rows))

    def tokens(self, rows: list[int]) -> int:
        return sum(self.row_length(r) for r in rows)

    def row_length(self, row: int) -> int:
        return int(self._lengths[self.samples(row)].sum())

    def collate(self, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        batch = padded([self.build_row(r) for r in rows], pad_id)
        if self.packing:
            return {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"]}
        inputs = {key: batch[key] for key in ("input_ids", "labels", "attention_mask")}
        if self.pixels is not None:  # image chat records: their images, read and processed here (images.py)
            images = [path for r in rows for sample in self.samples(r) for path in self.data.images(sample)]
            inputs.update(self.pixels(images, batch["input_ids"]))
        return inputs

    def build_row(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels, positions = [], [], []
        for sample in self.samples(row):
            sample_ids, sample_labels = self.data.sample(sample)
            # The first token of a sample is never predicted: not from the sample before it either.
            labels += [IGNORE_INDEX] + sample_labels[1:]
            ids += sample_ids
            positions += range(len(sample_ids))
        return torch.tensor(ids), torch.tensor(labels), torch.tensor(positions)


def sequence(ids: list[int], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unpacked sample as `padded` takes it (its first token is never predicted)."""
    return torch.tensor(ids), torch.tensor([IGNORE_INDEX, *labels[1:]]), torch.arange(len(ids))


def model_inputs(built: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Unpacked rows padded as the model's forward takes them: input_ids, labels and attention_mask."""
    batch = padded(built, pad_id)
    return {key: batch[key] for key in ("input_ids", "labels", "attention_mask")}


def padded(built: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of (ids, labels, positions) padded on the right to the longest: input_ids, labels, position_ids and
    attention_mask."""
    length = max(len(ids) for ids, _, _ in built)
    input_ids = torch.full((len(built), length), pad_id, dtype=torch.long)
    labels = torch.full((len(built), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(length).repeat(len(built), 1)
    attention_mask = torch.zeros((len(built), length), dtype=torch.long)
    for row, (ids, target, position) in enumerate(built):
        n = len(ids)
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = ids, target, 1
        positions[row, :n] = position
        positions[row, n:] = torch.arange(length - n)  # padding is a sample of its own, never a target
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": attention_mask}
