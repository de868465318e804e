"""Every difference between FSDP2, FSDP1, ZeRO-2, ZeRO-3 and DDP lives in this package.

`base.py` says what a strategy is and does; one file per strategy holds its runtime and byte-layout
hooks side by side; `handoff.py` moves the source rank's weights; `launcher/cpu_shims.py` holds every CPU shim.
This module is the registry: the rest of the launcher gets a strategy by name, from the run config
and the `accelerate launch` environment, and asks it questions instead of testing its name.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ..config import ConfigError, QuantConfig, RunConfig, unknown_strategy
from ..dtypes import AUTOCAST_DTYPES, DTYPE_BY_NAME, DtypePolicy, resolve_storage_dtype
from .base import OFFLOAD_MODES, LocalShard, Strategy, StrategySpec, clean_fqn, optimizer_state_numel, torch_optimizer
from .ddp import DDP
from .fsdp1 import FSDP1
from .fsdp2 import FSDP2
from .single import SingleProcess
from .zero2 import ZeRO2
from .zero3 import ZeRO3

__all__ = [
    "BY_NAME",
    "DEFAULT",
    "NAMES",
    "LocalShard",
    "OFFLOAD_MODES",
    "by_checkpoint_format",
    "SingleProcess",
    "Strategy",
    "StrategySpec",
    "check",
    "clean_fqn",
    "dtype_policy",
    "for_world",
    "get",
    "optimizer_state_numel",
    "refusal",
    "resolve",
    "resolve_quant",
    "torch_optimizer",
]

BY_NAME: dict[str, type[Strategy]] = {cls.spec.name: cls for cls in (FSDP2, FSDP1, ZeRO2, ZeRO3, DDP)}
NAMES = tuple(BY_NAME)
DEFAULT = "fsdp2"


def get(name: str) -> Strategy:
    if unknown := unknown_strategy(name):
        raise unknown
    return BY_NAME[name]()


def for_world(strategy: Strategy, world: int) -> Strategy:
    """What shards the run: the strategy itself, or nothing on a world of one (its dtypes stay)."""
    return strategy if world > 1 else SingleProcess()


def by_checkpoint_format(checkpoint_format: str) -> Strategy:
    """A strategy that writes (and reads) checkpoints in `checkpoint_format`."""
    return next(cls() for cls in (*BY_NAME.values(), SingleProcess) if cls.spec.checkpoint_format == checkpoint_format)


def refusal(strategy: Strategy, cfg: RunConfig) -> str | None:
    """Why `strategy` cannot run `cfg` (its own reasons, or an offload mode it lacks), or None."""
    mode = cfg.train.offload
    if mode in OFFLOAD_MODES and mode not in strategy.spec.offload_modes:
        return (
            f"`train.offload: {mode}` is not offered ({strategy.name} offloads: "
            f"{', '.join(strategy.spec.offload_modes)}; {strategy.spec.offload_note})"
        )
    if cfg.train.sequence_parallel > 1 and not strategy.spec.sequence_parallel:
        splitting = ", ".join(name for name in NAMES if get(name).spec.sequence_parallel)
        return f"`train.sequence_parallel` above 1 runs with {splitting}"
    return strategy.refusal(cfg)


def check(strategy: Strategy, cfg: RunConfig) -> None:
    """A ConfigError naming the reason and the strategies that can, if `strategy` cannot run `cfg`."""
    reason = refusal(strategy, cfg)
    if reason:
        working = ", ".join(name for name in NAMES if not refusal(get(name), cfg))
        raise ConfigError(f"{strategy.name} cannot run this config: {reason}. Strategies that can: {working}.")


def resolve_quant(quant: QuantConfig, strategy: Strategy, compute: str) -> QuantConfig:
    """`quant` with the compute dtype resolved to `compute` and the storage dtype resolved with it."""
    storage = resolve_storage_dtype(
        quant.storage_dtype, quant.compute_dtype, compute, strategy.stores_4bit_as_compute_dtype
    )
    return dataclasses.replace(quant, compute_dtype=compute, storage_dtype=storage)


def dtype_policy(quant: QuantConfig, strategy: Strategy, mixed_precision: str) -> DtypePolicy:
    """The dtypes every kind of weight is kept in: the strategy's, with `quant.storage_dtype` if set (`quant`'s
    dtypes resolved: resolve_quant)."""
    policy = strategy.dtype_policy(DTYPE_BY_NAME[quant.compute_dtype], mixed_precision != "no")
    if quant.storage_dtype != "auto":
        policy = dataclasses.replace(policy, quant_storage=DTYPE_BY_NAME[quant.storage_dtype])
    autocast = AUTOCAST_DTYPES.get(mixed_precision)
    if strategy.casts_parameters and autocast not in (None, policy.quant_storage):
        raise ConfigError(
            f"Mixed precision {mixed_precision} makes {strategy.name} cast every parameter to {autocast}, which would "
            f"rewrite the 4-bit data stored as {policy.quant_storage}. Set `quant.compute_dtype` to "
            f"{str(autocast).removeprefix('torch.')} (and `quant.storage_dtype: auto`), or pick the mixed precision "
            f"that matches it (`train.mixed_precision`; fp16 is chosen on GPUs without bf16)."
        )
    return policy


def from_accelerate_env() -> str | None:
    """The strategy the running `accelerate launch` config asks for, or None if it names none."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FSDP2.spec.name if os.environ.get("FSDP_VERSION", "1") == "2" else FSDP1.spec.name
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and os.path.isfile(config_file):
            with open(config_file) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage", stage)
        by_stage = {str(cls.stage): cls.spec.name for cls in (ZeRO2, ZeRO3)}
        if str(stage) in by_stage:
            return by_stage[str(stage)]
        raise ConfigError(f"The DeepSpeed config asks for ZeRO stage {stage}; this launcher runs stages 2 and 3.")
    # `accelerate launch` always sets ACCELERATE_MIXED_PRECISION; with neither FSDP nor DeepSpeed and
    # several processes, its config asks for plain data parallelism.
    if "ACCELERATE_MIXED_PRECISION" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DDP.spec.name
    return None


def resolve(cfg: RunConfig) -> Strategy:
    """The run's strategy: the accelerate config's and the run config's must agree when both are set."""
    launched = from_accelerate_env()
    wanted = cfg.strategy or None
    if wanted is not None:
        get(wanted)
    if launched and wanted and launched != wanted:
        raise ConfigError(
            f"The run config asks for strategy `{wanted}` but `accelerate launch` was given a config for "
            f"`{launched}`. Use accelerate_configs/{get(wanted).spec.accelerate_config}, or drop `strategy` from the "
            "run config to follow the accelerate config."
        )
    return get(launched or wanted or DEFAULT)
