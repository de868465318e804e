"""The slurm/ scripts under a real Slurm: a two-node cluster on this host (tests/support/slurm_cluster.py).

Jobs are submitted with the real sbatch and train the embedded model on CPU ranks: two single-node
jobs at once (2 ranks each), then a two-node job (1 rank per node) that gets a stop signal in another
phase at each of its four starts (before the ranks exist, mid-training to one node, a checkpoint
save, the export), requeues itself and resumes. The single-node jobs train the same config, so their losses are the
reference the resumed two-node run must follow step for step.
"""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from launcher.launch import slurm
from support.launches import CPU_ENV, REPO, python, qlaunch, read_metrics
from support.slurm_cluster import SlurmCluster, install, wait_until

SCRIPTS = REPO / "slurm"
STEPS = 30
PREEMPT_AFTER = 6  # steps logged before the warning signal is sent
EVERY = 5  # checkpoint.every_steps of the preempted two-node job
HOLD_HOOK = REPO / "tests" / "support" / "hold"  # holds a phase of a run open (see its sitecustomize.py)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
# sbatch passes the submitting environment on: the scripts run this checkout with this interpreter.
JOB_ENV = dict(CPU_ENV, PYTHONPATH=str(REPO), QLAUNCH_PYTHON=python())


@pytest.fixture(scope="module")
def cluster():
    try:
        install()
        started = SlurmCluster.start()
    except Exception as error:  # never a silent skip: these tests need Slurm
        pytest.fail(f"Could not start the local Slurm cluster: {error}", pytrace=False)
    try:
        yield started
    finally:
        started.stop()


def train_args(demo_assets: Path, out: Path) -> list[str]:
    return [str(demo_assets / "run.yaml"), "--output_dir", str(out), "--train.max_steps", str(STEPS)]


def ranks_started(output: str) -> set[tuple[int, str]]:
    return {(int(rank), node) for rank, node in re.findall(r"^rank (\d+)/2 on (\S+) ", output, re.M)}


def assert_trained(out: Path, output: str) -> None:
    losses = [r["loss"] for r in read_metrics(out)]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1)), output[-3000:]
    assert losses[-1] < losses[0] - 0.5, losses  # 5.59 -> about 4.6 in 30 steps
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert f"Done: {STEPS} steps" in output


@pytest.fixture(scope="module")
def single_node_jobs(cluster, demo_assets, tmp_path_factory):
    """Two single-node jobs (2 ranks each) submitted together; they run at the same time on n1 and n2."""
    root = tmp_path_factory.mktemp("slurm-single")
    jobs = {}
    for name in ("a", "b"):
        options = ["--gpus-per-node=2", f"--output={root / name}.out"]
        jobs[
            cluster.submit(SCRIPTS / "single_node.sbatch", train_args(demo_assets, root / name), options, JOB_ENV, root)
        ] = root / name
    started = time.monotonic()
    both_running = False
    while True:
        states = {job: cluster.job(job) for job in jobs}
        both_running |= all(info["JobState"] == "RUNNING" for info in states.values())
        if all(info["JobState"] in FINAL for info in states.values()):
            break
        assert time.monotonic() - started < 600, states
        time.sleep(0.5)
    print(f"two single-node jobs: {time.monotonic() - started:.1f} s")
    return {job: (out, states[job], Path(f"{out}.out").read_text()) for job, out in jobs.items()}, both_running


def test_single_node_script_trains_on_two_ranks(single_node_jobs):
    jobs, _ = single_node_jobs
    for out, info, output in jobs.values():
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
        node = info["NodeList"]
        assert ranks_started(output) == {(0, node), (1, node)}
        assert_trained(out, output)


def test_two_single_node_jobs_run_at_once_on_their_own_ports(single_node_jobs):
    jobs, both_running = single_node_jobs
    assert both_running
    assert {info["NodeList"] for _, info, _ in jobs.values()} == {"n1", "n2"}  # two "nodes", one host
    ports = {}
    for job, (_, info, output) in jobs.items():
        assert info["JobState"] == "COMPLETED"
        ports[job] = int(re.search(rf"Slurm job {job}, node {info['NodeList']}: 2 rank\(s\), port (\d+)", output)[1])
        assert ports[job] == slurm.port_for_job(job)
    assert len(set(ports.values())) == 2


@pytest.fixture(scope="module")
def preempted_job(cluster, demo_assets, tmp_path_factory, single_node_jobs):
    """The two-node script (1 rank per node; after the single-node jobs: both nodes needed), one job
    that gets a stop signal in another phase at each of its four starts. support/hold/ holds each phase
    open until every rank has received the signal, so it lands there, not by timing:
      1. before any rank exists, to the batch script (as Slurm's --signal=B:USR2@...); the ranks get it
         once they have started, are held in model loading until they have, and stop before training;
      2. mid-training, to node n2's qlaunch alone: both nodes stop after the same step, with a checkpoint;
      3. during a checkpoint save: the save completes, the run stops after the next step;
      4. after the last step, during the export: noted; the run finishes and the job completes, although
         each rank, then each node's qlaunch, is held in its last exit handler (interpreter shutdown) and
         sent USR2 and TERM there, and from then to the job's end the batch script is sent USR2 every 0.1 s
         and passes each one on.
    Starts 1-3 end with the preemption status, and the script requeues the job each time."""
    root = tmp_path_factory.mktemp("slurm-multi")
    out, log, hold = root / "run", root / "job.out", root / "hold"
    hold.mkdir()
    env = dict(JOB_ENV, PYTHONPATH=f"{REPO}{os.pathsep}{HOLD_HOOK}", QLAUNCH_HOLD_DIR=str(hold))
    args = [*train_args(demo_assets, out), "--checkpoint.every_steps", str(EVERY)]

    def signal_while_held(phase: str, held_by: tuple, send: bool = True) -> None:
        wait_until(lambda: all((hold / f"held-{phase}-{w}").exists() for w in held_by), 600, f"{held_by} in {phase}")
        if send:
            cluster.signal_batch(job, "USR2")
        wait_until(lambda: all((hold / f"signalled-{phase}-{w}").exists() for w in held_by), 60, f"signal in {phase}")
        (hold / f"hold-{phase}").unlink()

    def wait_for_start(n: int) -> None:
        wait_until(lambda: f"start {n}" in log.read_text(), 600, f"start {n}")

    started = time.monotonic()
    (hold / "hold-launch").touch()
    (hold / "hold-load").touch()
    job = cluster.submit(SCRIPTS / "multi_node.sbatch", args, ["--gpus-per-node=1", f"--output={log}"], env, root)
    signal_while_held("launch", ("n1", "n2"))
    signal_while_held("load", (0, 1), send=False)
    wait_for_start(2)
    wait_until(lambda: len(read_metrics(out)) >= PREEMPT_AFTER, 600, "training in start 2")
    os.kill(qlaunch_pid(job, "n2"), signal.SIGUSR2)
    wait_for_start(3)
    (hold / "hold-checkpoint").touch()
    signal_while_held("checkpoint", (0, 1))
    wait_for_start(4)
    (hold / "hold-export").touch()
    for who in (0, 1, "n1", "n2"):
        (hold / f"hold-teardown-{who}").touch()
    signal_while_held("export", (0,))
    for held_by in ((0, 1), ("n1", "n2")):  # the ranks first: each node's qlaunch waits for its rank
        signal_in_teardown(hold, held_by)
    bursts, deadline = 0, time.monotonic() + 600
    while cluster.job(job)["JobState"] not in FINAL and time.monotonic() < deadline:
        cluster.run(["scancel", "--signal=USR2", "--batch", str(job)], check=False)
        bursts += 1
        time.sleep(0.1)
    assert bursts > 1
    info = cluster.wait_for(job, FINAL, 600)
    print(f"two-node job, four starts: {time.monotonic() - started:.1f} s")
    return job, out, info, log.read_text()


def signal_in_teardown(hold: Path, held_by: tuple) -> None:
    """Sends USR2 and TERM, three times each, to processes held in their last exit handler; each must ignore
    them there (its signal mask says so) and live on, then is let go."""
    wait_until(lambda: all((hold / f"held-teardown-{w}").exists() for w in held_by), 600, f"{held_by} in teardown")
    for who in held_by:
        pid = int((hold / f"held-teardown-{who}").read_text())
        ignored = int(re.search(r"^SigIgn:\s+([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)[1], 16)
        assert all(ignored >> (sig - 1) & 1 for sig in (signal.SIGUSR2, signal.SIGTERM)), (who, hex(ignored))
        for _ in range(3):
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                os.kill(pid, sig)
        time.sleep(0.5)
        state = re.search(r"^State:\s+(\S)", Path(f"/proc/{pid}/status").read_text(), re.M)[1]
        assert state != "Z", f"{who} was killed by a signal in teardown"
        (hold / f"hold-teardown-{who}").unlink()


def qlaunch_pid(job: int, node: str) -> int:
    """The pid of `qlaunch train` (the wrapper, not a rank) of `job` on `node` (every node is this host)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_text().split("\0")
        except OSError:
            continue
        if (
            environ.get("SLURM_JOB_ID") == str(job)
            and environ.get("SLURMD_NODENAME") == node
            and "LOCAL_RANK" not in environ
            and cmdline[1:4] == ["-m", "launcher", "train"]
        ):
            return int(proc.name)
    raise AssertionError(f"no qlaunch train of job {job} on {node}")


def starts(output: str) -> list[str]:
    """The job log, one part per start of the job."""
    return re.split(r"^qlaunch: job \d+ on \S+, start \d+$", output, flags=re.M)[1:]


def test_two_node_script_trains_on_both_nodes(preempted_job):
    job, out, info, output = preempted_job
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
    assert ranks_started(output) == {(0, "n1"), (1, "n2")}
    # Each node derived its own machine rank; both found the head's NodeAddr through scontrol.
    port = slurm.port_for_job(job)
    for rank, node in ((0, "n1"), (1, "n2")):
        assert (
            f"Slurm job {job}, node {node}: machine {rank} of 2, 1 rank(s) each, 2 in all; head n1 at 127.0.0.1:{port}"
            in output
        )
    assert_trained(out, output)


def test_a_signal_in_any_phase_ends_as_planned_and_the_job_completes(preempted_job, single_node_jobs):
    job, out, info, output = preempted_job
    assert info["Restarts"] == "3", output[-3000:]
    loading, mid_training, saving, exporting = starts(output)
    stopped_before = "qlaunch: Stopped before training on SIGUSR2: nothing new to checkpoint; exit status 85."
    assert loading.count(stopped_before) == 2  # one line per node
    # The signal reached n2 alone; n1 stopped after the same step because the ranks agreed.
    step = int(re.search(r"qlaunch: Stopped after step (\d+) on SIGUSR2: the checkpoint is complete", mid_training)[1])
    assert PREEMPT_AFTER <= step < STEPS
    assert f"qlaunch: Stopped after step {step} on a signal to another rank: the checkpoint is complete" in mid_training
    assert f"Resuming from step {step}: {out / 'checkpoints' / f'step-{step:06d}'}" in saving
    # The held save completed; the run stopped one step later with its own checkpoint.
    stopped = int(re.search(r"qlaunch: Stopped after step (\d+) on SIGUSR2: the checkpoint is complete", saving)[1])
    assert (stopped - 1) % EVERY == 0 and stopped > step
    assert f"Resuming from step {stopped}" in exporting
    assert f"Done: {STEPS} steps" in exporting
    for part in (loading, mid_training, saving):
        assert f"requeueing job {job}" in part
    # A planned stop reads as one: no Python traceback, no torchrun failure report.
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    # Every step logged once, and each loss the one the uninterrupted single-node runs logged.
    reference = {r["step"]: r["loss"] for r in read_metrics(next(iter(single_node_jobs[0].values()))[0])}
    resumed = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-4), (step, resumed[step], reference[step])


def test_a_cancelled_job_checkpoints_and_is_not_requeued(cluster, demo_assets, tmp_path):
    """`scancel` sends SIGTERM to every process of the job: one rank (in qlaunch's own process) checkpoints, stays stopped."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.submit(
        SCRIPTS / "single_node.sbatch",
        train_args(demo_assets, out),
        ["--gpus-per-node=1", f"--output={log}"],
        JOB_ENV,
        tmp_path,
    )
    wait_until(
        lambda: len(read_metrics(out)) >= PREEMPT_AFTER or cluster.job(job)["JobState"] in FINAL,
        600,
        "training to start",
    )
    cluster.run(["scancel", str(job)])
    info = cluster.wait_for(job, FINAL, 120)
    output = log.read_text()
    # Every process gets SIGTERM from Slurm, and the ranks SIGUSR2 from the script's trap: either may be the last seen.
    stopped = int(re.search(r"Stopped after step (\d+) on SIG(?:TERM|USR2): the checkpoint is complete", output)[1])
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), output[-3000:]
    assert f"job {job} was cancelled, so it is not requeued" in output
    assert f"rank 0/1 on {info['NodeList']}" in output  # one rank: run in qlaunch's own process, no accelerate launch
    assert (out / "checkpoints" / f"step-{stopped:06d}" / "meta.json").is_file()


def free_job_port() -> tuple[int, int]:
    for job in range(900000, 901000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm.port_for_job(job)))
                return job, slurm.port_for_job(job)
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.mark.parametrize("case", ["a node never joins", "head unreachable", "port taken"])
def test_rendezvous_failures_end_with_a_clear_message_in_time(case, cluster, demo_assets, tmp_path):
    """One node of a two-node job alone, in the task environment srun gives it; the head's address comes from scontrol."""
    timeout = 5
    job, port = free_job_port()
    rank = 1 if case == "head unreachable" else 0
    env = dict(
        cluster.env,
        **CPU_ENV,
        PYTHONPATH=str(REPO),
        SLURM_JOB_ID=str(job),
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_NNODES="2",
        SLURM_STEP_ID="0",
        SLURM_STEP_NODELIST="n[1-2]",
        SLURM_STEP_NUM_NODES="2",
        SLURM_STEP_NUM_TASKS="2",
        SLURM_NODEID=str(rank),
        SLURMD_NODENAME=f"n{rank + 1}",
    )
    cmd = [
        python(),
        "-m",
        "launcher",
        "train",
        "--config",
        str(demo_assets / "run.yaml"),
        "--output_dir",
        str(tmp_path / "out"),
        "--dist.rendezvous_timeout_s",
        str(timeout),
    ]
    with socket.socket() as taken:
        if case == "port taken":
            taken.bind(("127.0.0.1", port))
            taken.listen()
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert (
        f"no rank started on Slurm job {job}, node n{rank + 1}: the 2 machines did not meet at the head n1 "
        f"(127.0.0.1:{port}) within dist.rendezvous_timeout_s={timeout}"
    ) in output, output[-3000:]
    assert "Traceback (most recent call last)" not in output, output[-3000:]  # one line per failure, no traceback
    if case == "port taken":
        assert f"port `{port}`, but another process is utilizing it" in output
    else:
        assert elapsed >= timeout  # it waited the configured time, no less...
    assert elapsed < timeout + 40, elapsed  # ...and not the default 600 s (start-up and imports take the rest)
    print(f"{case}: failed after {elapsed:.1f} s")


def test_a_job_whose_start_up_outlasts_the_warning_stops_requeueing(cluster, demo_assets, tmp_path):
    """Every start is held in loading and gets the warning signal there (as when loading a large base outlasts
    `--signal=B:USR2@N`): the first two starts stop before training and requeue, the third ends the job with
    the reason instead of starting forever."""
    out, log, hold = tmp_path / "run", tmp_path / "job.out", tmp_path / "hold"
    hold.mkdir()
    env = dict(JOB_ENV, PYTHONPATH=f"{REPO}{os.pathsep}{HOLD_HOOK}", QLAUNCH_HOLD_DIR=str(hold))
    (hold / "hold-load").touch()
    options = ["--gpus-per-node=1", f"--output={log}"]
    job = cluster.submit(SCRIPTS / "single_node.sbatch", train_args(demo_assets, out), options, env, tmp_path)
    for start in (1, 2, 3):
        wait_until(lambda: any(hold.glob("held-load-*")), 600, f"start {start} held in loading")
        cluster.signal_batch(job, "USR2")
        wait_until(lambda: any(hold.glob("signalled-load-*")), 60, f"the signal in start {start}")
        for marker in [*hold.glob("held-load-*"), *hold.glob("signalled-load-*")]:
            marker.unlink()
        (hold / "hold-load").unlink()
        if start < 3:
            wait_until(lambda n=start: log.read_text().count(f"requeueing job {job}") == n, 600, f"requeue {start}")
            (hold / "hold-load").touch()
    info = cluster.wait_for(job, FINAL, 600)
    output = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "2"), output[-3000:]
    assert output.count("Stopped before training on SIGUSR2: nothing new to checkpoint") == 3
    assert "qlaunch: error: 3 starts in a row were stopped before their first step: the stop signal came" in output
    assert "Traceback" not in output and not (out / "metrics.jsonl").exists()


def test_a_zero_job_requeued_onto_fewer_nodes_resumes_on_fewer_ranks(cluster, demo_assets, tmp_path):
    """A ZeRO-2 job that may run on 1 or 2 nodes (`--nodes=1-2`, 1 rank each) starts on both; one node is
    drained and the job warned: it checkpoints, requeues and starts again on the node left. That rank converts
    the 2 ranks' DeepSpeed checkpoint to the universal form, keeps the global batch (train.global_batch_size:
    now 2 micro batches per step) and continues the losses of one uninterrupted process."""
    out, log, reference = tmp_path / "run", tmp_path / "job.out", tmp_path / "reference"
    zero = ["--strategy", "zero2", "--lora.dropout", "0", "--train.global_batch_size", "8"]  # dropout: rank-drawn
    config, *overrides = train_args(demo_assets, reference)
    qlaunch(reference.with_suffix(".log"), "train", "--nproc", "1", "--config", config, *overrides, *zero)
    args = [*train_args(demo_assets, out), *zero, "--checkpoint.every_steps", str(EVERY)]
    options = ["--nodes=1-2", "--gpus-per-node=1", f"--output={log}"]
    job = cluster.submit(SCRIPTS / "multi_node.sbatch", args, options, JOB_ENV, tmp_path)
    try:
        wait_until(lambda: len(read_metrics(out)) >= PREEMPT_AFTER, 600, "training on two nodes")
        cluster.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=lost"])
        cluster.signal_batch(job, "USR2")
        info = cluster.wait_for(job, FINAL, 600)
    finally:
        cluster.run(["scontrol", "update", "nodename=n2", "state=resume"], check=False)
    output = log.read_text()
    assert (info["JobState"], info["Restarts"], info["NodeList"]) == ("COMPLETED", "1", "n1"), output[-3000:]
    on_two, on_one = starts(output)
    assert set(re.findall(r"^rank (\d+/\d+) on (\S+) ", on_two, re.M)) == {("0/2", "n1"), ("1/2", "n2")}
    assert set(re.findall(r"^rank (\d+/\d+) on (\S+) ", on_one, re.M)) == {("0/1", "n1")}
    step = int(re.search(r"Stopped after step (\d+) on SIGUSR2: the checkpoint is complete", on_two)[1])
    assert f"qlaunch: converting step-{step:06d} to DeepSpeed's universal checkpoint" in on_one
    assert f"Resuming from step {step}: {out / 'checkpoints' / f'step-{step:06d}'}" in on_one
    assert f"Done: {STEPS} steps" in on_one and "Traceback" not in output, output[-3000:]
    expected = {r["step"]: r["loss"] for r in read_metrics(reference)}
    resumed = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for n, loss in resumed.items():  # tests/integration/test_resume_world_size.py says why 1e-4
        assert loss == pytest.approx(expected[n], abs=1e-4), (n, loss, expected[n])
