"""Validate: everything that can be wrong with the input is found here, before any process group starts,
and what a run resolves once (strategy, world size, precision, resume) becomes one frozen `RunSetup`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from . import objectives, strategies
from .checkpoint import store
from .config import ConfigError, DataConfig, RunConfig
from .data.records import check_kind, load_records, record_kind
from .dtypes import AUTOCAST_DTYPE_NAMES, DtypePolicy, resolve_mixed_precision
from .model.adapter_init import adopted
from .model.build import read_model_config
from .model.files import check_weights
from .model.lora_targets import check_gradient_checkpointing, check_lora_targets, meta_model_for_checks
from .run import sequence_parallel, tracking
from .run.accelerator import compute_dtype, mixed_precision

OUTPUT_MARKERS = ("adapter", "metrics.jsonl")


def check_model(cfg: RunConfig, strategy: strategies.Strategy) -> None:
    """The model's config, its weight files (their headers only), and on its meta skeleton the LoRA targets,
    gradient checkpointing and what the strategy's sharding needs of the model."""
    config = read_model_config(cfg.model.path, cfg.model.trust_remote_code)
    check_weights(cfg.model.path, getattr(config, "transformers_weights", None))
    base = meta_model_for_checks(cfg.model, cfg.quant, config)
    check_gradient_checkpointing(cfg.train, base)
    check_lora_targets(adopted(cfg.lora), cfg.model, base)
    sequence_parallel.check(config, cfg.train.sequence_parallel, cfg.model.path, base)
    if reason := strategy.model_refusal(base):
        raise ConfigError(f"{strategy.name} cannot shard `{cfg.model.path}`: {reason}.")


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


def check_dataset(data: DataConfig, objective: str = "sft") -> None:
    """Reads the records of every source and checks their fields and that `objective` trains on them (cheap: no
    tokenizer)."""
    sources = data.sources() + ([data.eval_source()] if data.eval_path else [])
    for source in sources:
        check_kind(record_kind(load_records(source).column_names, source), objective, source)


def check_run(cfg: RunConfig) -> strategies.Strategy:
    """The checks every rank runs before its process group (and `qlaunch train` before the launch); returns the
    run's strategy."""
    strategy = strategies.resolve(cfg)
    tracking.check(cfg.train)
    objectives.get(cfg).check()
    strategies.check(strategy, cfg)
    check_model(cfg, strategy)
    return strategy


def check_resume(resolved: RunConfig, strategy: strategies.Strategy, world: int) -> Path | None:
    """The checkpoint to resume from, checked against this run; with none, the output directory must not hold
    another run."""
    resume_from = store.resolve_resume(resolved, strategy, strategies.for_world(strategy, world), world)
    if resume_from is None:
        check_output_dir(resolved)
    return resume_from


def check_all(cfg: RunConfig, world: int) -> strategies.Strategy:
    """Every check that needs no tokenization, for a run of `world` ranks: `qlaunch train` runs it before
    starting any process, so that what the ranks would refuse fails once, here. Returns the run's strategy."""
    strategy = check_run(cfg)
    sequence_parallel.check_world(cfg.train.sequence_parallel, world)
    check_dataset(cfg.data, cfg.train.objective)
    check_resume(prelaunch_resolved(cfg, strategy, world), strategy, world)
    return strategy


def prelaunch_resolved(cfg: RunConfig, strategy: strategies.Strategy, world: int) -> RunConfig:
    """`cfg` resolved as the ranks will resolve it, where this process can know it.

    On CUDA, "auto" (mixed precision, compute dtype) depends on the ranks' devices and on what `accelerate
    launch` tells them, and asking the device for bf16 support here could leave a CUDA context in this process,
    which lives as long as the run. So there the resume check before launch takes the checkpoint's own values,
    and each rank checks them again once resolved.
    """
    if not torch.cuda.is_available():
        precision = resolve_mixed_precision(cfg.train.mixed_precision, cuda=False)
        return _resolved(cfg, strategy, world, precision, compute_dtype(cfg.quant.compute_dtype, precision))
    written = _resumed_fingerprint(cfg)
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = written.get("train.mixed_precision", precision)
    compute = cfg.quant.compute_dtype
    if compute == "auto":
        compute = AUTOCAST_DTYPE_NAMES.get(precision) or written.get("quant.compute_dtype", compute)
    return _resolved(cfg, strategy, world, precision, compute)


def _resumed_fingerprint(cfg: RunConfig) -> dict:
    """The fingerprint of the checkpoint `cfg.resume` names, or {} (nothing to compare with)."""
    if cfg.resume == "auto":
        found = store.latest_complete(store.checkpoint_root(cfg.output_dir))
    else:
        found = store.find_checkpoint(Path(cfg.resume)) if cfg.resume else None
    if found is None or not store.is_complete(found):
        return {}
    return store.read_meta(found)["fingerprint"]


def _resolved(cfg: RunConfig, strategy: strategies.Strategy, world: int, precision: str, compute: str) -> RunConfig:
    return dataclasses.replace(
        cfg,
        lora=adopted(cfg.lora),
        strategy=strategy.name,
        quant=strategies.resolve_quant(cfg.quant, strategy, compute),
        train=dataclasses.replace(cfg.train.for_world(world), mixed_precision=precision),
    )


@dataclass(frozen=True)
class RunSetup:
    """What a run resolves once, in every rank, before any process group: the stages take it."""

    cfg: RunConfig
    """The run config with strategy, mixed precision and dtypes resolved (a copy; written to run_config.yaml)."""
    strategy: strategies.Strategy
    sharder: strategies.Strategy
    """What shards: the strategy, or nothing on a world of one (the strategy's dtypes stay)."""
    world: int
    policy: DtypePolicy
    resume_from: Path | None


def resolve_run(cfg: RunConfig, world: int) -> RunSetup:
    """Validates `cfg` for a run of `world` ranks and resolves it (the user's `cfg` is left as it was)."""
    strategy = check_run(cfg)
    sequence_parallel.check_world(cfg.train.sequence_parallel, world)
    precision = mixed_precision(cfg.train.mixed_precision)
    resolved = _resolved(cfg, strategy, world, precision, compute_dtype(cfg.quant.compute_dtype, precision))
    resume_from = check_resume(resolved, strategy, world)
    policy = strategies.dtype_policy(resolved.quant, strategy, precision)
    return RunSetup(resolved, strategy, strategies.for_world(strategy, world), world, policy, resume_from)


def compute_note(requested: RunConfig, resolved: RunConfig) -> str | None:
    """What `quant.compute_dtype: auto` chose on this machine, and why (printed at start)."""
    if requested.quant.compute_dtype != "auto":
        return None
    compute, storage = resolved.quant.compute_dtype, resolved.quant.storage_dtype
    if torch.cuda.is_available() or resolved.train.mixed_precision != "no":
        return f"4-bit layers compute in {compute} (quant.compute_dtype auto)."
    if compute == "float32":
        kept = f"; the 4-bit data stays stored as {storage}, as on GPUs" if storage != "auto" else ""
        return (
            "4-bit layers, adapters and activations compute in float32 (quant.compute_dtype auto): this CPU has no "
            f"native bf16 (AVX512-BF16 or AMX), where every bf16 matmul is emulated{kept}."
        )
    return f"4-bit layers compute in {compute} (quant.compute_dtype auto): this CPU has native bf16."
