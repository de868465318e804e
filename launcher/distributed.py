"""The Accelerator for a run, and the one CPU shim.

On CUDA this is a plain `Accelerator(...)` with the strategy's plugin: Accelerate picks NCCL and
runs its FSDP or DeepSpeed path. On a machine without CUDA, Accelerate only offers DDP over gloo
(`MULTI_CPU`) and ignores FSDP and DeepSpeed configs, see ../shared/notes/cpu-distributed.md. The
shim below creates the CPU Accelerator (which starts the gloo process group) and then marks the
state with the strategy's distributed type and plugin, so that `accelerator.prepare` runs the same
FSDP2 / FSDP1 / DeepSpeed code it runs on GPUs. It cannot run when CUDA is available.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from .config import RunConfig
from .strategies import Strategy


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mixed_precision(cfg: RunConfig, cuda: bool) -> str:
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    if not cuda:
        return "no"
    from_launch = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if from_launch and from_launch != "no":
        return from_launch
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def this_rank_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def create_accelerator(cfg: RunConfig, strategy: Strategy) -> Accelerator:
    cuda = torch.cuda.is_available()
    distributed = world_size_from_env() > 1
    plugins = strategy.plugins(cfg, this_rank_device()) if distributed else {}
    kwargs = dict(
        mixed_precision=resolve_mixed_precision(cfg, cuda),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        # Every collective, the first and barriers included, fails after this: a rank that stops taking part ends the run.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s))],
    )
    if cuda or not distributed:
        return Accelerator(**kwargs, **plugins)
    return _cpu_accelerator(kwargs, strategy, plugins)


def _cpu_accelerator(kwargs: dict, strategy: Strategy, plugins: dict) -> Accelerator:
    if torch.cuda.is_available():
        raise RuntimeError("The CPU shim must never run on a machine with CUDA.")
    # Accelerate reads ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED set by `accelerate launch` and would
    # build a second plugin, which on CPU fails looking for a GPU; the strategy's plugin is used instead.
    for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        os.environ.pop(flag, None)
    accelerator = Accelerator(cpu=True, **kwargs)
    # MULTI_CPU names the device "cpu:0"; FSDP1 compares it with its parameters' "cpu" and refuses.
    set_shared_state(accelerator, device=torch.device("cpu"))
    strategy.install_on_cpu(accelerator, plugins)
    return accelerator


def set_shared_state(accelerator: Accelerator, **values) -> None:
    """Sets values on both of Accelerate's shared states: every new AcceleratorState() copies
    PartialState's values over its own, so a value set on one alone is lost at the next prepare."""
    from accelerate.state import PartialState

    for state in (PartialState(), accelerator.state):
        for key, value in values.items():
            setattr(state, key, value)


@contextlib.contextmanager
def fsdp1_cpu_sync_allowed():
    """CPU shim for FSDP1's `sync_module_states`: torch refuses CPU tensors there because NCCL
    cannot broadcast them, but the broadcast itself (`_broadcast_coalesced`) works over gloo. Only
    that one check is skipped, and only on a machine without CUDA."""
    from torch.distributed.fsdp import _init_utils

    if torch.cuda.is_available():
        raise RuntimeError("The FSDP1 CPU shim must never run on a machine with CUDA.")
    check = _init_utils._check_module_states_for_sync_module_states
    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None
    try:
        yield
    finally:
        _init_utils._check_module_states_for_sync_module_states = check
