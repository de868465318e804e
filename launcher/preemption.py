"""Preemption: SIGUSR2 (Slurm's warning before the time limit) or SIGTERM stops a run at a step boundary.

In each rank, `StopSignal`'s handler only sets a flag. At every step boundary `agreed()` all-reduces
the flag (one collective), so every rank stops after the same step; train.py then writes a complete
checkpoint and `exit()` ends the rank with `dist.preempt_exit_code` (85 unless configured).
`--resume auto` continues from that checkpoint; the slurm/ scripts requeue the job on that status.

Each rank writes its pid to the status folder of `qlaunch train` (launcher.launch.supervise), and
`done-<rank>` when it ends as planned, `preempted` when it stopped for a preemption.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
STATUS_DIR_ENV = "QLAUNCH_STATUS_DIR"
MARKER = "preempted"


class StopSignal:
    """In a rank, while training: SIGUSR2 and SIGTERM ask the run to stop at the next step boundary."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        self.received: int | None = None
        self.rank = int(os.environ.get("RANK", "0"))
        status_dir = os.environ.get(STATUS_DIR_ENV)
        self.status_dir = Path(status_dir) if status_dir else None
        self._previous: dict = {}

    def __enter__(self) -> StopSignal:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
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
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc_type is None:
            self._finished()

    def _finished(self) -> None:
        if self.status_dir:
            (self.status_dir / f"done-{self.rank}").touch()

    def _handle(self, signum, frame) -> None:
        self.received = signum  # only a flag: the training loop acts on it at the next step boundary

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank got a stop signal. A collective: every rank calls it after the same step."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, step: int) -> NoReturn:
        """Ends this rank once the checkpoint of `step` is complete."""
        if self.status_dir:
            (self.status_dir / MARKER).write_text(str(step))
        self._finished()
        if self.rank == 0:
            cause = signal.Signals(self.received).name if self.received else "a signal to another rank"
            print(
                f"Stopped after step {step} on {cause}: the checkpoint is complete; exit status {self.exit_code}. "
                "Run again with `--resume auto` to continue.",
                flush=True,
            )
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(self.exit_code)
