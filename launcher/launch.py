"""`qlaunch train` outside a launcher: start `accelerate launch` with the shipped config for the strategy.

On one machine the run gets a free port; inside a Slurm allocation `slurm.py` derives the machines
(how many, which one this is, the head's address, a port) and every node starts its own
`accelerate launch` with the multi-node config. This process stays in front of the ranks: it passes
SIGUSR2 and SIGTERM on to them and exits with `dist.preempt_exit_code` when they stopped for a
preemption with a complete checkpoint (see preemption.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, DistConfig
from .strategies import Strategy

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALLED_SHARE = Path(sys.prefix) / "share" / "qlora-launcher"


def shipped_dir(name: str) -> Path:
    """`accelerate_configs` or `ds_configs`, from the checkout or from an installed wheel."""
    for root in (REPO_ROOT, INSTALLED_SHARE):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"Cannot find the shipped `{name}/` folder (looked in {REPO_ROOT} and {INSTALLED_SHARE}).")


def inside_launcher() -> bool:
    """True in a process started by accelerate launch / torchrun (one rank of a run)."""
    return "LOCAL_RANK" in os.environ


def default_nproc() -> int:
    return max(1, torch.cuda.device_count())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Machines:
    """The process layout of a run, as this machine's `accelerate launch` needs it."""

    num_machines: int
    machine_rank: int
    head_address: str
    port: int
    procs_per_machine: int
    head_node: str = ""
    where: str = "this machine"

    @property
    def num_processes(self) -> int:
        return self.num_machines * self.procs_per_machine

    @classmethod
    def local(cls, nproc: int) -> Machines:
        if nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {nproc}.")
        return cls(1, 0, "127.0.0.1", free_port(), nproc)

    def describe(self) -> str:
        if self.num_machines == 1:
            return f"{self.where}: {self.procs_per_machine} rank(s), port {self.port}"
        return (
            f"{self.where}: machine {self.machine_rank} of {self.num_machines}, {self.procs_per_machine} rank(s) each, "
            f"{self.num_processes} in all; head {self.head_node} at {self.head_address}:{self.port}"
        )


def plan(nproc: int | None) -> Machines:
    """The run's machines: from the Slurm allocation inside one, else this machine alone."""
    from . import slurm

    if slurm.in_allocation(os.environ):
        return slurm.machines(os.environ, nproc)
    return Machines.local(nproc or default_nproc())


ENTRY = ("-m", "launcher", "train")

# torchrun (inside accelerate launch) leaves SIGTERM to the ranks: by default it answers SIGTERM by killing
# them, before they can checkpoint.
TORCHRUN_ENV = {"PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}


def accelerate_command(strategy: Strategy, machines: Machines, train_args: list[str], dist: DistConfig, entry=ENTRY) -> list[str]:
    configs = shipped_dir("accelerate_configs")
    config = (configs / "multinode" if machines.num_machines > 1 else configs) / strategy.accelerate_config
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config),
        "--num_processes", str(machines.num_processes),
        "--num_machines", str(machines.num_machines),
        "--machine_rank", str(machines.machine_rank),
        "--main_process_ip", machines.head_address,
        "--main_process_port", str(machines.port),
        "--rdzv_conf", f"timeout={dist.rendezvous_timeout_s}",
    ]
    if strategy.name.startswith("zero"):
        cmd += ["--deepspeed_config_file", str(shipped_dir("ds_configs") / f"{strategy.name}.json")]
    return cmd + [*entry, *train_args]


def launch(strategy: Strategy, machines: Machines, train_args: list[str], dist: DistConfig, entry=ENTRY) -> int:
    """Runs this machine's `accelerate launch`; returns its exit status (dist.preempt_exit_code after a preemption stop)."""
    from .preemption import Ranks

    cmd = accelerate_command(strategy, machines, train_args, dist, entry)
    print(f"qlaunch: {machines.describe()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qlaunch-") as status_dir, Ranks(Path(status_dir)) as ranks:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **TORCHRUN_ENV, **ranks.env)
        code = ranks.watch(subprocess.Popen(cmd, env=env, preexec_fn=Ranks.ignore_in_child))
        stopped_at = ranks.preempted_at()
        if stopped_at is not None:
            print(
                f"qlaunch: the run stopped at step {stopped_at} for a preemption, with a complete checkpoint; "
                f"exit status {dist.preempt_exit_code} (`--resume auto` continues)",
                flush=True,
            )
            return dist.preempt_exit_code
        if code != 0 and not ranks.started() and machines.num_machines > 1:
            print(
                f"qlaunch: no rank started on {machines.where}: the {machines.num_machines} machines did not meet at "
                f"the head {machines.head_node} ({machines.head_address}:{machines.port}) within "
                f"dist.rendezvous_timeout_s={dist.rendezvous_timeout_s}. Check that every node started, that the head "
                "is reachable from this node, and that the port is free (see the messages above).",
                file=sys.stderr,
                flush=True,
            )
        return code
