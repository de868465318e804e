"""A checkpoint's trainable state whole, per parameter: how a checkpoint resumes where it cannot natively.

DeepSpeed partitions ZeRO's optimizer state by world size, and a ZeRO strategy on a world of one runs
without DeepSpeed and writes torch.distributed.checkpoint files. Either side of such a change reads the
checkpoint whole (`FullTrainable`) and loads it into its own sharding:
  * a DeepSpeed checkpoint is converted once to DeepSpeed's universal checkpoint (`ds_to_universal`: each
    parameter's fp32 value and Adam states whole), by rank 0 under a lock, next to the checkpoint, and
    read from there;
  * a torch.distributed.checkpoint is read whole with torch's converter;
  * a torch optimizer takes it with torch's `set_state_dict`, a ZeRO engine through DeepSpeed's public
    tensor-fragment setters (the fp32 masters and Adam states of its partition) and `GatheredParameters`
    (the weights it computes with).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from argparse import Namespace
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
UNIVERSAL = "universal"
"""The universal form of a DeepSpeed checkpoint, beside its `trainable/` folder."""


@dataclass(frozen=True)
class FullTrainable:
    weights: dict[str, torch.Tensor]
    """fp32 values by parameter name (without wrapper prefixes)."""
    adam: dict[str, dict[str, torch.Tensor]]
    """exp_avg and exp_avg_sq by parameter name."""
    step: float
    """AdamW's step count (its bias correction)."""


# --- Reading ---------------------------------------------------------------------------------------


def read_dcp(directory: Path) -> FullTrainable:
    """A torch.distributed.checkpoint `trainable/` folder, whole (its pickles checked by the caller)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(directory), f"{tmp}/state.pt")
        state = torch.load(f"{tmp}/state.pt", weights_only=True)
    optimizer_state = state["optimizer"]["state"]
    steps = {float(s["step"]) for s in optimizer_state.values()}
    return FullTrainable(
        weights={k: v.float() for k, v in state["model"].items()},
        adam={k: {key: s[key].float() for key in ADAM_KEYS} for k, s in optimizer_state.items()},
        step=_one(steps),
    )


def read_deepspeed(checkpoint_dir: Path, tag: str) -> FullTrainable:
    """A DeepSpeed checkpoint's `trainable/<tag>`, through its universal form (converted on first use).

    ZeRO-2's form holds each parameter shaped and its step, ZeRO-3's flat and the step in its optimizer state;
    the loaders below shape them as the run's parameters are."""
    from ..safe_load import load_deepspeed_state, load_plain

    params = universal_form(checkpoint_dir, tag) / tag / "zero"
    weights, adam, steps = {}, {}, set()
    # A folder without Adam states is a frozen weight the module state carried along (a tied lm_head).
    for folder in sorted(p for p in params.iterdir() if (p / f"{ADAM_KEYS[0]}.pt").is_file()):
        weights[folder.name] = _tensor(load_plain(folder / "fp32.pt"))
        adam[folder.name] = {key: _tensor(load_plain(folder / f"{key}.pt")) for key in ADAM_KEYS}
        if (folder / "step.pt").is_file():
            steps.add(float(load_plain(folder / "step.pt")))
    if not steps:
        state = load_deepspeed_state(params / "optimizer_state.pt")["optimizer_state_dict"]["state"]
        steps = {float(s["step"]) for s in state.values()}
    return FullTrainable(weights, adam, _one(steps))


def _tensor(saved) -> torch.Tensor:
    return (saved["param"] if isinstance(saved, dict) else saved).float()


def _one(steps: set[float]) -> float:
    if len(steps) != 1:
        raise RuntimeError(f"The checkpoint's parameters were stepped a different number of times: {sorted(steps)}.")
    return steps.pop()


def universal_form(checkpoint_dir: Path, tag: str) -> Path:
    """`<checkpoint>/universal`, written by global rank 0 if missing (a collective: every rank calls it).

    Written to a temporary name and renamed, under a lock another job resuming the same checkpoint waits
    on: a run killed while converting leaves no half-written form, and the checkpoint itself is unchanged."""
    final = Path(checkpoint_dir) / UNIVERSAL
    if not dist.is_initialized() or dist.get_rank() == 0:
        with _locked(Path(checkpoint_dir) / f".{UNIVERSAL}.lock"):
            if not final.is_dir():
                _convert(Path(checkpoint_dir) / "trainable" / tag, final, tag)
    if dist.is_initialized():
        dist.barrier()
    return final


def _convert(source: Path, final: Path, tag: str) -> None:
    tmp = final.with_name(f".tmp-{UNIVERSAL}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"qlaunch: converting {source.parent.parent.name} to DeepSpeed's universal checkpoint ...", flush=True)
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):  # its progress bars
        _ds_to_universal(source, tmp / tag)
    tmp.rename(final)


def _ds_to_universal(source: Path, output: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(
        Namespace(
            input_folder=str(source),
            output_folder=str(output),
            num_extract_workers=1,  # in this process: no worker pool inside a rank
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # qlaunch's engines record no `universal_checkpoint_info`: nothing model-parallel to describe.
            inject_missing_state=True,
        )
    )


@contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- Loading ---------------------------------------------------------------------------------------


def load_into_torch(model, optimizer, full: FullTrainable) -> None:
    """`full` into one process's model and torch optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(  # initialises the Adam states it returns
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    for name in optimizer_state["state"]:
        shape = model_state[name].shape
        optimizer_state["state"][name] = {"step": torch.tensor(full.step), **_adam(full, name, shape)}
    set_state_dict(
        model,
        optimizer,
        model_state_dict={
            name: _weight(full, name, value.shape)
            for name, value in model_state.items()
            if name in optimizer_state["state"]
        },
        optim_state_dict=optimizer_state,
        options=StateDictOptions(strict=False),
    )


def load_into_deepspeed(engine, base_optimizer, full: FullTrainable) -> None:
    """`full` into a ZeRO-2/ZeRO-3 engine: each rank keeps its partition of it."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _create_adam_states(engine.optimizer, base_optimizer)
    trained = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    shapes = {name: tuple(getattr(param, "ds_shape", param.shape)) for name, param in trained.items()}
    for name, param in trained.items():
        safe_set_full_fp32_param(param, _weight(full, name, shapes[name]))
        for key, value in _adam(full, name, shapes[name]).items():
            safe_set_full_optimizer_state(param, value, key)
    # The weights forward and backward use: whole on every rank under ZeRO-2 (copied on each), a
    # partition under ZeRO-3 (rank 0's copy is partitioned when the context ends).
    with deepspeed.zero.GatheredParameters(list(trained.values()), modifier_rank=0), torch.no_grad():
        for name, param in trained.items():
            param.copy_(_weight(full, name, shapes[name]).to(param.dtype))
    for state in base_optimizer.state.values():
        state["step"] = torch.tensor(full.step)


def _create_adam_states(zero_optimizer, base_optimizer) -> None:
    """DeepSpeed's setters write into the Adam states of its fp32 partitions, which AdamW creates at its first
    step: before it they are created here as AdamW would (zeros), and ZeRO-1/2 links its per-parameter views
    of them as it does after that step."""
    # ZeRO-3 hands AdamW its partitions only while it steps.
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in base_optimizer.param_groups for flat in group["params"]
    ]
    for flat in flats:
        if not base_optimizer.state[flat]:
            zeros = {key: torch.zeros_like(flat, memory_format=torch.preserve_format) for key in ADAM_KEYS}
            base_optimizer.state[flat] = {"step": torch.tensor(0.0), **zeros}
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-3 reads the states directly
    if link is not None:
        zero_optimizer._hp_optimizer_states_linked = False
        link()


def _weight(full: FullTrainable, name: str, shape) -> torch.Tensor:
    if name not in full.weights:
        raise RuntimeError(f"The checkpoint holds no `{name}` (it holds {len(full.weights)} other parameters).")
    return full.weights[name].reshape(shape)


def _adam(full: FullTrainable, name: str, shape) -> dict[str, torch.Tensor]:
    _weight(full, name, shape)
    return {key: value.reshape(shape) for key, value in full.adam[name].items()}
