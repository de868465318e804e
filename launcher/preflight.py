"""Validate: everything that can be wrong with the input is found here, before any process group starts,
and what a run resolves once (strategy, world size, precision, resume) becomes one frozen `RunSetup`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, strategies, tracking
from .accelerator import mixed_precision
from .batches import Rows
from .config import ConfigError, DataConfig, ModelConfig, RunConfig
from .data import load_records, record_kind
from .dtypes import DTYPES, MIXED_PRECISIONS, DtypePolicy
from .model import read_model_config
from .tokenized import load_tokenized

OUTPUT_MARKERS = ("adapter", "metrics.jsonl")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_values(cfg: RunConfig) -> None:
    require(cfg.quant.type in ("nf4", "fp4"), f"`quant.type` is `{cfg.quant.type}`; use nf4 or fp4.")
    require(
        cfg.quant.compute_dtype in DTYPES,
        f"`quant.compute_dtype` is `{cfg.quant.compute_dtype}`; use one of {', '.join(DTYPES)}.",
    )
    require(
        cfg.quant.storage_dtype in ("auto",) + DTYPES,
        f"`quant.storage_dtype` is `{cfg.quant.storage_dtype}`; use auto or one of {', '.join(DTYPES)}.",
    )
    require(cfg.lora.r > 0, f"`lora.r` must be a positive integer, got {cfg.lora.r}.")
    require(cfg.lora.alpha > 0, f"`lora.alpha` must be positive, got {cfg.lora.alpha}.")
    require(0 <= cfg.lora.dropout < 1, f"`lora.dropout` must be in [0, 1), got {cfg.lora.dropout}.")
    t = cfg.train
    for key in ("micro_batch_size", "grad_accum_steps", "epochs", "log_interval"):
        require(getattr(t, key) > 0, f"`train.{key}` must be a positive integer, got {getattr(t, key)}.")
    require(t.max_steps >= 0, f"`train.max_steps` must be 0 (use epochs) or positive, got {t.max_steps}.")
    require(t.warmup_steps >= 0, f"`train.warmup_steps` must be >= 0, got {t.warmup_steps}.")
    require(t.lr > 0, f"`train.lr` must be positive, got {t.lr}.")
    require(
        t.lr_schedule in ("cosine", "linear", "constant"),
        f"`train.lr_schedule` is `{t.lr_schedule}`; use cosine, linear or constant.",
    )
    require(
        t.mixed_precision in MIXED_PRECISIONS,
        f"`train.mixed_precision` is `{t.mixed_precision}`; use {', '.join(MIXED_PRECISIONS)}.",
    )
    require(t.eval_every_steps >= 0, f"`train.eval_every_steps` must be >= 0, got {t.eval_every_steps}.")
    tracking.check(t)
    check_data_values(cfg.data)
    for key in ("timeout_s", "rendezvous_timeout_s"):
        require(
            getattr(cfg.dist, key) > 0,
            f"`dist.{key}` must be a positive number of seconds, got {getattr(cfg.dist, key)}.",
        )
    require(
        3 <= cfg.dist.preempt_exit_code <= 125,
        f"`dist.preempt_exit_code` must be in 3..125 (1 and 2 mean errors, above 125 the shell's own), got {cfg.dist.preempt_exit_code}.",
    )


def check_data_values(d: DataConfig) -> None:
    require(d.max_seq_len > 1, f"`data.max_seq_len` must be at least 2, got {d.max_seq_len}.")
    require(
        not (d.datasets and d.path),
        "Both `data.path` and `data.datasets` are set. Use `data.path` for one dataset, or list every dataset "
        "(this one too) under `data.datasets`.",
    )
    for i, source in enumerate(d.datasets):
        require(source.weight > 0, f"`data.datasets[{i}].weight` must be positive, got {source.weight}.")
    require(0 <= d.eval_fraction < 1, f"`data.eval_fraction` must be in [0, 1), got {d.eval_fraction}.")
    require(
        not (d.eval_path and d.eval_fraction),
        "Both `data.eval_path` and `data.eval_fraction` are set: evaluate on a held-out file, or hold out a "
        "fraction of the training data, not both.",
    )


def check_model(cfg: RunConfig) -> None:
    read_model_config(cfg.model.path, cfg.model.trust_remote_code)


def check_output_dir(cfg: RunConfig) -> None:
    """Refuses to start a fresh run over an earlier one.

    With `resume: auto` and no checkpoint yet, only a finished run (its `adapter/`) blocks: a job requeued
    after being killed before its first checkpoint starts again from step 0 and restarts its metrics log.
    """
    out = Path(cfg.output_dir)
    markers = ("adapter",) if cfg.resume == "auto" else OUTPUT_MARKERS
    found = [name for name in markers if (out / name).exists()]
    if found and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"Output directory `{out}` already holds a run ({', '.join(found)}). Choose a new `output_dir`, or set "
            "`overwrite_output_dir: true` (--overwrite_output_dir true) to replace it."
        )


def check_dataset(cfg: RunConfig) -> None:
    """Reads the records of every source and checks their fields (cheap: no tokenizer)."""
    sources = cfg.data.sources() + ([cfg.data.eval_source()] if cfg.data.eval_path else [])
    for source in sources:
        record_kind(load_records(source).column_names, source)


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_training_data(cfg: RunConfig, world_size: int):
    """The tokenizer and the rows to train on (and to evaluate on, or None), checked to fill at least one
    optimizer step."""
    tokenizer = load_tokenizer(cfg.model)
    train_data, eval_data = load_tokenized(cfg.data, tokenizer, cfg.train.seed)
    rows = Rows(train_data, cfg.data.packing, cfg.data.max_seq_len)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    if len(rows) < global_batch:
        dropped = ", ".join(f"{s.dropped} of {s.records} in `{s.source.path}`" for s in train_data.sources)
        raise ConfigError(
            f"The training data makes {len(rows)} rows (records dropped, with no target token within "
            f"data.max_seq_len={cfg.data.max_seq_len}: {dropped}), but one optimizer step needs {global_batch} "
            f"(micro_batch_size {cfg.train.micro_batch_size} x grad_accum_steps {cfg.train.grad_accum_steps} x "
            f"{world_size} ranks). Add data or lower the batch settings."
        )
    eval_rows = Rows(eval_data, cfg.data.packing, cfg.data.max_seq_len) if eval_data is not None else None
    return tokenizer, rows, eval_rows


def check_all(cfg: RunConfig) -> strategies.Strategy:
    """Every check that needs no tokenization; `qlaunch train` runs it before starting any process.
    Returns the run's strategy."""
    check_values(cfg)
    strategy = strategies.resolve(cfg)
    strategies.check(strategy, cfg)
    check_model(cfg)
    check_dataset(cfg)
    if not cfg.resume:  # a resumed run finds its own output there (a requeued job does); the ranks check the checkpoint
        check_output_dir(cfg)
    return strategy


@dataclass(frozen=True)
class RunSetup:
    """What a run resolves once, in every rank, before any process group: the stages take it."""

    cfg: RunConfig
    """The run config with strategy and mixed precision resolved (a copy; written to run_config.yaml)."""
    strategy: strategies.Strategy
    sharder: strategies.Strategy
    """What shards: the strategy, or nothing on a world of one (the strategy's dtypes stay)."""
    world: int
    policy: DtypePolicy
    resume_from: Path | None


def resolve_run(cfg: RunConfig, world: int) -> RunSetup:
    """Validates `cfg` for a run of `world` ranks and resolves it (the user's `cfg` is left as it was)."""
    strategy = strategies.resolve(cfg)
    check_values(cfg)
    strategies.check(strategy, cfg)
    check_model(cfg)
    precision = mixed_precision(cfg.train.mixed_precision)
    resolved = dataclasses.replace(
        cfg, strategy=strategy.name, train=dataclasses.replace(cfg.train, mixed_precision=precision)
    )
    sharder = strategies.for_world(strategy, world)
    resume_from = checkpoint.resolve_resume(resolved, strategy, sharder, world)
    if resume_from is None:
        check_output_dir(resolved)
    policy = strategies.dtype_policy(resolved, strategy, precision)
    return RunSetup(resolved, strategy, sharder, world, policy, resume_from)
