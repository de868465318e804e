"""Tokenize once per node, reuse on every later start: the tokenized data of each source, memory-mapped.

A source's tokens are kept on disk under a key made of the data file (path, size, modification
time), the tokenizer (its vocabulary, merges, special tokens and chat template) and every option that
changes the result; the cache directory is `data.cache_dir`. The first process of a node to start takes a file lock and
tokenizes (batched, through `datasets.map`) into a temporary directory renamed into place when
complete; the others wait for the lock and read what it wrote. A later start with the same key (a
requeue, a resume, another strategy) memory-maps the Arrow file and tokenizes nothing: the host RAM
of each rank holds only what a batch reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from ..config import DataConfig, DataSource
from ..node_cache import exclusive, fresh_temporary, say
from ..objective_config import RECORDS
from .records import load_records, tokenize

CACHE_FORMAT = 3
"""Raise when the tokenized table changes meaning: every cached entry is then tokenized again."""


@dataclass
class SourceData:
    """One source's tokenized samples and what tokenizing it kept and dropped."""

    source: DataSource
    table: object
    """A `datasets.Dataset` (input_ids, labels, targets, truncated), memory-mapped from the cache."""
    records: int
    dropped: int
    """Records left with no target token after truncation at max_seq_len."""
    truncated: int
    """Samples cut at max_seq_len (kept: a target token was left)."""
    cache_dir: str
    cache_hit: bool
    lengths: np.ndarray = field(init=False)
    targets: np.ndarray = field(init=False)
    desirable: np.ndarray = field(init=False)
    """KTO's samples: whether each completion is desirable (all true for other data)."""

    def __post_init__(self):
        import pyarrow.compute as pc

        arrow = self.table.data
        self.lengths = sum(
            pc.list_value_length(arrow.column(name)).to_numpy().astype(np.int64)
            for name in ("input_ids", "rejected_input_ids")
            if name in arrow.column_names
        )
        self.targets = arrow.column("targets").to_numpy().astype(np.int64)
        has_label = "desirable" in arrow.column_names
        self.desirable = arrow.column("desirable").to_numpy(zero_copy_only=False) if has_label else self.targets >= 0


@dataclass
class TokenizedData:
    """Samples drawn from one or more sources: sample i is row `rows[i]` of source `parts[i]`."""

    sources: list[SourceData]
    parts: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return self._gather("lengths")

    @property
    def targets(self) -> np.ndarray:
        return self._gather("targets")

    @cached_property
    def desirable(self) -> np.ndarray:
        """Read by every step's totals and collate: gathered once."""
        return self._gather("desirable").astype(bool)

    def _gather(self, name: str) -> np.ndarray:
        out = np.zeros(len(self), dtype=np.int64)
        for k, source in enumerate(self.sources):
            mine = self.parts == k
            out[mine] = getattr(source, name)[self.rows[mine]]
        return out

    def sample(self, i: int) -> tuple[list[int], list[int]]:
        """Sample i's ids and labels (of a pair: the chosen sequence)."""
        row = self.sources[self.parts[i]].table[int(self.rows[i])]
        return row["input_ids"], row["labels"]

    def images(self, i: int) -> list[str]:
        """Sample i's image files (none but of image chat records)."""
        row = self.sources[self.parts[i]].table[int(self.rows[i])]
        return row.get("images") or []

    def rejected(self, i: int) -> tuple[list[int], list[int]]:
        """The rejected sequence of pair i."""
        row = self.sources[self.parts[i]].table[int(self.rows[i])]
        return row["rejected_input_ids"], row["rejected_labels"]

    def subset(self, indices: np.ndarray) -> TokenizedData:
        return TokenizedData(self.sources, self.parts[indices], self.rows[indices])


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if os.environ.get("QLAUNCH_DATA_CACHE"):
        return Path(os.environ["QLAUNCH_DATA_CACHE"])
    return Path.home() / ".cache" / "qlaunch" / "data"


def tokenizer_fingerprint(tokenizer, processor=None) -> str:
    """What decides the ids a tokenizer gives: its whole definition, special tokens and chat template (and a
    vision-language model's processor: its image processor decides how many tokens an image makes)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if processor is not None:
        digest.update(processor.processor.image_processor.to_json_string().encode())
        digest.update(json.dumps(getattr(processor.processor, "chat_template", None)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for part in (tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None)):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(source: DataSource, tokenizer_print: str, cfg: DataConfig, records: str) -> str:
    stat = Path(source.path).stat()
    what = {
        "format": CACHE_FORMAT,
        "file": [str(Path(source.path).resolve()), stat.st_size, stat.st_mtime_ns],
        "source": asdict(replace(source, weight=1.0)),
        "tokenizer": tokenizer_print,
        "chat_template": cfg.chat_template,
        "max_seq_len": cfg.max_seq_len,
        "records": [records, cfg.max_prompt_len] if records != "sft" else records,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def tokenized_source(
    source: DataSource, tokenizer, cfg: DataConfig, tokenizer_print: str, objective: str = "sft", processor=None
) -> SourceData:
    """The source's tokens: read from the cache, or tokenized into it by the first process to ask; tokenized
    in memory where the cache cannot be written (a full or read-only disk costs the next start, not this one)."""
    root = cache_root(cfg)
    key = cache_key(source, tokenizer_print, cfg, RECORDS[objective])
    entry, hit = root / key, True
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not entry.is_dir():
            with exclusive(root, key, f"waiting for another process tokenizing `{source.path}` into {entry}"):
                if not entry.is_dir():
                    build_entry(source, tokenizer, cfg, root, key, objective, processor)
                    hit = False
    except OSError as error:
        say(f"could not write the tokenized data into the cache {root} ({error}); tokenized in memory, not cached")
        return tokenized_in_memory(source, tokenizer, cfg, objective, processor)
    meta = json.loads((entry / "meta.json").read_text())
    if hit:
        say(f"`{source.path}`: {meta['kept']:,} samples read from the cache {entry}, not tokenized again")
    return open_entry(source, entry, meta, hit)


def build_entry(
    source: DataSource, tokenizer, cfg: DataConfig, root: Path, key: str, objective: str, processor=None
) -> None:
    """Tokenizes into `<key>.tmp-<pid>` and renames it to `<key>` once complete: an entry is whole or absent."""
    import datasets

    partial = fresh_temporary(root, key)
    started = time.perf_counter()
    records = load_records(source)
    if sys.stderr.isatty():  # tokenizing a large dataset takes minutes: show it (a bar in a log file is noise)
        datasets.enable_progress_bars()
    try:
        table = tokenize(records, tokenizer, source, cfg, objective, str(partial / "data.arrow"), processor)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        datasets.disable_progress_bars()
    meta = {
        "path": source.path,
        "files": sorted(f.name for f in partial.glob("*.arrow")),
        "records": len(records),
        "kept": len(table),
        "truncated": truncated_count(table),
        "tokenize_s": round(time.perf_counter() - started, 3),
    }
    del table
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    os.rename(partial, root / key)
    say(f"`{source.path}`: {meta['records']:,} records tokenized in {meta['tokenize_s']:.1f} s into {root / key}")


def tokenized_in_memory(source: DataSource, tokenizer, cfg: DataConfig, objective: str, processor=None) -> SourceData:
    records = load_records(source)
    table = tokenize(records, tokenizer, source, cfg, objective, processor=processor)
    return SourceData(source, table, len(records), len(records) - len(table), truncated_count(table), "", False)


def truncated_count(table) -> int:
    return int(np.count_nonzero(table.data.column("truncated").to_numpy()))


def open_entry(source: DataSource, entry: Path, meta: dict, hit: bool) -> SourceData:
    import datasets

    tables = [datasets.Dataset.from_file(str(entry / name)) for name in meta["files"]]
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    dropped = meta["records"] - meta["kept"]
    return SourceData(source, table, meta["records"], dropped, meta["truncated"], str(entry), hit)


def load_tokenized(
    cfg: DataConfig, tokenizer, seed: int, objective: str = "sft", processor=None
) -> tuple[TokenizedData, TokenizedData | None]:
    """The training samples, mixed from every source by weight, and the eval samples (None without an
    eval split). Both are pure functions of the data, the tokenizer (and a vision-language model's `processor`), the
    options and the seed."""
    fingerprint = tokenizer_fingerprint(tokenizer, processor)
    sources = [tokenized_source(s, tokenizer, cfg, fingerprint, objective, processor) for s in cfg.sources()]
    rng = np.random.default_rng(seed)
    train_parts, eval_parts = [], []
    for k, source in enumerate(sources):
        rows = rng.permutation(len(source.table))
        held = held_out(len(rows), cfg.eval_fraction)
        eval_parts.append((k, np.sort(rows[:held])))
        train_parts.append((k, weighted(np.sort(rows[held:]), source.source.weight, rng)))
    train = combine(sources, train_parts)
    if cfg.eval_path:
        eval_data = tokenized_source(cfg.eval_source(), tokenizer, cfg, fingerprint, objective, processor)
        return train, combine([eval_data], [(0, np.arange(len(eval_data.table)))])
    return train, combine(sources, eval_parts) if cfg.eval_fraction > 0 else None


def held_out(n: int, fraction: float) -> int:
    return min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0


def weighted(rows: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
    """`weight` times the rows: whole copies, then a seeded choice for the fraction."""
    whole, fraction = divmod(weight, 1.0)
    extra = rng.choice(rows, size=round(fraction * len(rows)), replace=False) if len(rows) else rows
    return np.concatenate([np.tile(rows, int(whole)), np.sort(extra)])


def combine(sources: list[SourceData], parts: list[tuple[int, np.ndarray]]) -> TokenizedData:
    return TokenizedData(
        sources,
        np.concatenate([np.full(len(rows), k, dtype=np.int64) for k, rows in parts]),
        np.concatenate([rows.astype(np.int64) for _, rows in parts]),
    )
