"""A failure only the ranks can meet, for real: `qlaunch train` ends with one line naming the ranks and the
cause, the tracebacks are in the run's log folder, and nothing that was there is touched."""

import shutil
import time
from pathlib import Path

from support.launches import qlaunch


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_corrupt_checkpoint_ends_the_run_in_one_line(demo_assets, tmp_path):
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join((demo_assets / "data.jsonl").read_text().splitlines()[:16]) + "\n")
    common = ["--config", str(demo_assets / "run.yaml"), "--nproc", "2", "--data.path", str(data)]
    common += ["--train.micro_batch_size", "2", "--train.max_steps", "2", "--checkpoint.every_steps", "2"]
    first = tmp_path / "first"
    qlaunch(tmp_path / "first.log", "train", *common, "--output_dir", str(first))
    assert "\r" not in (tmp_path / "first.log").read_text()  # output to a file: no progress bar updates

    # A checkpoint handed over with one rank's shard cut short: only reading it inside the ranks finds out.
    handed = tmp_path / "handed"
    shutil.copytree(first / "checkpoints" / "step-000002", handed)
    shard = next((handed / "trainable").glob("__0_*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = snapshot(tmp_path)

    second, log = tmp_path / "second", tmp_path / "second.log"
    started = time.monotonic()
    proc = qlaunch(log, "train", *common, "--output_dir", str(second), "--resume", str(handed), expect=None)
    took = time.monotonic() - started

    text = log.read_text()
    last = text.strip().splitlines()[-1]
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback (most recent call last)" not in text and "ChildFailedError" not in text, text[-3000:]
    # Both ranks get rank 0's error from the checkpoint's collective and say so, on one line; on a loaded
    # machine rank 1 may still be in that collective when rank 0 is gone, and then only rank 0's line is named.
    cause = (
        "torch.distributed.checkpoint failed on rank 0: EOFError: a file it read is cut short or corrupt. Resume "
        "from another checkpoint."
    )
    assert last in (
        f"qlaunch: error (ranks 0, 1): {cause} Tracebacks: {second / 'logs'}/",
        f"qlaunch: error (rank 0): {cause} Traceback: {second / 'logs' / 'rank-00000.log'}",
    ), last
    for rank in (0, 1):
        assert "Traceback (most recent call last)" in (second / "logs" / f"rank-{rank:05d}.log").read_text()
    assert took < 120, f"took {took:.0f} s to fail"
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed
    assert all(k.startswith(("second/", "second.log")) for k in after.keys() - before.keys())
