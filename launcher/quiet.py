"""Other libraries' chatter, kept off the terminal: what the user sees is qlaunch's lines, the progress bar, and
the warnings and errors that concern their run.

`install()` runs first thing in every qlaunch process (the command, torchrun's launcher, each rank). What it
diverts is named here: deprecation warnings raised in other libraries' code (their calls into each other, which a
user cannot act on), and the notices in NOTICES, WARNED and PRINTED. A rank writes them to its log (logs/rank-NNNNN.log,
from `to_rank_log`; what came before is held until then); the other processes drop them. Errors, tracebacks and
every other warning pass untouched. `--verbose` (QLAUNCH_VERBOSE=1, which the ranks inherit) shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

VERBOSE_ENV = "QLAUNCH_VERBOSE"
OURS = str(Path(__file__).resolve().parent)

# (logger, start of the message): notices about the libraries' own set-up, printed by every process.
NOTICES = (
    # bitsandbytes' optional faster CPU kernel, which it would fetch from the kernels hub.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),  # the same fetch, with HF_HUB_OFFLINE=1
    # DeepSpeed picking its CPU accelerator, in every process that imports it.
    ("DeepSpeed", "Setting accelerator to CPU"),
    # torchrun's banner around OMP_NUM_THREADS=1, the value it then sets.
    ("torch.distributed.run", "\n*****"),
)
# (file, start of the message): other libraries' UserWarnings about their calls into each other.
WARNED = (
    # FSDP1's state-dict code asks for a process group's default device through an API torch is retiring, and
    # warns twice at every checkpoint and export of every run.
    ("torch/distributed/fsdp/_shard_utils.py", "`_get_pg_default_device` will be deprecated"),
    ("torch/distributed/fsdp/_shard_utils.py", "Multiple backends are registered with this ProcessGroup"),
)
# Lines other libraries print(): DeepSpeed's shared-memory collective op, once per rank.
PRINTED = (("DeepSpeed ", " built successfully"),)
HELD_LINES = 2000
"""Chatter held before a rank knows its log: enough for a start-up, bounded for a process that never learns it."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Chatter:
    """Where the diverted messages go: held, then appended to the rank's log once it is known."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self.path: Path | None = None

    def write(self, text: str) -> None:
        if self.path is None:
            self.held = [*self.held[-HELD_LINES:], text]
            return
        with contextlib.suppress(OSError):  # chatter must never end a run (a full disk says so elsewhere)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as log:
                log.write(text if text.endswith("\n") else text + "\n")

    def to(self, path: Path) -> None:
        if self.path == path:
            return
        self.path, held, self.held = path, self.held, []
        for text in held:
            self.write(text)


_chatter = _Chatter()
_installed = False


def to_rank_log(path: str | Path) -> None:
    """From now on (and what was held before) the diverted messages go to this rank's log."""
    _chatter.to(Path(path))


def _is_other_libraries_deprecation(category: type[Warning], filename: str) -> bool:
    # A deprecation warned from our own code stays visible: it is ours to fix.
    return issubclass(category, (DeprecationWarning, FutureWarning)) and not filename.startswith(OURS)


def _is_named_warning(message, filename: str) -> bool:
    return any(filename.endswith(file) and str(message).startswith(start) for file, start in WARNED)


def _divert_warnings() -> None:
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not verbose() and (
            _is_other_libraries_deprecation(category, str(filename)) or _is_named_warning(message, str(filename))
        ):
            _chatter.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


class _NoticeFilter(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose() or record.levelno >= logging.ERROR:
            return True
        text = record.getMessage()
        if not text.startswith(self.start):
            return True
        _chatter.write(f"{record.levelname} {record.name}: {text}")
        return False


class _PrintedFilter:
    """sys.stdout, less the lines in PRINTED. A partial line is held only while it may still become one of them.
    Everything else (isatty, fileno, encoding) is the real stream's."""

    def __init__(self, stream):
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        if verbose():
            return self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if _printed_notice(line):
                _chatter.write(line)
            else:
                self.stream.write(line + "\n")
        if self.pending and not any(start.startswith(self.pending[: len(start)]) for start, _ in PRINTED):
            self.stream.write(self.pending)
            self.pending = ""
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _printed_notice(line: str) -> bool:
    return any(line.startswith(start) and line.endswith(end) for start, end in PRINTED)


def install() -> None:
    """Diverts the named chatter in this process; each filter asks verbose() as the message comes."""
    global _installed
    if _installed:
        return
    _installed = True
    _divert_warnings()
    for name, start in NOTICES:
        logging.getLogger(name).addFilter(_NoticeFilter(start))
    sys.stdout = _PrintedFilter(sys.stdout)


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """The logger `name` says nothing while the block runs (where its message would only repeat the error the
    caller reports)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
