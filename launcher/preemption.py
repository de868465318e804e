"""Preemption: SIGUSR2 (Slurm's warning before the time limit) or SIGTERM stops a run at a step boundary.

In each rank, `StopSignal`'s handler only sets a flag. At every step boundary `agreed()` all-reduces
the flag (one collective), so every rank stops after the same step; train.py then writes a complete
checkpoint and `exit()` ends the rank with `dist.preempt_exit_code` (85 unless configured).
`--resume auto` continues from that checkpoint; the slurm/ scripts requeue the job on that status.

In front of the ranks, `Ranks` is what `qlaunch train` (launch.py) keeps of them, through a status
folder: each rank writes its pid there, `done-<rank>` when it ends as planned, and `preempted` when
it stopped for a preemption. accelerate launch and torchrun ignore both signals; qlaunch passes a
signal sent to it alone on to the pids, exits with the preemption status (torchrun reports any
rank's non-zero exit as 1), and once a rank has ended without finishing it kills the others: a hung
rank would not end on torchrun's SIGTERM (its handler only sets the flag) but 30 s later.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
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


class Ranks:
    """In `qlaunch train`, around `accelerate launch`: the ranks it started, through their status folder."""

    def __init__(self, status_dir: Path):
        self.status_dir = status_dir
        self.env = {STATUS_DIR_ENV: str(status_dir)}
        self._previous: dict = {}

    @staticmethod
    def ignore_in_child() -> None:
        """For `accelerate launch` (and the torchrun inside it); the ranks set their own handlers."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def __enter__(self) -> Ranks:
        self._previous = {sig: signal.signal(sig, self._forward) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _pids(self) -> dict[int, int]:
        pids = {}
        for pid_file in self.status_dir.glob("pid-*"):
            try:
                pids[int(pid_file.name[4:])] = int(pid_file.read_text())
            except ValueError:
                pass  # being written
        return pids

    def _forward(self, signum, frame) -> None:
        self.signal_all(signum)

    def signal_all(self, signum: int) -> None:
        for pid in self._pids().values():
            if is_running(pid):
                os.kill(pid, signum)

    def started(self) -> bool:
        return any(self.status_dir.glob("pid-*"))

    def failed(self) -> list[int]:
        """Ranks that ended without finishing (an error, a timeout, a kill)."""
        return [r for r, pid in self._pids().items() if not (self.status_dir / f"done-{r}").exists() and not is_running(pid)]

    def watch(self, process, interval: float = 0.2) -> int:
        """Waits for `accelerate launch`; once a rank has failed, kills the others so that the run ends now."""
        while process.poll() is None:
            time.sleep(interval)
            if self.failed():
                self.signal_all(signal.SIGKILL)
        return process.returncode

    def preempted_at(self) -> int | None:
        marker = self.status_dir / MARKER
        return int(marker.read_text()) if marker.is_file() else None


def is_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
