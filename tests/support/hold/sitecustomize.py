"""Holds a phase of a run open, so that a test's signal lands there and not by timing.

Python imports this module at start-up in every process whose PYTHONPATH holds this folder (the
signal tests put it there; nothing else does). While $QLAUNCH_HOLD_DIR/hold-<phase> (or hold-<phase>-<who>) exists,
a process that reaches <phase> writes $QLAUNCH_HOLD_DIR/held-<phase>-<who> (its pid), and
signalled-<phase>-<who> once it has received a stop signal, and waits until the file is removed.
<who> is a rank's RANK, or the Slurm node name of `qlaunch train` in front of the ranks. Phases:
`launch` (qlaunch train, before it starts accelerate launch: no rank exists yet), `load`
(train.load_base), `checkpoint` (checkpoint.store.save), `export` (export.save_adapter, after the last
step), `teardown` (once the work of a `qlaunch train` process is over: a rank's `failures.exit_rank`, the
wrapper's last exit handler; stop signals are ignored there, so `signalled-` cannot be written; the test sees
the process live on).
It changes nothing else: the functions are the launcher's own.
"""

import atexit
import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path

HOLD_DIR = os.environ.get("QLAUNCH_HOLD_DIR")


def hold_open(phase: str) -> None:
    from launcher import signals

    who = os.environ.get("RANK") or os.environ.get("SLURMD_NODENAME", "0")
    holds = (Path(HOLD_DIR) / f"hold-{phase}", Path(HOLD_DIR) / f"hold-{phase}-{who}")  # everyone, or one
    if any(hold.exists() for hold in holds):
        (Path(HOLD_DIR) / f"held-{phase}-{who}").write_text(str(os.getpid()))
        while any(hold.exists() for hold in holds):
            if signals.received() is not None:
                (Path(HOLD_DIR) / f"signalled-{phase}-{who}").touch()
            time.sleep(0.05)


def held(phase: str, function):
    def wrapper(*args, **kwargs):
        hold_open(phase)
        return function(*args, **kwargs)

    return wrapper


def hold_teardown() -> None:
    """Registered first, so it runs after every other exit handler (torch's, Accelerate's)."""
    if "launcher.signals" in sys.modules and sys.argv[1:2] == ["train"]:
        hold_open("teardown")


def hold_phases(train) -> None:
    import launcher.launch
    from launcher.run import failures

    launcher.launch.launch = held("launch", launcher.launch.launch)
    train.load_base = held("load", train.load_base)
    train.store.save = held("checkpoint", train.store.save)
    train.export.save_adapter = held("export", train.export.save_adapter)
    # A rank ends in exit_rank, without the interpreter's teardown (and so without its exit handlers).
    failures.exit_rank = held("teardown", failures.exit_rank)


class HoldAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the phases of `launcher.train` as soon as it is imported."""

    def find_spec(self, name, path, target=None):
        if name != "launcher.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            hold_phases(module)

        spec.loader.exec_module = exec_module
        return spec


if HOLD_DIR:
    sys.meta_path.insert(0, HoldAfterImport())
    atexit.register(hold_teardown)
