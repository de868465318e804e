"""In front of the ranks: what `qlaunch train` keeps of the ranks it started, through their status folder.

Each rank writes its pid there, `done-<rank>` when it ends as planned, and `preempted-<rank>` when it stopped
for a preemption (launcher.run.preemption). accelerate launch and torchrun ignore SIGUSR2 and SIGTERM;
qlaunch records them from its first moment (launcher.signals) and passes them on to every rank, also
to ranks that register after the signal came (still importing, say), exits with the preemption status
(torchrun reports any rank's non-zero exit as 1), and once a rank has ended without finishing it kills
the others: a hung rank would not end on torchrun's SIGTERM (its handler only sets the flag) but 30 s later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from .. import signals
from ..run.preemption import STATUS_DIR_ENV, read_marker


class Ranks:
    """In `qlaunch train`, around `accelerate launch`: the ranks it started, through their status folder."""

    def __init__(self, status_dir: Path):
        self.status_dir = status_dir
        self.env = {STATUS_DIR_ENV: str(status_dir)}
        self._signalled: set[int] = set()
        self.first_failed: list[int] = []
        """The ranks found ended without finishing first (the others were then killed)."""
        self._stack = contextlib.ExitStack()

    @staticmethod
    def ignore_in_child() -> None:
        """For `accelerate launch` (and the torchrun inside it); the ranks set their own handlers."""
        for sig in signals.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def __enter__(self) -> Ranks:
        self._stack.enter_context(signals.listening())
        self._stack.enter_context(signals.on_signal(self.signal_all))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _pids(self) -> dict[int, int]:
        pids = {}
        for pid_file in self.status_dir.glob("pid-*"):
            with contextlib.suppress(ValueError):  # a pid file being written
                pids[int(pid_file.name[4:])] = int(pid_file.read_text())
        return pids

    def signal_all(self, signum: int) -> None:
        for pid in self._pids().values():
            if is_running(pid):
                os.kill(pid, signum)
                self._signalled.add(pid)

    def _pass_on_pending(self) -> None:
        """A stop signal that came before some ranks registered reaches them once they have."""
        pending = signals.received()
        if pending is not None and any(pid not in self._signalled for pid in self._pids().values()):
            self.signal_all(pending)

    def started(self) -> bool:
        return any(self.status_dir.glob("pid-*"))

    def failed(self) -> list[int]:
        """Ranks that ended without finishing (an error, a timeout, a kill)."""
        return [
            r for r, pid in self._pids().items() if not (self.status_dir / f"done-{r}").exists() and not is_running(pid)
        ]

    def watch(self, process, interval: float = 0.2) -> int:
        """Waits for `accelerate launch`; once a rank has failed, kills the others so that the run ends now."""
        while process.poll() is None:
            time.sleep(interval)
            self._pass_on_pending()
            failed = self.failed()
            if failed:
                self.first_failed = self.first_failed or failed
                self.signal_all(signal.SIGKILL)
        return process.returncode

    def preempted(self) -> dict | None:
        """{"step": the checkpointed step or None, "signal": a rank's signal name or None} after a preemption stop."""
        return read_marker(self.status_dir)


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
