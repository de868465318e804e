"""Records: local json / jsonl / parquet / text read through `datasets` and turned into token ids and labels.

Records hold `text` (loss on every token), `messages` (a chat rendered with the tokenizer's chat
template, loss on the assistant turns: chat.py), `prompt` + `completion` (loss on the completion
only; both may be message lists, then rendered as one chat with the loss on the completion's turns),
or `input_ids` already tokenized (with `labels`, -100 where the loss ignores a token, or the loss on
every token). `tokenize` runs batched through `datasets.map`; tokenized.py keeps its result on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError, DataConfig, DataSource, spoken_choices
from ..objective_config import RECORDS
from ..quiet import quiet_logger
from .chat import assistant_turns, check_messages, tokenize_chat, use_chat_template
from .images import VisionEncoder, VisionProcessor
from .labels import IGNORE_INDEX, target_tokens
from .pairs import PairEncoder, UnpairedEncoder, pair_features, unpaired_features

FORMAT_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def dataset_format(source: DataSource) -> str:
    if source.format != "auto":
        if source.format not in ("json", "jsonl", "parquet", "text"):
            raise ConfigError(
                f"The format of `{source.path}` is `{source.format}`; use auto, json, jsonl, parquet or text."
            )
        return "json" if source.format == "jsonl" else source.format
    suffix = Path(source.path).suffix.lower()
    if suffix not in FORMAT_BY_SUFFIX:
        raise ConfigError(
            f"Cannot tell the format of `{source.path}` from its ending. Set its `format` "
            "(`data.format`, or `format` in its `data.datasets` entry) to json, jsonl, parquet or text."
        )
    return FORMAT_BY_SUFFIX[suffix]


def load_records(source: DataSource):
    import datasets

    if not source.path or not Path(source.path).exists():
        raise ConfigError(
            f"Dataset `{source.path}` does not exist. Set `data.path` (or each `data.datasets` entry's `path`) "
            "to a local json, jsonl, parquet or text file."
        )
    fmt = dataset_format(source)
    if Path(source.path).is_file() and Path(source.path).stat().st_size == 0:
        raise ConfigError(f"Dataset `{source.path}` is empty. Point `data.path` at a file with records.")
    datasets.disable_progress_bars()
    try:
        with quiet_logger("datasets"):  # it logs the failure too: the error below says it once
            return datasets.load_dataset(fmt, data_files=str(source.path), split="train")
    except Exception as error:  # datasets raises many kinds; all mean the file is unreadable as `fmt`
        cause = error.__cause__ or error  # datasets wraps the parser's error in a generic one
        raise ConfigError(
            f"Could not read `{source.path}` as {fmt}: {cause}. Check the file or set its `format`."
        ) from error


def record_kind(columns: list[str], source: DataSource) -> str:
    """'text', 'tokens', 'messages', 'pairs', 'unpaired' (prompt, completion, label) or 'prompt_completion', or a
    ConfigError naming the fields that are missing."""
    if source.chosen_field in columns and source.rejected_field in columns:
        return "pairs"
    if source.text_field in columns:
        return "text"
    if "input_ids" in columns:
        return "tokens"
    if source.messages_field in columns and source.images_field in columns:
        return "vision"
    if source.messages_field in columns:
        return "messages"
    if source.prompt_field in columns and source.completion_field in columns:
        return "unpaired" if source.label_field in columns else "prompt_completion"
    raise ConfigError(
        f"Dataset `{source.path}` has fields {sorted(columns)}, but each record needs `{source.text_field}`, "
        f"`{source.messages_field}`, `{source.prompt_field}` and `{source.completion_field}`, `input_ids`, or (pairs) "
        f"`{source.chosen_field}` and `{source.rejected_field}`, or (kto) `{source.prompt_field}`, "
        f"`{source.completion_field}` and `{source.label_field}`. Rename "
        "the fields in the data or set `data.text_field` / `data.messages_field` / `data.prompt_field` / "
        "`data.completion_field` (in a `data.datasets` entry: its own `text_field` and so on)."
    )


def features(images: bool = False):
    """The tokenized table: ids and labels (int32 on disk), target tokens, whether the record was cut (and, of image
    chat records, each sample's image files)."""
    from datasets import Features, List, Value

    columns = {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "targets": Value("int32"),
        "truncated": Value("bool"),
    }
    return Features({**columns, "images": List(Value("string"))} if images else columns)


def check_vision(source: DataSource, processor) -> None:
    if processor is None:
        raise ConfigError(
            f"Dataset `{source.path}` holds image chat records (`{source.messages_field}` and `{source.images_field}`), "
            "but the model at `model.path` is a text-only causal LM. Point `model.path` at a vision-language "
            "(image-text-to-text) model, or drop the images."
        )


TAKES = {
    "sft": ("text", "tokens", "messages", "prompt_completion", "vision"),
    "pairs": ("pairs",),
    "unpaired": ("unpaired", "pairs"),
}
"""The record kinds each tokenized shape (objective_config.RECORDS) is made from."""
HELD = {
    "vision": "image chat records (`messages`, `images`)",
    "pairs": "preference pairs (`chosen`, `rejected`)",
    "unpaired": "completions labelled desirable or not (`prompt`, `completion`, `label`)",
}


def check_kind(kind: str, objective: str, source: DataSource) -> None:
    """Each objective trains on its own kind of records (objective_config.RECORDS)."""
    if kind in TAKES[RECORDS[objective]]:
        return
    takers = spoken_choices(tuple(name for name, records in RECORDS.items() if kind in TAKES[records]))
    wanted = {"sft": "SFT records", "pairs": "preference pairs", "unpaired": "labelled completions or pairs"}
    raise ConfigError(
        f"Dataset `{source.path}` holds {HELD.get(kind, kind.replace('_', '/') + ' records')}, which train.objective "
        f"`{objective}` does not train on. Set `train.objective` to {takers}, or point data.path at "
        f"{wanted[RECORDS[objective]]}."
    )


def is_chat(records, kind: str, source: DataSource) -> bool:
    """Whether the records are message lists (rendered with the chat template)."""
    field = {"prompt_completion": source.prompt_field, "unpaired": source.prompt_field, "pairs": source.chosen_field}
    field = field.get(kind)
    return kind in ("messages", "vision") or (
        field is not None and len(records) > 0 and isinstance(records[0][field], list)
    )


def tokenize(
    records,
    tokenizer,
    source: DataSource,
    cfg: DataConfig,
    objective: str = "sft",
    cache_file: str | None = None,
    processor: VisionProcessor | None = None,
):
    """The records as a `datasets.Dataset` of token ids and labels (see `features`, or pairs.py for preference
    records), batched; records left with no target token within `max_seq_len` are dropped. Written to `cache_file`
    (one file per worker: `<name>_NNNNN_of_NNNNN.arrow` when several), else kept in memory. Image chat records need
    the `processor` of a vision-language model (images.py)."""
    kind = record_kind(records.column_names, source)
    check_kind(kind, objective, source)
    chat = is_chat(records, kind, source)
    if kind == "vision":
        check_vision(source, processor)
        use_chat_template(processor.processor, cfg.chat_template, source.path)
    elif chat:
        use_chat_template(tokenizer, cfg.chat_template, source.path)
    if kind == "vision":
        encode, table_features = VisionEncoder(processor, source, cfg.max_seq_len), features(images=True)
    elif RECORDS[objective] == "pairs":
        encode, table_features = PairEncoder(tokenizer, source, cfg, chat), pair_features()
    elif RECORDS[objective] == "unpaired":
        encode, table_features = UnpairedEncoder(tokenizer, source, cfg, chat, kind), unpaired_features()
    else:
        encode, table_features = Encoder(tokenizer, "chat" if chat else kind, source, cfg.max_seq_len), features()
    workers = tokenize_workers(cfg.tokenize_workers, chat, len(records))
    try:
        return records.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=records.column_names,
            features=table_features,
            cache_file_name=cache_file,
            keep_in_memory=cache_file is None,
            load_from_cache_file=False,
            num_proc=workers if workers > 1 and cache_file else None,
            new_fingerprint="qlaunch-tokenized",  # tokenized.py keys the cache; skips hashing the tokenizer
            desc=f"qlaunch: tokenizing {source.path}",
        )
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"Dataset `{source.path}` is not UTF-8 text: {error.reason} (byte {error.object[error.start]:#04x} in "
            f"{error.object[max(0, error.start - 12) : error.start + 12]!r}). Re-encode it as UTF-8, e.g. "
            "`iconv -f latin1 -t utf-8 IN > OUT`."
        ) from error


def tokenize_workers(configured: int, chat: bool, records: int) -> int:
    """Chat templates render in Python, one record at a time: there, every core pays (measured 2.7 ms a
    record on one core). Plain text goes through the fast tokenizer's own threads in one process."""
    if configured:
        return configured
    return min(os.cpu_count() or 1, 16) if chat and records >= 1000 else 1


class Encoder:
    """`datasets.map`'s batched function: a batch of records to ids, labels, target counts."""

    def __init__(self, tokenizer, kind: str, source: DataSource, max_seq_len: int):
        self.tokenizer, self.kind, self.source, self.max_seq_len = tokenizer, kind, source, max_seq_len
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {name: [] for name in ("input_ids", "labels", "targets", "truncated")}
        for ids, labels in self.encode(batch, indices):
            labels = labels[: self.max_seq_len]
            kept = target_tokens(labels)
            if kept == 0:
                continue
            out["input_ids"].append(ids[: self.max_seq_len])
            out["labels"].append(labels)
            out["targets"].append(kept)
            out["truncated"].append(len(ids) > self.max_seq_len)
        return out

    def encode(self, batch: dict[str, list], indices: list[int]):
        s, tokenizer, eos = self.source, self.tokenizer, self.eos
        where = [f"Dataset `{s.path}`, record {index}" for index in indices]
        if self.kind == "text":
            for ids in tokenizer(batch[s.text_field])["input_ids"]:
                yield ids + eos, ids + eos
        elif self.kind == "tokens":
            labels = batch.get("labels") or [None] * len(indices)
            for ids, given, at in zip(batch["input_ids"], labels, where, strict=True):
                yield tokenized_record(ids, given, len(tokenizer), at)
        elif self.kind == "chat":
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            for record, at in zip(rows, where, strict=True):
                yield chat_record(tokenizer, record, s, at)
        else:
            prompts = tokenizer(batch[s.prompt_field])["input_ids"]
            completions = tokenizer(batch[s.completion_field], add_special_tokens=False)["input_ids"]
            for prompt, completion in zip(prompts, completions, strict=True):
                yield prompt + completion + eos, [IGNORE_INDEX] * len(prompt) + completion + eos


def tokenized_record(ids: list[int], labels: list[int] | None, vocab: int, where: str) -> tuple[list[int], list[int]]:
    """A pre-tokenized record as it is: its `labels` if given, else the loss on every token."""
    if labels is None:
        labels = list(ids)
    if len(labels) != len(ids):
        raise ConfigError(f"{where}: `labels` has {len(labels)} entries for {len(ids)} `input_ids`.")
    if ids and not 0 <= min(ids) <= max(ids) < vocab:
        raise ConfigError(f"{where}: `input_ids` holds ids outside the tokenizer's vocabulary (0..{vocab - 1}).")
    return list(ids), list(labels)


def chat_record(tokenizer, record: dict, source: DataSource, where: str) -> tuple[list[int], list[int]]:
    """A chat record's ids and labels: the assistant turns of `messages`, or every turn of `completion`."""
    if source.messages_field in record:
        messages = record[source.messages_field]
        check_messages(messages, where)
        targets = assistant_turns(messages)
    else:
        prompt, completion = record[source.prompt_field], record[source.completion_field]
        check_messages(prompt, f"{where}, `{source.prompt_field}`")
        check_messages(completion, f"{where}, `{source.completion_field}`")
        messages = prompt + completion
        targets = list(range(len(prompt), len(messages)))
    ids, in_target = tokenize_chat(tokenizer, messages, targets, where)
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, in_target, strict=True)]
