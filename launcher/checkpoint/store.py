"""Resumable training checkpoints: trainable state only, sharded per strategy, written atomically.

Layout under `<output_dir>/checkpoints/`:

    step-000040/            a complete checkpoint (it has meta.json)
        meta.json           step, world size, strategy, config fingerprint; written last
        trainable/          adapter + optimizer state, sharded (torch.distributed.checkpoint or DeepSpeed)
        rng/rank-00000.pt   every rank's RNG states
        scheduler.pt        LR scheduler state
        adapter_config.json the PEFT config, so `qlaunch export` needs no model
    .tmp-step-000060/       a checkpoint being written (ignored when resuming, removed on the next save)
    latest                  name of the newest complete checkpoint, replaced atomically after it is complete

A checkpoint is written to a temporary name, renamed once every rank has finished, and only then
named in `latest`; older ones are pruned after that. A crash or kill during a save therefore leaves
the previous checkpoint as the one resumed from, even when only one is kept.

A checkpoint is loaded only after every pickle in it has been checked to name nothing but what
qlaunch writes (launcher/safe_load.py): a checkpoint someone hands over may hold code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import strategies
from ..config import ConfigError, RunConfig
from ..run import disk_full
from ..safe_load import check_checkpoint_files, load_plain
from ..strategies import Strategy

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"

# Keys that may change between a run and its resumption: how long to train, how often to log or
# save, where to write. Everything else changes what the checkpoint means.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.check_4bit_weights",
    "train.epochs",
    "train.log_interval",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "dist.timeout_s",
    "dist.rendezvous_timeout_s",
    "dist.preempt_exit_code",
    "output_dir",
    "overwrite_output_dir",
    "resume",
    "strategy",
    # Where caches, workers and trackers are: nothing the trained state depends on.
    "model.quant_cache",
    "model.quant_cache_dir",
    "data.cache_dir",
    "data.tokenize_workers",
    "train.report_to",
    "train.project",
    "train.run_name",
}
# May change when the world size does, as long as the global batch stays (resolve_resume checks it).
BATCH_SHAPE = {"train.micro_batch_size", "train.grad_accum_steps", "train.global_batch_size"}
SINGLE = strategies.SingleProcess.spec.name


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def fingerprint(cfg: RunConfig) -> dict[str, object]:
    """The config values a checkpoint depends on, flattened to `section.key`."""
    flat = {}
    for section, value in asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            name = f"{section}.{key}" if key else section
            if name not in RESUMABLE_CHANGES:
                flat[name] = item
    return flat


def fingerprint_hash(values: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def latest_complete(root: Path) -> Path | None:
    """The checkpoint `latest` names, or else the newest complete one; None if there is none."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    complete = sorted(p for p in root.glob(f"{PREFIX}*") if is_complete(p))
    return complete[-1] if complete else None


def find_checkpoint(path: Path) -> Path | None:
    """`path` itself, or the newest complete checkpoint when `path` is a run's output directory or its
    checkpoints folder (None when that has none)."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        return latest_complete(path / CHECKPOINTS)
    if (path / LATEST).is_file():
        return latest_complete(path)
    return path


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def resolve_resume(cfg: RunConfig, strategy: Strategy, sharder: Strategy, world_size: int) -> Path | None:
    """The checkpoint to resume from, checked against this run before any process group starts."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        path = latest_complete(checkpoint_root(cfg.output_dir))
        if path is None:
            return None
    else:
        path = find_checkpoint(Path(cfg.resume))
        if path is None or not is_complete(path):
            raise ConfigError(
                f"`{cfg.resume}` is not a complete checkpoint (no {META}). Pass a `checkpoints/step-NNNNNN` "
                "directory, a run's output directory, or `--resume auto`."
            )
    meta = read_meta(path)
    written, now = meta["fingerprint"], fingerprint(cfg)
    # Keys that became resumable after a checkpoint was written are in its fingerprint still.
    changed = sorted(
        k
        for k in set(written) | set(now)
        if k not in RESUMABLE_CHANGES and k not in BATCH_SHAPE and written.get(k) != now.get(k)
    )
    if changed:
        details = "; ".join(f"{k}: {written.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            f"Cannot resume from `{path}`: the run config changed where the checkpoint depends on it ({details}). "
            "Restore those values, or start a new run in another output_dir."
        )
    _check_global_batch(path, written, meta["world_size"], now, world_size)
    if not loads_natively(meta, sharder, world_size) and meta["strategy"] not in (strategy.name, SINGLE):
        raise ConfigError(
            f"Cannot resume from `{path}`: it was written by {meta['strategy']} ({meta['checkpoint_format']} format) "
            f"and this run uses {strategy.name}. Resume with --strategy {meta['strategy']}."
        )
    return path


def loads_natively(meta: dict, sharder: Strategy, world_size: int) -> bool:
    """Whether `sharder` reads the checkpoint as written; otherwise it is read whole and resharded
    (strategies/portable.py): a ZeRO checkpoint on another world size, or across a world of one."""
    spec = sharder.spec
    return meta["checkpoint_format"] == spec.checkpoint_format and (
        spec.reshardable_checkpoints or meta["world_size"] == world_size
    )


def _global_batch(values: dict, world: int) -> int:
    data_world = world // values.get("train.sequence_parallel", 1)
    return values["train.micro_batch_size"] * values["train.grad_accum_steps"] * data_world


def _check_global_batch(path: Path, written: dict, written_world: int, now: dict, world: int) -> None:
    """The micro batch and accumulation may change with the world size, the global batch may not: the data
    order and the loss's scale depend on it."""
    was, will = _global_batch(written, written_world), _global_batch(now, world)
    if was == will:
        return
    data_world = world // now.get("train.sequence_parallel", 1)
    if was % data_world:
        fix = f"Resume on a number of ranks that divides {was} (times train.sequence_parallel)."
    else:
        share, accum = was // data_world, now["train.grad_accum_steps"]
        keep = f"--train.micro_batch_size {share // accum}" if share % accum == 0 else ""
        keep = keep or f"--train.micro_batch_size {share} --train.grad_accum_steps 1"
        fix = f"Keep it with {keep}, or set --train.global_batch_size {was} (the accumulation then follows the ranks)."
    raise ConfigError(
        f"Cannot resume from `{path}` with a global batch of {will} samples per step "
        f"(micro_batch_size {now['train.micro_batch_size']} x grad_accum_steps {now['train.grad_accum_steps']} x "
        f"{data_world} data-parallel ranks): it was trained with {was}, and the data order and the loss's scale "
        f"depend on it. {fix}"
    )


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(Path(root) / name)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(cfg: RunConfig, step: int, world_size: int, strategy, model, optimizer, scheduler, peft_config) -> Path:
    """Writes a checkpoint of `step` (a collective: every rank calls it)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(cfg.output_dir)
    final = root / step_name(step)
    tmp = root / f"{TMP_PREFIX}{step_name(step)}"
    if rank == 0:
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()

    with disk_full.writing(final, "checkpoint", checkpoint_bytes(root, model)):
        strategy.save_trainable(model, optimizer, tmp / "trainable")
        _save_small(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
        if rank == 0:
            _save_small(scheduler.state_dict(), tmp / "scheduler.pt")
            peft_config.save_pretrained(tmp)
        _fsync_tree(tmp)
    _barrier()  # every rank's files are on disk

    if rank == 0:
        values = fingerprint(cfg)
        meta = {
            "step": step,
            "world_size": world_size,
            "strategy": strategy.name,
            "checkpoint_format": strategy.spec.checkpoint_format,
            "fingerprint": values,
            "fingerprint_sha256": fingerprint_hash(values),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        _fsync_file(tmp / META)  # everything else was synced before the barrier
        if final.exists():  # a complete checkpoint of this very step, e.g. re-saved after a resume
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = root / f"{TMP_PREFIX}{LATEST}"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        _prune(root, keep=cfg.checkpoint.keep_last, newest=final)
    _barrier()
    return final


def checkpoint_bytes(root: Path, model) -> int:
    """What a checkpoint needs: the size of the run's latest one, else at least this rank's adapter weights."""
    latest = latest_complete(root)
    if latest is not None:
        return sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
    total = 0
    for p in model.parameters():
        if p.requires_grad:  # this rank's part: a DTensor's local shard, ZeRO-3's partition
            local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)
            total += local.numel() * local.element_size()
    return total


def _save_small(obj, path: Path) -> None:
    """torch.save through a buffer: on a full disk the write then fails with ENOSPC and the file's name (torch's
    own writer says only "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        path.write_bytes(buffer.getvalue())
    except OSError as error:
        error.filename = error.filename or str(path)
        raise


def _prune(root: Path, keep: int, newest: Path) -> None:
    complete = sorted(p for p in root.glob(f"{PREFIX}*") if is_complete(p) and p != newest)
    for old in complete[: max(0, len(complete) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, strategy, model, optimizer, scheduler) -> int:
    """Restores trainable state, scheduler and this rank's RNG from `path`; returns the step.

    A rank that did not exist when the checkpoint was written (a DCP run resumed on more ranks)
    keeps its seeded RNG: its dropout masks then differ from any earlier run's, unavoidably."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    check_checkpoint_files(path)  # DCP and DeepSpeed unpickle what they load unchecked
    scheduler_state = load_plain(path / "scheduler.pt")
    rng_file = path / "rng" / f"rank-{rank:05d}.pt"
    rng = load_plain(rng_file) if rng_file.is_file() else None
    meta = read_meta(path)
    if loads_natively(meta, strategy, dist.get_world_size() if dist.is_initialized() else 1):
        strategy.load_trainable(model, optimizer, path / "trainable")
    else:
        written = strategies.by_checkpoint_format(meta["checkpoint_format"])
        strategy.load_full_trainable(model, optimizer, written.read_full_trainable(path))
    scheduler.load_state_dict(scheduler_state)
    # A state read whole (strategies/portable.py) keeps the fresh optimizer's learning rate: the scheduler's is
    # the one the next step uses.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    if rng is not None:
        restore_rng_state(rng)
    return meta["step"]
