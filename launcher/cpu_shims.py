"""Every CPU shim, in one place: what lets the tests and the demo run the GPU code path on CPU ranks.

On a machine without CUDA, Accelerate offers only DDP over gloo (`MULTI_CPU`) and ignores FSDP and
DeepSpeed configs (docs/cpu-distributed.md has the measurements). The shims below create the CPU
Accelerator (which starts the gloo process group) and then mark its state with the strategy's
distributed type and plugin, so that `accelerator.prepare` runs the same FSDP2 / FSDP1 / DeepSpeed
code it runs on GPUs. Each one refuses to run where CUDA is available, so no GPU run can take it.
"""

from __future__ import annotations

import contextlib
import os

import bitsandbytes as bnb
import torch
from accelerate import Accelerator
from torch import nn


def require_no_cuda(what: str) -> None:
    if torch.cuda.is_available():
        raise RuntimeError(f"The CPU shim for {what} must never run on a machine with CUDA.")


def cpu_accelerator(kwargs: dict, install) -> Accelerator:
    """The CPU Accelerator of a distributed run, marked by `install(accelerator)` with the strategy's plugin."""
    require_no_cuda("Accelerate")
    # Accelerate reads ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED set by `accelerate launch` and would
    # build a second plugin, which on CPU fails looking for a GPU; the strategy's plugin is used instead.
    for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        os.environ.pop(flag, None)
    accelerator = Accelerator(cpu=True, **kwargs)
    # MULTI_CPU names the device "cpu:0"; FSDP1 compares it with its parameters' "cpu" and refuses.
    set_shared_state(accelerator, device=torch.device("cpu"))
    install(accelerator)
    return accelerator


def set_shared_state(accelerator: Accelerator, **values) -> None:
    """Sets values on both of Accelerate's shared states: every new AcceleratorState() copies
    PartialState's values over its own, so a value set on one alone is lost at the next prepare
    (measured: ZeRO silently ran as DDP-like no-ops)."""
    from accelerate.state import PartialState

    require_no_cuda("Accelerate's state")
    for state in (PartialState(), accelerator.state):
        for key, value in values.items():
            setattr(state, key, value)


def mark_fsdp(accelerator: Accelerator, plugin) -> None:
    """Accelerate's FSDP path (version 1 or 2, by the plugin) for the CPU Accelerator."""
    from accelerate.utils import DistributedType

    set_shared_state(accelerator, distributed_type=DistributedType.FSDP)
    # As AcceleratorState does with an FSDP plugin on GPUs (it keeps a policy the plugin already has).
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    accelerator.state.fsdp_plugin = plugin


def mark_deepspeed(accelerator: Accelerator, plugin) -> None:
    """Accelerate's DeepSpeed path for the CPU Accelerator (DeepSpeed picks its CPU accelerator itself)."""
    from accelerate.utils import DistributedType

    require_no_cuda("DeepSpeed")
    plugin.set_mixed_precision(accelerator.state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin
    set_shared_state(accelerator, distributed_type=DistributedType.DEEPSPEED)
    accelerator.deepspeed_engine_wrapped = None


@contextlib.contextmanager
def fsdp1_sync_allowed():
    """FSDP1's `sync_module_states` refuses CPU tensors because NCCL cannot broadcast them, but the
    broadcast itself (`_broadcast_coalesced`) works over gloo. Only that one check is skipped."""
    from torch.distributed.fsdp import _init_utils

    require_no_cuda("FSDP1's sync_module_states")
    check = _init_utils._check_module_states_for_sync_module_states
    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None
    try:
        yield
    finally:
        _init_utils._check_module_states_for_sync_module_states = check


def disable_bnb_cpu_repack(model: nn.Module) -> None:
    """bitsandbytes repacks a layer's weight and rewrites its quant state in place on the first CPU
    forward without grad in eval mode (for an AVX512-BF16 kernel). Under sharding the packed shard
    and the shared quant state would then disagree, so the trained model never takes that path. The
    attribute is read for CPU inputs only; with CUDA nothing is changed."""
    if torch.cuda.is_available():
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
