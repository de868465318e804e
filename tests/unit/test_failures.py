"""A failed rank ends in one line; the traceback goes to the run's log folder (launcher/run/failures.py)."""

import pytest
import torch

from launcher.config import ConfigError
from launcher.run import failures
from launcher.run.disk_full import disk_full
from launcher.run.preemption import STATUS_DIR_ENV


@pytest.fixture
def rank1(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(STATUS_DIR_ENV, raising=False)
    monkeypatch.delenv(failures.DEBUG_ENV, raising=False)


def fail_with(error: BaseException, out, timeout_s: float = 600) -> int:
    with pytest.raises(SystemExit) as ended, failures.reported(out, timeout_s):
        raise error
    return ended.value.code


def test_an_error_is_one_line_and_its_traceback_goes_to_the_rank_log(rank1, tmp_path, capsys):
    code = fail_with(ValueError("shapes do not match\nsecond line"), tmp_path / "out")
    err = capsys.readouterr().err
    log = tmp_path / "out" / "logs" / "rank-00001.log"
    assert code == 1
    assert err.splitlines() == [f"qlaunch: error (rank 1): ValueError: shapes do not match Traceback: {log}"]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ValueError: shapes do not match" in text


def test_debug_prints_the_traceback_too(rank1, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(failures.DEBUG_ENV, "1")
    fail_with(KeyError("lm_head"), tmp_path / "out")
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("qlaunch: error (rank 1)")


def test_an_unwritable_output_dir_still_shows_the_traceback(rank1, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    fail_with(RuntimeError("boom"), blocked)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].endswith("RuntimeError: boom")


def test_a_config_error_is_left_to_the_command_line(rank1, tmp_path):
    with pytest.raises(ConfigError), failures.reported(tmp_path / "out", 600):
        raise ConfigError("`lora.r` changed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "error,says",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "qlaunch plan"),
        (torch.distributed.DistBackendError("[gloo] Connection closed by peer"), "dist.timeout_s=30"),
        (RuntimeError("Timeout waiting for key"), "another rank ended or stalled"),
        (MemoryError(), "out of host memory"),
    ],
)
def test_known_causes_say_the_fix(error, says):
    assert says in failures.cause_and_fix(error, timeout_s=30)


def test_under_the_wrapper_a_rank_hands_its_line_over(rank1, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    fail_with(RuntimeError("boom"), tmp_path / "out")
    assert capsys.readouterr().err == ""
    log = str(tmp_path / "out" / "logs" / "rank-00001.log")
    assert failures.read_reports(tmp_path) == {1: {"message": "RuntimeError: boom", "log": log}}


def test_the_wrapper_names_the_ranks_that_failed_first():
    reports = {
        0: {"message": "a collective failed", "log": "/o/logs/rank-00000.log"},
        1: {"message": "ValueError: bad", "log": "/o/logs/rank-00001.log"},
        2: {"message": "ValueError: bad", "log": "/o/logs/rank-00002.log"},
    }
    assert failures.summary(reports, first_failed=[1]) == [
        "qlaunch: error (ranks 1, 2): ValueError: bad Tracebacks: /o/logs/"
    ]
    assert failures.summary(reports, first_failed=[0]) == [
        "qlaunch: error (rank 0): a collective failed Traceback: /o/logs/rank-00000.log"
    ]
    # Failed within one poll: the collective's failure is the other error's consequence.
    assert failures.summary(reports, first_failed=[0, 1]) == [
        "qlaunch: error (ranks 1, 2): ValueError: bad Tracebacks: /o/logs/"
    ]
    assert failures.summary({}, first_failed=[3])[0].startswith("qlaunch: error (rank 3): ended without reporting")
    assert failures.summary({0: {"message": "x", "log": None}}, first_failed=[]) == ["qlaunch: error (rank 0): x"]
    assert failures.summary({}, first_failed=[]) == []


def test_a_checkpoint_error_names_the_rank_and_the_cause_within():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise EOFError()
    except EOFError as inner:
        wrapped = _wrap_exception(inner)
    line = failures.cause_and_fix(CheckpointException("read_data", {0: wrapped}), timeout_s=30)
    assert line.startswith("torch.distributed.checkpoint failed on rank 0: EOFError: a file it read is cut short")


def test_accelerate_launch_failures_are_one_line(monkeypatch, capsys):
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launcher import accelerate_entry

    monkeypatch.delenv(failures.DEBUG_ENV, raising=False)
    argv = ["--num_processes", "2", "-m", "launcher", "train"]

    def rank_failed(args):
        raise ChildFailedError("launcher", {0: ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file="")})

    monkeypatch.setattr(accelerate_launch, "launch_command", rank_failed)
    assert accelerate_entry.main(argv) == 1
    assert capsys.readouterr().err == ""  # the wrapper reports the rank's own line

    def port_taken(args):
        raise ConnectionError(
            "Tried to launch distributed communication on port `29500`, but another process is utilizing it.\nmore"
        )

    monkeypatch.setattr(accelerate_launch, "launch_command", port_taken)
    assert accelerate_entry.main(argv) == 1
    assert capsys.readouterr().err == (
        "qlaunch: accelerate launch failed: ConnectionError: Tried to launch distributed communication on port "
        "`29500`, but another process is utilizing it.\n"
    )


def test_a_full_disk_is_one_line_that_names_the_directory_the_sizes_and_the_fix(rank1, tmp_path, capsys):
    """As torch.distributed.checkpoint reports a save onto a full disk: per rank, a wrapped OSError raised while
    handling the writer's RuntimeError. The rank log cannot be written there either: no traceback all the same."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    out = tmp_path / "out"
    previous = out / "checkpoints" / "step-000005"
    previous.mkdir(parents=True)
    (previous / "shard.distcp").write_bytes(b"x" * 3 * 2**20)
    target = out / "checkpoints" / ".step-000010.partial" / "__0_0.distcp"
    try:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        except RuntimeError:
            raise OSError(28, "No space left on device", str(target)) from None
    except OSError as inner:
        wrapped = _wrap_exception(inner)
    error = CheckpointException("write_data", {0: wrapped, 1: wrapped})
    line = failures.cause_and_fix(error, timeout_s=30, output_dir=out)
    assert line.startswith(f"torch.distributed.checkpoint failed on rank 0, 1: no space left on device in {out}")
    assert "iB free; a checkpoint of this run is 3.0 MiB). Free space there, keep fewer checkpoints" in line
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")  # the rank log cannot be written, as on a full disk
    fail_with(error, blocked)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "no space left on device" in err


def test_a_full_disk_under_the_adapter_says_what_needed_how_much(tmp_path):
    """safetensors reports ENOSPC only in its text; export's writer turns it into one line with the size."""
    from safetensors import SafetensorError

    from launcher.checkpoint import export

    out = tmp_path / "out"
    out.mkdir()

    def write(tmp):
        (tmp / "part").write_text("x")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError) as raised:
        export.write_atomically(out / "adapter", write, "adapter", 3 * 2**20)
    assert list(out.iterdir()) == []  # the half-written folder is gone
    line = failures.cause_and_fix(raised.value, timeout_s=30, output_dir=out)
    assert line.startswith(f"no space left on device in {out} (") and "the adapter needs 3.0 MiB)" in line
    assert disk_full(SafetensorError("I/O error: os error 28")) is not None
    assert disk_full(SafetensorError("invalid header")) is None
