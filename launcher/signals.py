"""Stop requests: SIGUSR2 (Slurm's warning before the time limit) and SIGTERM, from a process's first moment.

A `qlaunch train` process (the wrapper in front of the ranks, or a rank) records these signals from
the moment `python -m launcher train` starts until it exits: a signal is never fatal, whatever phase
the run is in (imports, rendezvous, loading, training, the final checkpoint, export, teardown). What a
recorded signal does is decided by whoever is listening: the wrapper passes it on to its ranks
(launch/supervise.py); a rank stops at the next point where every rank agrees (run/preemption.py); once
the last step is done it is noted and ignored, and the run ends as finished.

Standard library only: it is installed before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
_STARTED = time.monotonic()

_received: list[int] = []
_received_at: list[float] = []
_listeners: list[Callable[[int], None]] = []


def _record(signum, frame) -> None:
    _received.append(signum)
    _received_at.append(time.monotonic())
    for listener in list(_listeners):
        listener(signum)


def listen() -> None:
    """Records stop signals in this process from now until it exits (its entry point calls this)."""
    for sig in SIGNALS:
        signal.signal(sig, _record)


def ignore_until_exit() -> None:
    """Ignores stop signals from now on, once the process's work is over: CPython puts SIG_DFL back for every
    signal with a Python handler while the interpreter finalizes (thread joins, atexit, module teardown), where
    a signal would kill a finished run, but it leaves an ignored signal ignored."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Records stop signals inside the block and puts back the handlers found, for callers in a process
    that is not qlaunch's own (tests running a command in process)."""
    previous = {sig: signal.signal(sig, _record) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def on_signal(listener: Callable[[int], None]) -> Iterator[None]:
    """Calls `listener(signum)` for each stop signal that arrives inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def received() -> int | None:
    """The first stop signal this process got, if any."""
    return _received[0] if _received else None


def seconds_since_start() -> float:
    return time.monotonic() - _STARTED


def seconds_to_first_signal() -> float | None:
    """Seconds from this process's start (this module's import) to its first stop signal, if any."""
    return _received_at[0] - _STARTED if _received_at else None


def received_name() -> str | None:
    """The name of the first stop signal this process got (SIGUSR2, SIGTERM), if any."""
    signum = received()
    return signal.Signals(signum).name if signum else None
