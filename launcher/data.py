"""Data: local json / jsonl / parquet / text through `datasets`, tokenized, sampled deterministically.

Records hold `text` (loss on every token), `messages` (a chat rendered with the tokenizer's chat
template, loss on the assistant turns: chat.py), `prompt` + `completion` (loss on the completion
only; both may be message lists, then rendered as one chat with the loss on the completion's turns),
or `input_ids` already tokenized (with `labels`, -100 where the loss ignores a token, or the loss on
every token). Sampling is a pure function of (seed, optimizer step): every rank can compute which samples
every other rank sees, so a 2-rank run and a 1-process run with the same global batch see the
same data, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .chat import assistant_turns, check_messages, tokenize_chat, use_chat_template
from .config import ConfigError, DataConfig

FORMAT_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
IGNORE_INDEX = -100


def dataset_format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        if cfg.format not in ("json", "jsonl", "parquet", "text"):
            raise ConfigError(f"`data.format` is `{cfg.format}`; use auto, json, jsonl, parquet or text.")
        return "json" if cfg.format == "jsonl" else cfg.format
    suffix = Path(cfg.path).suffix.lower()
    if suffix not in FORMAT_BY_SUFFIX:
        raise ConfigError(
            f"Cannot tell the format of `{cfg.path}` from its ending. Set `data.format` to json, jsonl, parquet or text."
        )
    return FORMAT_BY_SUFFIX[suffix]


def load_records(cfg: DataConfig):
    import datasets

    if not Path(cfg.path).exists():
        raise ConfigError(
            f"Dataset `{cfg.path}` does not exist. Set `data.path` to a local json, jsonl, parquet or text file."
        )
    fmt = dataset_format(cfg)
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(fmt, data_files=str(cfg.path), split="train")
    except Exception as error:  # datasets raises many kinds; all mean the file is unreadable as `fmt`
        raise ConfigError(
            f"Could not read `{cfg.path}` as {fmt}: {error}. Check the file or set `data.format`."
        ) from error


def record_kind(columns: list[str], cfg: DataConfig) -> str:
    """'text', 'tokens', 'messages' or 'prompt_completion', or a ConfigError naming the fields that are missing."""
    if cfg.text_field in columns:
        return "text"
    if "input_ids" in columns:
        return "tokens"
    if cfg.messages_field in columns:
        return "messages"
    if cfg.prompt_field in columns and cfg.completion_field in columns:
        return "prompt_completion"
    raise ConfigError(
        f"Dataset `{cfg.path}` has fields {sorted(columns)}, but each record needs `{cfg.text_field}`, "
        f"`{cfg.messages_field}`, `{cfg.prompt_field}` and `{cfg.completion_field}`, or `input_ids`. Rename the "
        "fields in the data or set `data.text_field` / `data.messages_field` / `data.prompt_field` / "
        "`data.completion_field`."
    )


@dataclass
class TokenizedData:
    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int
    """Records left with no target token after truncation."""
    truncated: int = 0
    """Records cut at data.max_seq_len (kept if a target token is left)."""

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(records, tokenizer, cfg: DataConfig) -> TokenizedData:
    kind = record_kind(records.column_names, cfg)
    chat = kind == "messages" or (
        kind == "prompt_completion" and len(records) > 0 and isinstance(records[0][cfg.prompt_field], list)
    )
    if chat:
        use_chat_template(tokenizer, cfg)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids, labels, dropped, truncated = [], [], 0, 0
    for index, record in enumerate(records):
        if kind == "text":
            ids = tokenizer(record[cfg.text_field])["input_ids"] + eos
            target = list(ids)
        elif kind == "tokens":
            ids, target = tokenized_record(record, len(tokenizer), f"Dataset `{cfg.path}`, record {index}")
        elif chat:
            ids, target = chat_record(tokenizer, record, kind, cfg, f"Dataset `{cfg.path}`, record {index}")
        else:
            prompt = tokenizer(record[cfg.prompt_field])["input_ids"]
            completion = tokenizer(record[cfg.completion_field], add_special_tokens=False)["input_ids"] + eos
            ids = prompt + completion
            target = [IGNORE_INDEX] * len(prompt) + completion
        truncated += len(ids) > cfg.max_seq_len
        ids, target = ids[: cfg.max_seq_len], target[: cfg.max_seq_len]
        if target_tokens(target) == 0:
            dropped += 1
            continue
        input_ids.append(ids)
        labels.append(target)
    return TokenizedData(input_ids, labels, dropped, truncated)


def tokenized_record(record: dict, vocab: int, where: str) -> tuple[list[int], list[int]]:
    """A pre-tokenized record as it is: its `labels` if given, else the loss on every token."""
    ids, labels = record["input_ids"], record.get("labels")
    if labels is None:
        labels = list(ids)
    if len(labels) != len(ids):
        raise ConfigError(f"{where}: `labels` has {len(labels)} entries for {len(ids)} `input_ids`.")
    if ids and not 0 <= min(ids) <= max(ids) < vocab:
        raise ConfigError(f"{where}: `input_ids` holds ids outside the tokenizer's vocabulary (0..{vocab - 1}).")
    return list(ids), list(labels)


def chat_record(tokenizer, record: dict, kind: str, cfg: DataConfig, where: str) -> tuple[list[int], list[int]]:
    """A chat record's ids and labels: the assistant turns of `messages`, or every turn of `completion`."""
    if kind == "messages":
        messages = record[cfg.messages_field]
        check_messages(messages, where)
        targets = assistant_turns(messages)
    else:
        prompt, completion = record[cfg.prompt_field], record[cfg.completion_field]
        check_messages(prompt, f"{where}, `{cfg.prompt_field}`")
        check_messages(completion, f"{where}, `{cfg.completion_field}`")
        messages = prompt + completion
        targets = list(range(len(prompt), len(messages)))
    ids, in_target = tokenize_chat(tokenizer, messages, targets, where)
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, in_target, strict=True)]


def target_tokens(labels: list[int]) -> int:
    """Tokens that count in the loss: shifted labels that are not ignored."""
    return sum(t != IGNORE_INDEX for t in labels[1:])


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


def collate(data: TokenizedData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        labels[row, :n] = torch.tensor(data.labels[i])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
