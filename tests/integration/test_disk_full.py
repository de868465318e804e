"""A full disk for real, on a tmpfs (the tests run as root), with 2 CPU ranks (fsdp2): once during a checkpoint
save, once while the finished run writes its adapter. Each run ends in one line naming the directory, how much
the write needed and what to change, with no traceback on the terminal; what was complete is intact; the run
moved to a disk with room resumes (`--resume auto`) and finishes with the losses of one process that never
stopped."""

import contextlib
import os
import re
import shutil
import subprocess

import pytest

from launcher.checkpoint import store
from support.launches import qlaunch, read_metrics

STEPS = 5


def run_args(assets, out, nproc: int, micro: int) -> list[str]:
    return [
        *("train", "--nproc", str(nproc), "--strategy", "fsdp2", "--model.path", str(assets / "base")),
        *("--data.path", str(assets / "data.jsonl"), "--data.max_seq_len", "64", "--output_dir", str(out)),
        *("--train.max_steps", str(STEPS), "--train.micro_batch_size", str(micro), "--lora.dropout", "0"),
        *("--quant.compute_dtype", "float32", "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "3"),
    ]


@contextlib.contextmanager
def tmpfs(path, size: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    assert mounted.returncode == 0, f"mounting a tmpfs needs root: {mounted.stderr.decode()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # detached even while a writer still holds a file


@pytest.fixture
def small_disk(tmp_path):
    """2.2 MB: room for two of this run's ~0.85 MB checkpoints, not three."""
    with tmpfs(tmp_path / "small-disk", "2200k") as disk:
        yield disk


@pytest.fixture(scope="module")
def reference(family_assets, tmp_path_factory) -> dict[int, float]:
    """The losses of one process (micro batch 2: the same samples) that never stopped."""
    from launcher import train
    from launcher.config import load_config, parse_overrides

    out = tmp_path_factory.mktemp("reference") / "run"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        train.run(load_config(None, parse_overrides(run_args(family_assets("llama"), out, 1, 2)[3:])))
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def assert_losses(out, reference) -> None:
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == pytest.approx([reference[s] for s in sorted(losses)], rel=1e-5)


def test_a_full_disk_ends_in_one_line_keeps_what_was_complete_and_resumes_elsewhere(
    family_assets, small_disk, tmp_path, reference
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
    assert store.latest_complete(root) == root / store.step_name(2)
    assert all(store.is_complete(root / store.step_name(step)) for step in (1, 2))

    moved = tmp_path / "run"
    shutil.copytree(full, moved)
    qlaunch(tmp_path / "resumed.log", *run_args(assets, moved, 2, 1), "--resume", "auto")
    assert "Resuming from step 2" in (tmp_path / "resumed.log").read_text()
    assert_losses(moved, reference)


def final_checkpoint_only(assets, out) -> list[str]:
    return [*run_args(assets, out, 2, 1), "--checkpoint.every_steps", "0", "--checkpoint.keep_last", "1"]


def test_a_disk_that_fills_while_the_adapter_is_written_keeps_the_final_checkpoint(family_assets, tmp_path, reference):
    """950 KB: the final checkpoint (~824 KB) and the run's reports fit, the adapter (~136 KB) does not."""
    assets = family_assets("llama")
    with tmpfs(tmp_path / "disk", "950k") as disk:
        full, log = disk / "run", tmp_path / "full.log"
        qlaunch(log, *final_checkpoint_only(assets, full), expect=1)
        output = log.read_text()
        # Removing the half-written adapter freed room for the rank logs, which the line points to.
        assert "Traceback (most recent call last)" not in output and "a collective failed" not in output, output
        last = output.strip().splitlines()[-1]
        assert last.startswith("qlaunch: error (rank 0): no space left on device in ") and str(full) in last, last
        assert "the adapter needs" in last and "checkpoint.keep_last" in last, last
        root = full / "checkpoints"
        assert store.latest_complete(root) == root / store.step_name(STEPS)  # the final one, complete
        assert not (full / "adapter").exists() and not list(full.glob(".adapter.tmp-*"))  # nothing half-written
        moved = tmp_path / "run"
        shutil.copytree(full, moved)
    resumed = tmp_path / "resumed.log"
    qlaunch(resumed, *final_checkpoint_only(assets, moved), "--resume", "auto")
    assert f"Resuming from step {STEPS}" in resumed.read_text()
    assert (moved / "adapter" / "adapter_model.safetensors").is_file()
    assert_losses(moved, reference)
