"""Preemption in a rank: a stop signal (launcher/signals.py) stops the run where every rank agrees.

`agreed()` all-reduces "did any rank get a stop signal" (one collective), so every rank stops at the
same point: after a step (train.py then writes a complete checkpoint first), or before training when
the signal came during start-up (rendezvous, loading, sharding: nothing new to save). Once the last
step is done a signal is only noted: the run finishes and exits 0. `--resume auto` continues from
the last complete checkpoint; the slurm/ scripts requeue the job on `dist.preempt_exit_code` (85).

Under `qlaunch train` each rank writes its pid to the wrapper's status folder (launch/supervise.py),
`done-<rank>` when it ends as planned and `preempted-<rank>` (what stopped it, and where) when it
stopped for a preemption; it then exits 0, so torchrun does not report a planned stop as a failure, and the
wrapper exits with the preemption status and one line. Under a plain `accelerate launch` the rank
itself exits with the preemption status.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from .. import signals

STATUS_DIR_ENV = "QLAUNCH_STATUS_DIR"
MARKER = "preempted-{rank}"


class StopSignal:
    """In a rank, from the start of `train.run`: stop signals stop the run where every rank agrees."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        self.rank = int(os.environ.get("RANK", "0"))
        status_dir = os.environ.get(STATUS_DIR_ENV)
        self.status_dir = Path(status_dir) if status_dir else None
        self._stack = ExitStack()

    def __enter__(self) -> StopSignal:
        self._stack.enter_context(signals.listening())
        if self.status_dir:
            (self.status_dir / f"pid-{self.rank}").write_text(str(os.getpid()))
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        # One write per line: every rank shares the job's stdout, and print() writes the newline separately.
        sys.stdout.write(
            f"rank {self.rank}/{os.environ.get('WORLD_SIZE', '1')} on {node} (pid {os.getpid()}): SIGUSR2 or SIGTERM "
            f"stops the run at the next step boundary with a checkpoint (exit status {self.exit_code})\n"
        )
        sys.stdout.flush()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stack.close()
        if exc_type is None:
            self._finished()

    def _finished(self) -> None:
        if self.status_dir:
            (self.status_dir / f"done-{self.rank}").touch()

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank got a stop signal. A collective: every rank calls it at the same point."""
        flag = torch.tensor([0.0 if signals.received() is None else 1.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop_before_training(self, device: torch.device) -> None:
        """During start-up, where every rank passes: ends every rank now if any got a stop signal."""
        if self.agreed(device):
            self.exit(None)

    def exit(self, step: int | None) -> NoReturn:
        """Ends this rank after a preemption: once the checkpoint of `step` is complete, or (None) before
        training began, with nothing new to save."""
        cause = signals.received_name()
        self._finished()
        if self.status_dir:
            (self.status_dir / MARKER.format(rank=self.rank)).write_text(json.dumps({"step": step, "signal": cause}))
        elif self.rank == 0:
            print(stop_message(step, cause, self.exit_code), flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise PreemptionExit(0 if self.status_dir else self.exit_code, step)


class PreemptionExit(SystemExit):
    """The exit of a rank stopped by a signal; `step` None: before training, with nothing new to save."""

    def __init__(self, code: int, step: int | None):
        super().__init__(code)
        self.step = step


def stop_message(step: int | None, signal_name: str | None, exit_code: int) -> str:
    """What a preemption stop did; `signal_name` None: this rank stopped for another rank's signal."""
    cause = signal_name or "a signal to another rank"
    if step is None:
        done = f"Stopped before training on {cause}: nothing new to checkpoint"
    else:
        done = f"Stopped after step {step} on {cause}: the checkpoint is complete"
    return f"{done}; exit status {exit_code}. Run again with `--resume auto` to continue."


def read_marker(status_dir: Path) -> dict | None:
    """What stopped the ranks of a wrapper's status folder, if they stopped for a preemption: the step
    they agreed on, and the signal one of them got (else they stopped for another node's)."""
    stops = [json.loads(path.read_text()) for path in sorted(status_dir.glob(MARKER.format(rank="*")))]
    if not stops:
        return None
    got = [s for s in stops if s["signal"]]
    return (got or stops)[0]
