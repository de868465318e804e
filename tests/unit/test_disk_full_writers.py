"""A full disk is named whatever the writer raised: each of the writers a run uses (torch.save, safetensors,
torch.distributed.checkpoint, a plain file write) fills a real 1 MiB tmpfs with 0, 64 KiB and 320 KiB left, so that
the disk fills in the header, early in the data or late in it, and each failure reads as a full disk. A write that
fails for another reason on a disk with room stays what it was. (tests/integration/test_disk_full.py fills the disk
of a real 2-rank run.)"""

import errno
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from launcher.run import failures
from launcher.run.disk_full import free_bytes, writing

PAYLOAD = {"weight": torch.randn(128, 1024)}  # 512 KiB
NEEDED = 128 * 1024 * 4


def _dcp_save(path: Path) -> None:
    with warnings.catch_warnings():  # one process, no process group: DCP says it saves as one rank
        warnings.simplefilter("ignore")
        dcp.save(PAYLOAD, checkpoint_id=str(path))


WRITERS = {
    "torch.save": lambda path: torch.save(PAYLOAD, path),
    "safetensors": lambda path: save_file(PAYLOAD, path),
    "dcp": _dcp_save,
    "open().write": lambda path: path.write_bytes(PAYLOAD["weight"].numpy().tobytes()),
}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    assert mounted.returncode == 0, f"mounting a tmpfs needs root: {mounted.stderr.decode()}"
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=False)  # detached even while a writer still holds a file


def fill(disk: Path, leave: int) -> None:
    """Everything but `leave` bytes of the disk taken by a ballast file."""
    for old in disk.iterdir():
        subprocess.run(["rm", "-rf", str(old)], check=True)
    (disk / "ballast").write_bytes(b"\0" * (free_bytes(disk) - leave))
    assert abs(free_bytes(disk) - leave) <= 4096


@pytest.mark.parametrize("leave", [0, 64 * 1024, 320 * 1024], ids=["0KiB", "64KiB", "320KiB"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_that_fills_the_disk_is_named_a_full_disk(disk, writer, leave):
    fill(disk, leave)
    target = disk / "run" / "checkpoint"
    target.parent.mkdir(exist_ok=True)
    with pytest.raises(OSError) as raised, writing(target, "checkpoint", NEEDED):
        WRITERS[writer](target)
    assert raised.value.errno == errno.ENOSPC and raised.value.needed == ("checkpoint", NEEDED)
    assert raised.value.__cause__ is not None  # what the writer itself raised stays behind it, for the rank log
    line = failures.cause_and_fix(raised.value, 60, disk / "run")
    assert f"no space left on device in {disk / 'run'} (" in line and "the checkpoint needs 0.5 MiB" in line, line


def test_torch_save_loses_the_errno_that_the_free_space_check_recovers(disk):
    """Why the check exists: torch.save's zip writer raises no OSError and says nothing of the disk."""
    fill(disk, 64 * 1024)
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        torch.save(PAYLOAD, disk / "checkpoint.pt")
    assert failures.disk_full(raised.value) is None


def test_a_failure_on_a_disk_with_room_is_not_a_full_disk(disk):
    fill(disk, 900 * 1024)

    def broken(path: Path) -> None:
        path.write_bytes(b"partial")
        raise ValueError("the writer's own bug")

    with pytest.raises(ValueError, match="the writer's own bug"), writing(disk / "checkpoint", "checkpoint", NEEDED):
        broken(disk / "checkpoint")
