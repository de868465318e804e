"""Stop signals in one process: recorded from the start, passed on to ranks that register late, and a
planned stop that reads as one (launcher/signals.py, run/preemption.py, launch/supervise.py)."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from launcher import launch, signals, strategies
from launcher.config import DistConfig
from launcher.launch.supervise import Ranks
from launcher.run.preemption import MARKER, STATUS_DIR_ENV, StopSignal


@pytest.fixture
def fresh_signals(monkeypatch):
    """No stop signal received yet in this process (the record is process-wide)."""
    monkeypatch.setattr(signals, "_received", [])


def test_a_signal_is_recorded_and_the_handlers_found_come_back(fresh_signals):
    before = signal.getsignal(signal.SIGUSR2)
    with signals.listening():
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received() == signal.SIGUSR2  # the first one names the stop
    assert signal.getsignal(signal.SIGUSR2) is before


RANK = """
import os, signal, sys, time
status, got = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGUSR2, lambda *_: open(got, "w").close())
open(os.path.join(status, "pid-0"), "w").write(str(os.getpid()))
deadline = time.monotonic() + 20
while not os.path.exists(got) and time.monotonic() < deadline:
    time.sleep(0.05)
open(os.path.join(status, "done-0"), "w").close()
"""


def test_a_signal_before_a_rank_registers_reaches_it_once_it_has(fresh_signals, tmp_path):
    got = tmp_path / "got"
    with Ranks(tmp_path) as ranks:
        os.kill(os.getpid(), signal.SIGUSR2)  # no rank yet: nobody to pass it to
        rank = subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path), str(got)])
        assert ranks.watch(rank, interval=0.05) == 0
    assert got.exists()


def test_a_stopped_rank_under_qlaunch_exits_0_and_leaves_the_status_to_qlaunch(
    fresh_signals, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as exited, StopSignal(85) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        stop.exit(7)
    assert exited.value.code == 0  # torchrun reports a non-zero rank as a failure, with a traceback
    assert json.loads((tmp_path / MARKER.format(rank=0)).read_text()) == {"step": 7, "signal": "SIGTERM"}
    assert (tmp_path / "done-0").exists() and "Stopped" not in capsys.readouterr().out


def test_a_stopped_rank_on_its_own_exits_with_the_preemption_status(fresh_signals, monkeypatch, capsys):
    monkeypatch.delenv(STATUS_DIR_ENV, raising=False)
    with pytest.raises(SystemExit) as exited, StopSignal(85) as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        stop.exit(None)
    assert exited.value.code == 85
    assert "Stopped before training on SIGUSR2: nothing new to checkpoint; exit status 85" in capsys.readouterr().out


def test_a_signal_before_the_launch_on_one_machine_stops_without_starting_it(fresh_signals, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("accelerate launch was started")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    with signals.listening():
        os.kill(os.getpid(), signal.SIGUSR2)
        code = launch.launch(strategies.get("fsdp2"), launch.Machines.local(2), [], DistConfig())
    assert code == 85
    assert "qlaunch: Stopped before training on SIGUSR2" in capsys.readouterr().out


def test_qlaunch_names_the_signal_a_rank_got_not_the_agreement_of_the_others(tmp_path):
    (tmp_path / MARKER.format(rank=0)).write_text(json.dumps({"step": 4, "signal": None}))
    (tmp_path / MARKER.format(rank=1)).write_text(json.dumps({"step": 4, "signal": "SIGUSR2"}))
    assert Ranks(tmp_path).preempted() == {"step": 4, "signal": "SIGUSR2"}
    assert Ranks(tmp_path / "none").preempted() is None


def test_a_burst_of_signals_while_the_interpreter_shuts_down_is_not_fatal():
    """CPython puts SIG_DFL back for Python-handled signals while it finalizes: a `qlaunch train` process
    (here one that only prints its help) gets SIGUSR2 every half millisecond from the moment its main() is
    running until it is gone, and still exits 0, every time (without `ignore_until_exit`: 5 of 5 killed)."""
    import time

    for _ in range(5):
        cmd = [sys.executable, "-m", "launcher", "train", "--help"]
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        process.stdout.read(5)  # the help has started: main() is running
        while process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR2)
            time.sleep(0.0005)
        process.stdout.read()
        assert process.wait() == 0


def test_the_third_start_in_a_row_stopped_before_training_stops_requeueing(
    fresh_signals, monkeypatch, capsys, tmp_path
):
    """Each start here gets its signal before anything is launched (as when start-up outlasts Slurm's warning
    lead): the first two end with the preemption status (the scripts requeue), the third with an error that
    names the cause; a start that trains in between starts the count again."""
    from launcher.launch import starts

    def refuse(*args, **kwargs):
        raise AssertionError("accelerate launch was started")

    monkeypatch.setattr(subprocess, "Popen", refuse)

    def start() -> int:
        monkeypatch.setattr(signals, "_received", [])
        monkeypatch.setattr(signals, "_received_at", [])
        with signals.listening():
            os.kill(os.getpid(), signal.SIGUSR2)
            return launch.launch(
                strategies.get("fsdp2"), launch.Machines.local(2), [], DistConfig(), output_dir=tmp_path
            )

    assert [start(), start()] == [85, 85]
    starts.progressed(tmp_path, 0)
    assert [start(), start(), start()] == [85, 85, starts.NO_PROGRESS_EXIT]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qlaunch: error: 3 starts in a row were stopped before their first step: the stop signal")
    assert "--signal=B:USR2@SECONDS" in last and " s after each start" in last
    assert start() == 85  # the count starts again after it said so
