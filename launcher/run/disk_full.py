"""A full disk, named whatever the writer raised.

Python's own writes raise OSError(ENOSPC) and safetensors says "os error 28", but torch.save's zip writer (and
torch.distributed.checkpoint, which uses it) loses the errno: "unexpected pos 704 vs 598". So a write that fails
inside `writing` is also taken for a full disk when the filesystem it wrote to has less room left than the write
needed: whatever the exception says, the write could not have succeeded there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

NO_SPACE_TEXTS = ("No space left on device", "os error 28")


def disk_full(error: BaseException | None) -> OSError | None:
    """The "no space left on device" OSError behind `error` (itself, its cause or context, or a rank's error
    inside torch.distributed.checkpoint's CheckpointException), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if any(mark in str(error) for mark in NO_SPACE_TEXTS):  # safetensors' writer: no OSError, only its text
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        failed = getattr(error, "failures", None)
        if isinstance(failed, dict) and failed:
            return next((found for inner, _ in failed.values() if (found := disk_full(inner))), None)
        error = error.__cause__ or error.__context__
    return None


def existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def short_of_space(path: Path, needed: int) -> bool:
    """Less room left where `path` is written than `needed` bytes (unknown, 0: never)."""
    return needed > 0 and free_bytes(path) < needed


def no_space(path: Path, what: str, needed: int) -> OSError:
    """The error to raise where writing `what` (`needed` bytes) to `path` met a full disk."""
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    error.needed = (what, needed)
    return error


@contextlib.contextmanager
def writing(path: Path, what: str, needed: int):
    """Around a write of `what` (at least `needed` bytes) to `path`: a failure on a disk without that room, or with
    ENOSPC anywhere in it, is raised as `no_space`. Check before removing what the write left."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is one
        if getattr(disk_full(error), "needed", None) or not (disk_full(error) or short_of_space(path, needed)):
            raise  # named already by an inner write, or not a full disk
        raise no_space(path, what, needed) from error


def disk_full_message(error: OSError, output_dir: Path) -> str:
    """Which directory is full, how much it has left, how big what the run writes there is, and what to do."""
    directory = existing_parent(Path(error.filename).parent if error.filename else output_dir)
    free = shutil.disk_usage(directory).free
    checkpoints = [path for path in (output_dir / "checkpoints").glob("step-*") if path.is_dir()]
    sizes = [sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for path in checkpoints]
    size = f"; a checkpoint of this run is {_size(max(sizes))}" if sizes else ""
    if needed := getattr(error, "needed", None):  # (what, bytes) where the writer knows it
        size += f"; the {needed[0]} needs {_size(needed[1])}"
    return (
        f"no space left on device in {directory} ({_size(free)} free{size}). Free space there, keep fewer "
        "checkpoints (checkpoint.keep_last), or set output_dir on a disk with room and resume with --resume auto."
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
