"""Outside Slurm: two `accelerate launch` machines on one host, the hang guard, and SIGTERM to `qlaunch train`."""

import json
import re
import signal
import time

import torch

from launcher.launch import free_port
from launcher.launch.supervise import is_running
from support.launches import REPO, python, read_metrics, start_command, tail, wait_for


def test_two_accelerate_launches_with_machine_ranks_0_and_1_form_one_run(family_assets, tmp_path):
    """The plain multi-node path, as the README writes it: the multi-node config, values given at launch
    (on Gemma3: tied embeddings reach the other machine's rank through the weight handoff)."""
    port, out, steps, assets = free_port(), tmp_path / "run", 4, family_assets("gemma3")
    procs, logs = [], []
    for machine_rank in (0, 1):
        logs.append(tmp_path / f"machine{machine_rank}.log")
        procs.append(
            start_command(
                [
                    python(),
                    "-m",
                    "accelerate.commands.launch",
                    "--config_file",
                    "accelerate_configs/multinode/fsdp2.yaml",
                    "--num_machines",
                    "2",
                    "--machine_rank",
                    str(machine_rank),
                    "--main_process_ip",
                    "127.0.0.1",
                    "--main_process_port",
                    str(port),
                    "--num_processes",
                    "2",
                    "-m",
                    "launcher",
                    "train",
                    "--model.path",
                    str(assets / "base"),
                    "--data.path",
                    str(assets / "data.jsonl"),
                    "--output_dir",
                    str(out),
                    "--train.max_steps",
                    str(steps),
                ],
                logs[-1],
            )
        )
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=300) == 0, tail(log)
    assert "rank 0/2 " in logs[0].read_text() and "rank 1/2 " in logs[1].read_text()
    report = json.loads((out / "shard_report.json").read_text())
    assert [r["rank"] for r in report] == [0, 1]
    assert all(
        r["optimizer_state_elements_local"] * 2 == sum(x["optimizer_state_elements_local"] for x in report)
        for r in report
    )
    assert [r["step"] for r in read_metrics(out)] == list(range(1, steps + 1))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_rank_that_never_reaches_a_collective_fails_the_run_within_the_timeout(demo_assets, tmp_path):
    """Rank 1 hangs after step 3 (in Python, so its SIGTERM handler runs and only sets a flag); rank 0 waits in the
    next collective. `qlaunch train`'s launch path must end both within dist.timeout_s + 10%."""
    timeout = 10
    probe = tmp_path / "probe"
    log = tmp_path / "hang.log"
    proc = start_command(
        [
            python(),
            "tests/support/launch_probe.py",
            str(probe),
            "2",
            "--",
            "--config",
            str(demo_assets / "run.yaml"),
            "--output_dir",
            str(tmp_path / "run"),
            "--train.max_steps",
            "10",
            "--dist.timeout_s",
            str(timeout),
        ],
        log,
        env={"PROBE_STALL": "1:3", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
    )
    stalled = probe / "stalled"
    wait_for(stalled.is_file, 300, proc, log)
    pids = [int((probe / f"pid-rank{r}").read_text()) for r in range(2)]
    while any(is_running(pid) for pid in pids):
        assert time.time() - float(stalled.read_text()) < 3 * timeout, f"ranks still running:\n{tail(log)}"
        time.sleep(0.05)
    ranks_gone = time.time() - float(stalled.read_text())
    code = proc.wait(timeout=60)
    launcher_done = time.time() - float(stalled.read_text())
    print(
        f"hang guard: timeout {timeout} s, ranks gone after {ranks_gone:.2f} s, launcher exited after {launcher_done:.2f} s"
    )
    assert code != 0
    assert f"Timed out waiting {timeout * 1000}ms" in log.read_text()
    assert timeout <= ranks_gone <= 1.1 * timeout
    assert launcher_done <= 1.1 * timeout + 5  # the launchers' own interpreter exit after the ranks are gone


def test_sigterm_to_qlaunch_checkpoints_and_exits_with_the_preemption_status(demo_assets, tmp_path):
    """Only qlaunch gets the signal (as from `kill`): it passes it on; the ranks agree, checkpoint and stop."""
    out, log, steps = tmp_path / "run", tmp_path / "train.log", 40
    proc = start_command(
        [
            python(),
            "-m",
            "launcher",
            "train",
            "--nproc",
            "2",
            "--config",
            str(demo_assets / "run.yaml"),
            "--output_dir",
            str(out),
            "--train.max_steps",
            str(steps),
            "--dist.preempt_exit_code",
            "99",
        ],
        log,
    )
    wait_for(lambda: len(read_metrics(out)) >= 4, 300, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 99, tail(log)
    text = log.read_text()
    stopped = int(
        re.search(r"qlaunch: Stopped after step (\d+) on SIGTERM: the checkpoint is complete; exit status 99", text)[1]
    )
    assert 4 <= stopped < steps
    # A planned stop reads as one: the ranks exit 0 to torchrun, which reports nothing; qlaunch says it once.
    assert text.count("Stopped after step") == 1 and "Traceback" not in text and "ChildFailedError" not in text
    checkpoint = out / "checkpoints" / f"step-{stopped:06d}"
    assert (out / "checkpoints" / "latest").read_text() == checkpoint.name
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == stopped
    assert not (out / "adapter").exists()  # it stopped; the run did not finish
    assert torch.load(checkpoint / "scheduler.pt", weights_only=False)["last_epoch"] == stopped
