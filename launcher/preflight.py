"""Plan: everything that can be wrong with the input is found here, before any process group starts."""

from __future__ import annotations

from pathlib import Path

from .config import DTYPES, ConfigError, RunConfig
from .data import TokenizedData, load_records, record_kind, tokenize

OUTPUT_MARKERS = ("adapter", "metrics.jsonl")


def check_values(cfg: RunConfig) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    require(cfg.quant.type in ("nf4", "fp4"), f"`quant.type` is `{cfg.quant.type}`; use nf4 or fp4.")
    require(cfg.quant.compute_dtype in DTYPES, f"`quant.compute_dtype` is `{cfg.quant.compute_dtype}`; use one of {', '.join(DTYPES)}.")
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
    require(t.lr_schedule in ("cosine", "linear", "constant"), f"`train.lr_schedule` is `{t.lr_schedule}`; use cosine, linear or constant.")
    require(t.mixed_precision in ("auto", "no", "bf16", "fp16"), f"`train.mixed_precision` is `{t.mixed_precision}`; use auto, no, bf16 or fp16.")
    require(cfg.data.max_seq_len > 1, f"`data.max_seq_len` must be at least 2, got {cfg.data.max_seq_len}.")
    for key in ("timeout_s", "rendezvous_timeout_s"):
        require(getattr(cfg.dist, key) > 0, f"`dist.{key}` must be a positive number of seconds, got {getattr(cfg.dist, key)}.")
    require(
        3 <= cfg.dist.preempt_exit_code <= 125,
        f"`dist.preempt_exit_code` must be in 3..125 (1 and 2 mean errors, above 125 the shell's own), got {cfg.dist.preempt_exit_code}.",
    )


def check_model(cfg: RunConfig) -> None:
    from transformers import AutoConfig

    path = cfg.model.path
    if not path:
        raise ConfigError("No model given. Set `model.path` to a local directory saved with `save_pretrained` (or a cached hub id).")
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"Model `{path}` not found: no `config.json` in that directory. Set `model.path` to a directory "
            "written by `save_pretrained` (it holds config.json and the weights)."
        )
    try:
        AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Model `{path}` could not be loaded offline: {error}. Download it first (e.g. `huggingface-cli "
            "download`) or point `model.path` at a local directory."
        ) from error


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
    """Reads the records and checks their fields (cheap: no tokenizer)."""
    record_kind(load_records(cfg.data).column_names, cfg.data)


def load_training_data(cfg: RunConfig, world_size: int):
    """The tokenizer and the tokenized dataset, checked to fill at least one optimizer step."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    data: TokenizedData = tokenize(load_records(cfg.data), tokenizer, cfg.data)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    if len(data) < global_batch:
        raise ConfigError(
            f"Dataset `{cfg.data.path}` has {len(data)} usable records ({data.dropped} dropped: no target token "
            f"within data.max_seq_len={cfg.data.max_seq_len}), but one optimizer step needs {global_batch} "
            f"(micro_batch_size {cfg.train.micro_batch_size} x grad_accum_steps {cfg.train.grad_accum_steps} x "
            f"{world_size} ranks). Add data or lower the batch settings."
        )
    return tokenizer, data


def check_all(cfg: RunConfig) -> None:
    """Every check that needs no tokenization; `qlaunch train` runs it before starting any process."""
    from . import strategies

    check_values(cfg)
    strategies.resolve(cfg).check(cfg)
    check_model(cfg)
    check_dataset(cfg)
    if not cfg.resume:  # a resumed run finds its own output there (a requeued job does); the ranks check the checkpoint
        check_output_dir(cfg)
