"""`qlaunch data`: what the data pipeline will feed the run, without training.

Records read, kept and dropped (and why), tokens and target tokens, how much of each micro batch is
padding, and a few samples decoded with the part the loss ignores marked, so users can check their
masking (chat templates above all) before they spend GPU hours.
"""

from __future__ import annotations

import json
import re

from ..config import RunConfig
from ..objective_config import RECORDS
from .batches import GlobalBatches, Rows
from .labels import IGNORE_INDEX
from .loading import load_tokenizer, load_vision_processor
from .tokenized import load_tokenized


def segments(ids: list[int], labels: list[int], tokenizer) -> list[dict]:
    """A sample as runs of text, each with whether the loss covers it."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        loss = label != IGNORE_INDEX
        if not runs or runs[-1][0] != loss:
            runs.append((loss, []))
        runs[-1][1].append(token)
    return [{"loss": loss, "text": tokenizer.decode(tokens)} for loss, tokens in runs]


def row_efficiency(rows: Rows, micro_batch_size: int, seed: int) -> float:
    """Real tokens over the tokens the model runs (padding included), across one epoch's micro batches."""
    batches = GlobalBatches(len(rows), micro_batch_size, 1, 1, seed)
    real = padded = 0
    for step in range(batches.steps_per_epoch):
        lengths = [rows.row_length(r) for r in batches.step_samples(step)]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return real / padded if padded else 0.0


def report(cfg: RunConfig, samples: int) -> dict:
    vision = load_vision_processor(cfg.model)
    tokenizer = load_tokenizer(cfg.model) if vision is None else vision.tokenizer
    records = RECORDS[cfg.train.objective]
    train, held_out = load_tokenized(cfg.data, tokenizer, cfg.train.seed, cfg.train.objective, vision)
    rows = Rows(train, cfg.data.packing, cfg.data.max_seq_len)
    return {
        "sources": [
            {
                "path": s.source.path,
                "weight": s.source.weight,
                "records_read": s.records,
                "records_kept": len(s.table),
                "records_dropped_no_target_within_max_seq_len": s.dropped,
                "records_truncated": s.truncated,
                "cache": s.cache_dir,
                "cache_hit": s.cache_hit,
            }
            for s in train.sources
        ],
        "max_seq_len": cfg.data.max_seq_len,
        "train_samples": len(train),
        "eval_samples": len(held_out) if held_out is not None else 0,
        "tokens": int(train.lengths.sum()),
        "target_tokens": int(train.targets.sum()),
        "packing": cfg.data.packing,
        "rows": len(rows),
        "micro_batch_size": cfg.train.micro_batch_size,
        "row_efficiency": round(row_efficiency(rows, cfg.train.micro_batch_size, cfg.train.seed), 4),
        "pairs": records == "pairs",
        "desirable": int(train.desirable.sum()) if records == "unpaired" else None,
        "samples": [shown(train, i, tokenizer, records) for i in range(min(samples, len(train)))],
        "image_token": tokenizer.decode([vision.image_token_id]) if vision else None,
    }


def shown(data, i: int, tokenizer, records: str) -> dict:
    """Sample i as `segments`: a pair's chosen and rejected sequences, a labelled completion's one sequence
    under its label, else its one sequence."""
    if records == "pairs":
        return {"chosen": segments(*data.sample(i), tokenizer), "rejected": segments(*data.rejected(i), tokenizer)}
    if records == "unpaired":
        label = "desirable" if data.desirable[i] else "undesirable"
        return {label: segments(*data.sample(i), tokenizer)}
    images = {"images": data.images(i)} if data.images(i) else {}
    return {"sequence": segments(*data.sample(i), tokenizer), **images}


def render(summary: dict) -> str:
    lines = []
    for s in summary["sources"]:
        lines += [
            f"Data: {s['path']} (weight {s['weight']:g}; {'read from' if s['cache_hit'] else 'tokenized into'} "
            f"the cache {s['cache']})",
            f"  records: {s['records_read']:,} read, {s['records_kept']:,} kept, "
            f"{s['records_dropped_no_target_within_max_seq_len']:,} dropped (no target token within max_seq_len "
            f"{summary['max_seq_len']}), {s['records_truncated']:,} truncated",
        ]
    layout = "packed into" if summary["packing"] else "in"
    lines += [
        f"Training samples: {summary['train_samples']:,} ({summary['eval_samples']:,} held out for eval)",
        f"  tokens: {summary['tokens']:,} ({'both sequences of each pair' if summary['pairs'] else 'padding aside'}); "
        f"{'the chosen completions hold' if summary['pairs'] else 'the loss covers'} {summary['target_tokens']:,} "
        f"({summary['target_tokens'] / max(1, summary['tokens']):.1%})",
        f"  rows: {layout} {summary['rows']:,} rows; micro batches of {summary['micro_batch_size']} are "
        f"{summary['row_efficiency']:.1%} real tokens",
    ]
    if summary.get("desirable") is not None:
        undesirable = summary["train_samples"] - summary["desirable"]
        lines.append(f"  labels: {summary['desirable']:,} desirable, {undesirable:,} undesirable completions")
    what = "Pair" if summary["pairs"] else "Sample"
    for n, sample in enumerate(summary["samples"]):
        lines.append(f"\n{what} {n} (the loss ignores the parts in [[...]]):")
        for name, runs in sample.items():
            if name == "images":
                lines.append(f"images: {', '.join(runs)}")
                continue
            text = "".join(s["text"] if s["loss"] else f"[[{s['text']}]]" for s in runs)
            if image := summary.get("image_token"):  # an image's run of tokens, as one mark with its count
                text = re.sub(f"(?:{re.escape(image)})+", lambda m: f"{image}x{len(m.group()) // len(image)}", text)
            lines.append(text if name == "sequence" else f"{name}: {text}")
    return "\n".join(lines)


def run(cfg: RunConfig, samples: int, as_json: bool) -> None:
    summary = report(cfg, samples)
    print(json.dumps(summary, indent=2) if as_json else render(summary))
