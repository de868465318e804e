"""Starts that make no progress: a job that requeues itself on every stop would start forever when its start-up
(imports, rendezvous, loading and quantizing the base, sharding) outlasts the time between a start and Slurm's
warning signal. Each machine's `qlaunch train` keeps, in the output directory, when the stop signal came in each
start in a row that stopped before its first step; at the third it stops requeueing and says why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import signals

NO_PROGRESS_STARTS = 3
NO_PROGRESS_EXIT = 1
"""Not `dist.preempt_exit_code`: the slurm/ scripts requeue only on that."""


def _record(output_dir: str | Path, machine_rank: int) -> Path:
    return Path(output_dir) / ".qlaunch" / f"starts-without-progress-machine{machine_rank}.json"


def progressed(output_dir: str | Path | None, machine_rank: int) -> None:
    """This start trained (or ended): the count starts again."""
    if output_dir is not None:
        _record(output_dir, machine_rank).unlink(missing_ok=True)


def stopped_before_training(
    output_dir: str | Path | None, machine_rank: int, signal_after_s: float | None
) -> str | None:
    """Counts a start stopped before its first step; the message that ends the requeueing at the third in a row."""
    if output_dir is None:
        return None
    record = _record(output_dir, machine_rank)
    try:
        seconds = json.loads(record.read_text()) if record.is_file() else []
        seconds.append(None if signal_after_s is None else round(signal_after_s, 1))
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(seconds))
    except (OSError, ValueError):
        return None  # a record that cannot be kept must not stop a run that can still progress
    if len(seconds) < NO_PROGRESS_STARTS:
        return None
    record.unlink(missing_ok=True)
    after = ", ".join("?" if s is None else f"{s:.0f} s" for s in seconds[-NO_PROGRESS_STARTS:])
    return (
        f"{NO_PROGRESS_STARTS} starts in a row were stopped before their first step: the stop signal came {after} "
        "after each start, before start-up (rendezvous, loading and quantizing the base, sharding) was over, so "
        "requeueing again would not progress either. Not requeueing: raise the job's time limit or the warning's "
        "lead (sbatch --signal=B:USR2@SECONDS), or shorten start-up (the quantized-base cache: model.quant_cache)."
    )


def status_after_stop(output_dir: str | Path | None, machine_rank: int, trained: bool, preempt_exit_code: int) -> int:
    """The exit status of a start stopped by a signal: the preemption status, or NO_PROGRESS_EXIT (with the reason
    printed) for the third start in a row that stopped before training."""
    if trained:
        progressed(output_dir, machine_rank)
        return preempt_exit_code
    why = stopped_before_training(output_dir, machine_rank, signals.seconds_to_first_signal())
    if why is None:
        return preempt_exit_code
    print(f"qlaunch: error: {why}", file=sys.stderr, flush=True)
    return NO_PROGRESS_EXIT
