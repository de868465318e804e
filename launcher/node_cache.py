"""What the per-node caches (tokenized data, the quantized base) share: the first process to ask builds an
entry under a file lock while the others wait, into a temporary directory renamed when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

WAIT_NOTICE_S = 5.0
"""A process waiting longer than this for another one's entry says so."""


def say(message: str) -> None:
    """Start-up notes come from the first process of each node only, on stderr (stdout may be JSON)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"qlaunch: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive(root: Path, key: str, waiting: str):
    """Holds `<key>.lock` in `root`; says `waiting` if another process holds it for long."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / f"{key}.lock"))
    try:
        lock.acquire(timeout=WAIT_NOTICE_S)
    except Timeout:
        say(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fresh_temporary(root: Path, key: str) -> Path:
    """An empty `<key>.tmp-<pid>` to build an entry in; temporaries of processes killed mid-way are removed."""
    for stale in root.glob(f"{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = root / f"{key}.tmp-{os.getpid()}"
    partial.mkdir()
    return partial
