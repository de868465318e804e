"""Launch: from `qlaunch train` to the ranks, on one machine or a Slurm allocation.

machines.py   the process layout of a run (machines, this one's rank, the head, ranks per machine)
slurm.py      that layout read from a Slurm allocation
command.py    the `accelerate launch` command with the shipped config for the strategy, and running it
supervise.py  what `qlaunch train` keeps of the ranks: signals passed on, a failed rank ends the run
"""

from .command import ENTRY, TORCHRUN_ENV, accelerate_command, launch, machines_for
from .machines import Machines, default_nproc, free_port, inside_launcher

__all__ = [
    "ENTRY",
    "TORCHRUN_ENV",
    "Machines",
    "accelerate_command",
    "default_nproc",
    "free_port",
    "inside_launcher",
    "launch",
    "machines_for",
]
