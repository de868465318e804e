"""The Accelerator of a run: Accelerate's own on CUDA, the CPU shim's elsewhere.

On CUDA this is a plain `Accelerator(...)` with the strategy's plugin: Accelerate picks NCCL and runs
its FSDP or DeepSpeed path. On a machine without CUDA a distributed run gets the CPU Accelerator of
launcher.cpu_shims, marked with the strategy's plugin, so `accelerator.prepare` runs the same code.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from ..collectives import this_rank_device
from ..config import DistConfig, TrainConfig
from ..cpu_shims import cpu_accelerator
from ..dtypes import cpu_has_native_bf16, resolve_compute_dtype, resolve_mixed_precision
from ..strategies import Strategy
from . import tracking


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def mixed_precision(requested: str) -> str:
    """`train.mixed_precision` on this machine, "auto" resolved (launcher.dtypes.resolve_mixed_precision)."""
    cuda = torch.cuda.is_available()
    return resolve_mixed_precision(
        requested, cuda, os.environ.get("ACCELERATE_MIXED_PRECISION"), cuda and torch.cuda.is_bf16_supported()
    )


def compute_dtype(requested: str, mixed_precision: str) -> str:
    """`quant.compute_dtype` on this machine, "auto" resolved (launcher.dtypes.resolve_compute_dtype) for
    `mixed_precision` (resolved)."""
    if torch.cuda.is_available():
        return resolve_compute_dtype(requested, mixed_precision, "cuda", torch.cuda.is_bf16_supported())
    return resolve_compute_dtype(requested, mixed_precision, "cpu", cpu_has_native_bf16())


def create_accelerator(strategy: Strategy, train: TrainConfig, dist: DistConfig, output_dir: Path) -> Accelerator:
    """The run's Accelerator; `train.mixed_precision` is already resolved (see `mixed_precision`)."""
    distributed = world_size_from_env() > 1
    plugins = strategy.plugins(train, this_rank_device()) if distributed else {}
    kwargs = dict(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        # Every collective, the first and barriers included, fails after this: a rank that stops taking part ends the run.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=dist.timeout_s))],
        **tracking.accelerator_kwargs(train, output_dir),
    )
    if torch.cuda.is_available() or not distributed:
        return Accelerator(**kwargs, **plugins)
    return cpu_accelerator(kwargs, lambda accelerator: strategy.install_on_cpu(accelerator, plugins))
