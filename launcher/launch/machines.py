"""The process layout of a run: how many machines, which one this is, the head's address, ranks per machine."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from ..config import ConfigError


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
