"""`qlaunch data`: what the data pipeline will feed the run, without training.

Records read, kept and dropped (and why), tokens and target tokens, how much of each micro batch is
padding, and a few samples decoded with the part the loss ignores marked, so users can check their
masking (chat templates above all) before they spend GPU hours.
"""

from __future__ import annotations

import json

from .config import RunConfig
from .data import IGNORE_INDEX, GlobalBatches, TokenizedData, load_records, target_tokens, tokenize
from .preflight import load_tokenizer


def segments(ids: list[int], labels: list[int], tokenizer) -> list[dict]:
    """A sample as runs of text, each with whether the loss covers it."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        loss = label != IGNORE_INDEX
        if not runs or runs[-1][0] != loss:
            runs.append((loss, []))
        runs[-1][1].append(token)
    return [{"loss": loss, "text": tokenizer.decode(tokens)} for loss, tokens in runs]


def padding_efficiency(data: TokenizedData, micro_batch_size: int, seed: int) -> float:
    """Real tokens over padded ones, across one epoch's micro batches as the sampler draws them."""
    batches = GlobalBatches(len(data), micro_batch_size, 1, 1, seed)
    real = padded = 0
    for step in range(batches.steps_per_epoch):
        lengths = [len(data.input_ids[i]) for i in batches.step_samples(step)]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return real / padded if padded else 0.0


def report(cfg: RunConfig, samples: int) -> dict:
    tokenizer = load_tokenizer(cfg.model)
    records = load_records(cfg.data)
    data = tokenize(records, tokenizer, cfg.data)
    tokens = sum(len(ids) for ids in data.input_ids)
    targets = sum(target_tokens(labels) for labels in data.labels)
    return {
        "path": cfg.data.path,
        "records_read": len(records),
        "records_kept": len(data),
        "records_dropped_no_target_within_max_seq_len": data.dropped,
        "records_truncated": data.truncated,
        "max_seq_len": cfg.data.max_seq_len,
        "tokens": tokens,
        "target_tokens": targets,
        "micro_batch_size": cfg.train.micro_batch_size,
        "padding_efficiency": round(padding_efficiency(data, cfg.train.micro_batch_size, cfg.train.seed), 4),
        "samples": [segments(data.input_ids[i], data.labels[i], tokenizer) for i in range(min(samples, len(data)))],
    }


def render(summary: dict) -> str:
    lines = [
        f"Data: {summary['path']}",
        f"  records: {summary['records_read']:,} read, {summary['records_kept']:,} kept, "
        f"{summary['records_dropped_no_target_within_max_seq_len']:,} dropped (no target token within "
        f"max_seq_len {summary['max_seq_len']}), {summary['records_truncated']:,} truncated",
        f"  tokens: {summary['tokens']:,}, of which the loss covers {summary['target_tokens']:,} "
        f"({summary['target_tokens'] / max(1, summary['tokens']):.1%})",
        f"  padding: micro batches of {summary['micro_batch_size']} are {summary['padding_efficiency']:.1%} real tokens",
    ]
    for n, sample in enumerate(summary["samples"]):
        lines.append(f"\nSample {n} (the loss ignores the parts in [[...]]):")
        lines.append("".join(s["text"] if s["loss"] else f"[[{s['text']}]]" for s in sample))
    return "\n".join(lines)


def run(cfg: RunConfig, samples: int, as_json: bool) -> None:
    summary = report(cfg, samples)
    print(json.dumps(summary, indent=2) if as_json else render(summary))
