"""`qlaunch train` outside a launcher: start `accelerate launch` with the shipped config for the strategy.

On one machine the run gets a free port; inside a Slurm allocation `slurm.py` derives the machines
(how many, which one this is, the head's address, a port) and every node starts its own
`accelerate launch` with the multi-node config. This process stays in front of the ranks: it passes
SIGUSR2 and SIGTERM on to them and exits with `dist.preempt_exit_code` when they stopped for a
preemption with a complete checkpoint (see supervise.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import signals
from ..config import DistConfig
from ..resources import shipped_dir
from ..run import failures
from ..run.preemption import stop_message
from ..strategies import Strategy
from . import slurm, starts
from .machines import Machines, default_nproc
from .supervise import Ranks


def machines_for(nproc: int | None) -> Machines:
    """The run's machines: from the Slurm allocation inside one, else this machine alone."""
    if slurm.in_allocation(os.environ):
        return slurm.machines(os.environ, nproc)
    return Machines.local(nproc or default_nproc())


ENTRY = ("-m", "launcher", "train")

# torchrun (inside accelerate launch) leaves SIGTERM to the ranks: by default it answers SIGTERM by killing
# them, before they can checkpoint.
TORCHRUN_ENV = {"PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}


def accelerate_command(
    strategy: Strategy, machines: Machines, train_args: list[str], dist: DistConfig, entry=ENTRY
) -> list[str]:
    configs = shipped_dir("accelerate_configs")
    config = (configs / "multinode" if machines.num_machines > 1 else configs) / strategy.spec.accelerate_config
    cmd = [
        sys.executable,
        "-m",
        "launcher.accelerate_entry",
        "--config_file",
        str(config),
        "--num_processes",
        str(machines.num_processes),
        "--num_machines",
        str(machines.num_machines),
        "--machine_rank",
        str(machines.machine_rank),
        "--main_process_ip",
        machines.head_address,
        "--main_process_port",
        str(machines.port),
        "--rdzv_conf",
        f"timeout={dist.rendezvous_timeout_s}",
    ]
    if strategy.spec.deepspeed_config:
        cmd += ["--deepspeed_config_file", str(shipped_dir("ds_configs") / strategy.spec.deepspeed_config)]
    return cmd + [*entry, *train_args]


def launch(
    strategy: Strategy,
    machines: Machines,
    train_args: list[str],
    dist: DistConfig,
    entry=ENTRY,
    output_dir: str | None = None,
) -> int:
    """Runs this machine's `accelerate launch`; returns its exit status (dist.preempt_exit_code after a preemption
    stop; starts.NO_PROGRESS_EXIT after the third start in a row in `output_dir` stopped before its first step)."""
    cmd = accelerate_command(strategy, machines, train_args, dist, entry)
    print(f"qlaunch: {machines.describe()}", flush=True)

    def stopped(step: int | None, signal_name: str | None) -> int:
        print(f"qlaunch: {stop_message(step, signal_name, dist.preempt_exit_code)}", flush=True)
        return starts.status_after_stop(output_dir, machines.machine_rank, step is not None, dist.preempt_exit_code)

    if signals.received() is not None and machines.num_machines == 1:
        # Nothing started yet and no other machine waits for this one: stop now. (With several machines
        # every node starts, and the ranks agree to stop before training: no node waits for a missing peer.)
        return stopped(None, signals.received_name())
    with tempfile.TemporaryDirectory(prefix="qlaunch-") as status_dir, Ranks(Path(status_dir)) as ranks:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **TORCHRUN_ENV, **ranks.env)
        code = ranks.watch(subprocess.Popen(cmd, env=env, preexec_fn=Ranks.ignore_in_child))
        preempted = ranks.preempted()
        if preempted is not None:
            return stopped(preempted["step"], preempted["signal"])
        starts.progressed(output_dir, machines.machine_rank)
        if code != 0:
            for line in failures.summary(failures.read_reports(Path(status_dir)), ranks.first_failed):
                print(line, file=sys.stderr, flush=True)
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
