"""A failed run ends in one line: what went wrong on which rank, and the fix when there is one.

The traceback goes to `<output_dir>/logs/rank-NNNNN.log`, not to the terminal (`--debug` prints it
too). Under `qlaunch train` a rank hands its line to the wrapper's status folder (`error-<rank>`) and
the wrapper prints it once the run has ended, ranks with the same error on one line; torchrun's own
report of the failure stays off the terminal (launcher/accelerate_entry.py). Under a plain
`accelerate launch` each rank prints its line itself, and torchrun adds its report after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from .. import quiet
from ..config import ConfigError
from .disk_full import disk_full, disk_full_message
from .preemption import STATUS_DIR_ENV

COLLECTIVE_FAILED = "a collective failed"
DEBUG_ENV = "QLAUNCH_DEBUG"
LOGS = "logs"
REPORT = "error-{rank}"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def this_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def rank_log(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / LOGS / f"rank-{rank:05d}.log"


def cause_and_fix(error: BaseException, timeout_s: float, output_dir: str | Path = ".") -> str:
    """One line for an error only a running rank can meet."""
    import torch

    where = ""
    # torch.distributed.checkpoint's CheckpointException, per rank (the cause of a full disk named by disk_full.writing)
    failed = getattr(error, "failures", None) or getattr(error.__cause__, "failures", None)
    if isinstance(failed, dict) and failed:
        where = f"torch.distributed.checkpoint failed on rank {', '.join(map(str, sorted(failed)))}: "
    if (full := disk_full(error)) is not None:
        return where + disk_full_message(full, Path(output_dir))
    if isinstance(failed, dict) and failed:
        error = next(iter(failed.values()))[0]  # (exception, its stack summary)
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    named = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return (
            f"out of GPU memory ({text}). Lower train.micro_batch_size or data.max_seq_len, keep gradient "
            "checkpointing on, or pick a configuration that fits from `qlaunch plan`."
        )
    if isinstance(error, MemoryError):
        return "out of host memory. Use fewer ranks per machine, or a machine with more RAM."
    if isinstance(error, EOFError) or "PytorchStreamReader failed" in text:
        return f"{where}{named}: a file it read is cut short or corrupt. Resume from another checkpoint."
    if isinstance(error, torch.distributed.DistError) or any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "timed out", "Timeout")
    ):
        return (
            f"{COLLECTIVE_FAILED} ({named}): another rank ended or stalled, or did not answer within "
            f"dist.timeout_s={timeout_s:g}. The rank that failed first says why; raise dist.timeout_s if a step "
            "legitimately takes longer."
        )
    return where + named


def write_log(error: BaseException, output_dir: str | Path, rank: int) -> Path | None:
    """Appends the traceback to the rank's log; None when the output directory cannot be written."""
    path = rank_log(output_dir, rank)
    quiet.to_rank_log(path)  # what other libraries said before the error, if the run failed before naming its log
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank} (pid {os.getpid()})\n")
            traceback.print_exception(error, file=log)
    except OSError:
        return None
    return path


def report(message: str, log: Path | None = None) -> None:
    """Hands the line (and where the traceback is) to the `qlaunch train` wrapper, or prints it where there is none."""
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if status_dir:
        content = {"message": message, "log": str(log) if log else None}
        (Path(status_dir) / REPORT.format(rank=this_rank())).write_text(json.dumps(content))
    else:
        where = f" (rank {this_rank()})" if "LOCAL_RANK" in os.environ else ""
        print(f"qlaunch: error{where}: {message}{traceback_note([log] if log else [])}", file=sys.stderr, flush=True)


def traceback_note(logs: list[Path]) -> str:
    if not logs:
        return ""
    if len(logs) == 1:
        return f" Traceback: {logs[0]}"
    return f" Tracebacks: {Path(logs[0]).parent}/"


@contextlib.contextmanager
def reported(output_dir: str | Path, timeout_s: float):
    """Around a run: any error but a ConfigError (the command line reports those) ends it with its one line."""
    try:
        yield
    except (ConfigError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is one
        rank = this_rank()
        log = write_log(error, output_dir, rank)
        # Where the log cannot be written the traceback is all there is, unless the disk is full: then the
        # line says all of it (and the traceback would be every rank's chain of wrapped OSErrors).
        if debugging() or (log is None and disk_full(error) is None):
            traceback.print_exc()
        report(cause_and_fix(error, timeout_s, output_dir), log)
        end(1)


def end(code: int):
    """Exits now once a process group exists: its peers wait for this rank to be gone, and the libraries'
    exit handlers take seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        os._exit(code)
    raise SystemExit(code)


def exit_rank(code: int | None) -> NoReturn:
    """Ends a rank whose run has ended (finished, stopped or refused) without the interpreter's teardown, its
    output flushed. The teardown frees what the distributed libraries leave behind: gloo's threads outlive
    `destroy_process_group` (a reference in C++ keeps the process group), and freeing them at exit aborts now and
    then ("terminate called without an active exception": a rank that finished its run exits on SIGABRT, and the
    launch with status 1, seen once in about a hundred CI launches)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def read_reports(status_dir: Path) -> dict[int, dict]:
    """rank -> {"message", "log"}, of the ranks that reported an error."""
    reports = {}
    for path in status_dir.glob(REPORT.format(rank="*")):
        with contextlib.suppress(ValueError, OSError):
            reports[int(path.name.rsplit("-", 1)[1])] = json.loads(path.read_text())
    return reports


def summary(reports: dict[int, dict], first_failed: list[int]) -> list[str]:
    """The wrapper's lines about the ranks that failed first (the errors of the others follow from theirs,
    and they were then killed): one per distinct error, naming every rank that reported it."""
    causes = {reports[r]["message"] for r in first_failed if r in reports} or {r["message"] for r in reports.values()}
    # Ranks that failed within one poll of each other: a collective's failure follows from the other error.
    causes = {c for c in causes if not c.startswith(COLLECTIVE_FAILED)} or causes
    lines = []
    for cause in sorted(causes):
        ranks = sorted(r for r in reports if reports[r]["message"] == cause)
        logs = [reports[r]["log"] for r in ranks if reports[r]["log"]]
        lines.append(f"qlaunch: error ({ranks_text(ranks)}): {cause}{traceback_note(logs)}")
    if not lines and first_failed:
        lines.append(
            f"qlaunch: error ({ranks_text(first_failed)}): ended without reporting an error, so it was killed from "
            "outside: by the kernel's out-of-memory killer (see `dmesg`), the scheduler, or a signal."
        )
    return lines


def ranks_text(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
