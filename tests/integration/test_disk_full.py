"""A full disk for real: 2 CPU ranks (fsdp2) checkpoint every step onto a 2.2 MB tmpfs, where the third
checkpoint does not fit. The run ends in one line naming the directory and what to change, with no traceback
on the terminal; the two complete checkpoints are intact and `latest` names the second; the run moved to a
disk with room resumes (`--resume auto`) and finishes with the losses of one process that never stopped."""

import contextlib
import os
import re
import shutil
import subprocess

import pytest

from launcher import checkpoint
from support.launches import qlaunch, read_metrics

STEPS = 5


def run_args(assets, out, nproc: int, micro: int) -> list[str]:
    return [
        *("train", "--nproc", str(nproc), "--strategy", "fsdp2", "--model.path", str(assets / "base")),
        *("--data.path", str(assets / "data.jsonl"), "--data.max_seq_len", "64", "--output_dir", str(out)),
        *("--train.max_steps", str(STEPS), "--train.micro_batch_size", str(micro), "--lora.dropout", "0"),
        *("--quant.compute_dtype", "float32", "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "3"),
    ]


@pytest.fixture
def small_disk(tmp_path):
    """A 2.2 MB tmpfs (the tests run as root): room for two of this run's ~0.85 MB checkpoints, not three."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(disk)], capture_output=True)
    assert mounted.returncode == 0, f"mounting a tmpfs needs root: {mounted.stderr.decode()}"
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_ends_in_one_line_keeps_what_was_complete_and_resumes_elsewhere(
    family_assets, small_disk, tmp_path
):
    assets = family_assets("llama")
    full, log = small_disk / "run", tmp_path / "full.log"
    qlaunch(log, *run_args(assets, full, 2, 1), expect=1)
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    # Both ranks report the failed save; which of them met the full disk first depends on timing.
    assert re.match(r"qlaunch: error \(ranks 0, 1\): torch.distributed.checkpoint failed on rank [01, ]+: ", last), last
    assert f"no space left on device in {full}" in last and "checkpoint.keep_last" in last, last
    root = full / "checkpoints"
    assert checkpoint.latest_complete(root) == root / checkpoint.step_name(2)
    assert all(checkpoint.is_complete(root / checkpoint.step_name(step)) for step in (1, 2))

    moved = tmp_path / "run"
    shutil.copytree(full, moved)
    qlaunch(tmp_path / "resumed.log", *run_args(assets, moved, 2, 1), "--resume", "auto")
    assert "Resuming from step 2" in (tmp_path / "resumed.log").read_text()

    from launcher import train
    from launcher.config import load_config, parse_overrides

    reference = tmp_path / "reference"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        train.run(load_config(None, parse_overrides(run_args(assets, reference, 1, 2)[3:])))
    losses = {r["step"]: r["loss"] for r in read_metrics(moved)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    expected = {r["step"]: r["loss"] for r in read_metrics(reference)}
    assert [losses[s] for s in sorted(losses)] == pytest.approx([expected[s] for s in sorted(losses)], rel=1e-5)
