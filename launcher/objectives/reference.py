"""The reference log-probabilities of DPO and KTO computed once, before the first step
(`dpo.precompute_reference`, `kto.precompute_reference`, and always when training continues an adapter,
`lora.init_from`).

The reference is the model as training starts: the base with the adapter switched off, or with the adapter
it continues (SFT, then DPO from the SFT adapter: no second adapter, no second model). It is computed before a
resumed run loads its checkpoint, so a resume computes the same table. One pass without gradient, in eval
mode (no dropout), over every sample of the training (and eval) split, two sequences each (a pair's chosen and
rejected; KTO's completion and its mismatched one): each data-parallel rank takes every `world`-th sample, all ranks run the same number of forwards (a sharded forward is
a collective), and one all-reduce gives every rank the whole table. Training then runs no reference forward. The
table is kept on each node beside the data cache (`data.cache_dir`), keyed by the model's files and the
tokenized data, so a requeued or resumed job reads it instead of computing it again; every rank must find it
(one all-reduce decides), or all compute it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from ..data.batches import Rows
from ..data.tokenized import cache_root
from ..node_cache import say
from .base import ModelCalls


def files_of(folder: str) -> list:
    path = Path(folder)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
    return [str(path.resolve()), files]


def table_key(cfg, rows: Rows) -> str:
    """What decides the reference's values: the base model's files, the adapter continued, and the tokenized
    pairs (their cache entries already key the data, the tokenizer and the options)."""
    what = {
        "objective": cfg.train.objective,
        "model": files_of(cfg.model.path),
        "adapter": files_of(cfg.lora.init_from) if cfg.lora.init_from else None,
        "data": [s.cache_dir or s.source.path for s in rows.data.sources],
        "rows": [len(rows), rows.data.rows.tolist()[:8], int(rows.data.rows.sum())],
        "quant": [cfg.quant.type, cfg.quant.double_quant, cfg.quant.compute_dtype],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def reference_table(cfg, objective, calls: ModelCalls, accelerator, rows: Rows, pad_id: int, groups) -> torch.Tensor:
    """(samples, 2): the reference log-probabilities of each sample's two sequences (objective.reference_batch),
    read from the node's cache or computed (and cached) here."""
    path = cache_root(cfg.data) / f"reference-{table_key(cfg, rows)}.pt"
    have = torch.tensor(1.0 if path.is_file() else 0.0, device=accelerator.device)
    if accelerator.reduce(have, "sum").item() == accelerator.num_processes:
        say(f"the reference log-probabilities of {len(rows):,} samples read from {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    adapter_on = bool(cfg.lora.init_from)
    table = compute(objective, calls, accelerator, rows, cfg.train.micro_batch_size, pad_id, groups, adapter_on)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            torch.save(table, partial)
            os.replace(partial, path)  # whole or absent
            say(f"the reference log-probabilities of {len(rows):,} samples computed and kept in {path}")
        except OSError as error:
            say(f"could not keep the reference log-probabilities in {path} ({error}); a restart computes them again")
    return table


def compute(
    objective, calls: ModelCalls, accelerator, rows: Rows, micro: int, pad_id: int, groups, adapter_on: bool
) -> torch.Tensor:
    world, rank = groups.data_world, groups.data_rank
    mine = list(range(rank, len(rows), world))
    forwards = math.ceil(math.ceil(len(rows) / world) / micro)
    table = torch.zeros(len(rows), 2, device=accelerator.device)
    calls.model.eval()
    with torch.no_grad():
        for n in range(forwards):
            chunk = mine[n * micro : (n + 1) * micro]
            sequences = objective.reference_batch(rows, chunk or [0], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in sequences.items()}
            logps = calls.sequence_logps(batch) if adapter_on else calls.reference_logps(batch)
            if chunk:
                table[chunk, 0], table[chunk, 1] = logps.float().chunk(2)
    calls.model.train()
    return accelerator.reduce(table, "sum").cpu()  # each pair was filled by one rank
