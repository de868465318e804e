"""A real two-node Slurm cluster on this host, for the tests (the recipe in docs/local-slurm.md).

    python3 tests/support/slurm_cluster.py install    # apt-get Debian's slurmctld, slurmd, slurm-client, munge if missing

`SlurmCluster.start()` writes its own munge key and slurm.conf under a new temporary folder, starts
munged, slurmctld and two slurmd (nodes n1 and n2 on this host: one CPU each, and two placeholder
GPUs each, so that the scripts' `--gpus-per-node` requests are real allocations; the ranks run on
CPU), and waits until both nodes are idle. `stop()` cancels its jobs and stops exactly the daemons it
started, by their pid files. Standard library only: .ci/run calls it before the venv exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo"]
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
NODES = ("n1", "n2")


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def install() -> None:
    """Installs the Debian packages if a program is missing; `apt-get update` only if the install fails without it."""
    if all(which(name) for name in DAEMONS + CLIENTS):
        return
    if os.geteuid() != 0 or not which("apt-get"):
        raise RuntimeError(f"Slurm is not installed and this is not root with apt-get: install {' '.join(PACKAGES)}.")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if subprocess.run(command, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(command, env=env, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)
        self.pid_files: list[Path] = []

    @classmethod
    def start(cls) -> SlurmCluster:
        missing = [name for name in DAEMONS + CLIENTS if not which(name)]
        if missing:
            raise RuntimeError(
                f"Slurm programs not found: {', '.join(missing)} (python3 tests/support/slurm_cluster.py install)"
            )
        root = Path(tempfile.mkdtemp(prefix="qlaunch-slurm-"))
        root.chmod(0o755)
        cluster = cls(root)
        for folder in ("state", "spool", "log", "run", "dev"):
            (root / folder).mkdir()
        try:
            cluster._start_munge()
            cluster._write_config()
            cluster._daemon(["slurmctld", "-f", str(cluster.conf)], root / "run" / "slurmctld.pid")
            for node in NODES:
                cluster._daemon(["slurmd", "-f", str(cluster.conf), "-N", node], root / "run" / f"slurmd-{node}.pid")
            wait_until(cluster._nodes_idle, 60, "both nodes to be idle in sinfo")
        except Exception as error:
            logs = cluster.log_tails()
            cluster.stop()
            raise RuntimeError(f"{error}\n{logs}") from error
        return cluster

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o711)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = munge / "munge.socket"
        self._daemon(
            [
                "munged",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={munge / 'munged.log'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            munge / "munged.pid",
        )
        wait_until(self.munge_socket.exists, 20, "the munge socket")

    def _write_config(self) -> None:
        for i in range(2):
            (self.root / "dev" / f"gpu{i}").touch()  # placeholder GPU "devices": Slurm counts them, nothing opens them
        host = socket.gethostname()
        r = self.root
        nodes = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs=1 RealMemory=10000 Gres=gpu:2"
            for node in NODES
        )
        self.conf.write_text(f"""\
ClusterName=qlaunchtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s by default).
AuthInfo=socket={self.munge_socket},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SchedulerParameters=sched_interval=1
KillWait=10
GresTypes=gpu
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "gres.conf").write_text(f"NodeName=n[1-2] Name=gpu File={r}/dev/gpu[0-1]\n")

    def _daemon(self, command: list[str], pid_file: Path) -> None:
        self.pid_files.append(pid_file)  # before starting: stop() must find it even if the start fails half-way
        output = self.root / "log" / f"{pid_file.stem}.out"
        with output.open("w") as out:  # a file, not a pipe: the daemon's children may keep it open
            code = subprocess.run(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=60).returncode
        if code != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed ({code}): {output.read_text().strip()}")
        wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip(), 20, f"{pid_file.name}")

    def _nodes_idle(self) -> bool:
        shown = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
        return dict(zip(shown[::2], shown[1::2], strict=False)) == {node: "idle" for node in NODES}

    def run(
        self, command: list[str], check: bool = True, env: dict | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            command, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, **kwargs
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def submit(self, script: Path, args: list[str], options: list[str], env: dict, cwd: Path) -> int:
        """`sbatch OPTIONS SCRIPT ARGS` from `cwd`, with `env` added to this process's environment (sbatch passes it on)."""
        return int(
            self.run(["sbatch", "--parsable", *options, str(script), *args], env=env, cwd=cwd)
            .stdout.strip()
            .split(";")[0]
        )

    def job(self, job_id: int) -> dict[str, str]:
        shown = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", shown))

    def signal_batch(self, job_id: int, name: str) -> None:
        self.run(["scancel", f"--signal={name}", "--batch", str(job_id)])

    def wait_for(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        return wait_until(
            lambda: (info := self.job(job_id))["JobState"] in states and info,
            timeout,
            f"job {job_id} to reach {states}",
            0.5,
        )

    def log_tails(self, chars: int = 3000) -> str:
        logs = sorted(self.root.glob("log/*.log")) + sorted(self.root.glob("munge/*.log"))
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in logs)

    def stop(self) -> None:
        """Cancels this cluster's jobs, then stops the daemons it started (by their pid files) and removes its folder."""
        if (self.root / "run" / "slurmctld.pid").is_file():
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                with contextlib.suppress(TimeoutError):
                    wait_until(
                        lambda: not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip(),
                        30,
                        "jobs to end",
                    )
        for pid_file in reversed(self.pid_files):
            _stop_pid(pid_file)
        shutil.rmtree(self.root, ignore_errors=True)


def _stop_pid(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        try:
            wait_until(lambda: not _alive(pid), wait, f"pid {pid} to exit")
            return
        except TimeoutError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon started by this process but not reaped would linger as a zombie; count that as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit(__doc__)
    install()
