"""What `qlaunch train` needs from a Slurm allocation, read from the environment of one srun task.

`machines(env, nproc)` gives this node's part of the run: how many nodes, this node's rank (its
own task's SLURM_NODEID, never a value expanded once in the batch shell), the head node's address
(its NodeAddr from `scontrol show node`, which works where node names do not resolve), a port
derived from the job id (so two jobs on one node do not collide) and the processes per node (its
GPUs, or --nproc). Anything missing or inconsistent is refused with what to change.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping

from ..config import ConfigError
from .machines import Machines, default_nproc

PORT_BASE = 20000
PORT_SPAN = 10000
"""Ports PORT_BASE .. PORT_BASE + PORT_SPAN - 1: below Linux's ephemeral range (32768 and up)."""


class SlurmError(ConfigError):
    """The Slurm environment cannot describe a run; the message says what to change."""


def in_allocation(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, in order: `gpu[01-04]`, `a,b`, `node-[1,3-5]`, `r[1-2]n[1-2]`."""
    names = []
    for item in _split_top_level(nodelist.strip(), nodelist):
        names += _expand_item(item, nodelist)
    return names


def _split_top_level(text: str, whole: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise SlurmError(f"Node list `{whole}` has unbalanced brackets.")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"Node list `{whole}` has unbalanced brackets.")
    items.append(text[start:])
    if any(not item for item in items):
        raise SlurmError(f"Node list `{whole}` has an empty entry.")
    return items


def _expand_item(item: str, whole: str) -> list[str]:
    match = re.match(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if not match:
        if "]" in item:
            raise SlurmError(f"Node list `{whole}` has unbalanced brackets.")
        return [item]
    prefix, ranges, rest = match.groups()
    numbers = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not bounds or (bounds[2] is not None and int(bounds[2]) < int(bounds[1])):
            raise SlurmError(f"Node list `{whole}`: `[{ranges}]` is not a list of numbers and ranges like `1,3-5`.")
        low, high = bounds[1], bounds[2] or bounds[1]
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return [f"{prefix}{n}{tail}" for n in numbers for tail in _expand_item(rest, whole)]


def port_for_job(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


def node_address(node: str) -> str:
    """The node's NodeAddr from `scontrol show node` (its name if scontrol cannot say)."""
    try:
        shown = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", shown.stdout)
    return found[1] if shown.returncode == 0 and found else node


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise SlurmError(
                f"{name} is not set although SLURM_JOB_ID is: this is not a complete Slurm task environment. "
                "Start `qlaunch train` through srun inside the job (see slurm/), or unset SLURM_JOB_ID to run locally."
            )
        return default
    if not value.isdigit():
        raise SlurmError(f"{name} is `{value}`, not a number. Is this a Slurm job's environment?")
    return int(value)


def _gpu_count(value: str, name: str) -> int:
    """`4`, `a100:4` or `a100:2,v100:2` (Slurm's GPU request syntax) -> 4."""
    try:
        return sum(int(part.rsplit(":", 1)[-1]) for part in value.split(","))
    except ValueError:
        raise SlurmError(f"{name} is `{value}`; expected a GPU count like `4` or `a100:4`.") from None


def procs_per_node(env: Mapping[str, str], nproc: int | None, num_nodes: int) -> int:
    """Processes this node starts: --nproc, else its GPUs. Uneven GPU counts across nodes are refused."""
    on_node = _int(env, "SLURM_GPUS_ON_NODE", default=-1)
    if env.get("SLURM_GPUS_PER_NODE") and on_node >= 0:
        wanted = _gpu_count(env["SLURM_GPUS_PER_NODE"], "SLURM_GPUS_PER_NODE")
        if wanted != on_node:
            raise SlurmError(
                f"This node has {on_node} GPUs but the job asked for {wanted} per node (SLURM_GPUS_PER_NODE)."
            )
    if env.get("SLURM_GPUS") and num_nodes > 1:
        total = _gpu_count(env["SLURM_GPUS"], "SLURM_GPUS")
        if total % num_nodes or (on_node >= 0 and on_node != total // num_nodes):
            here = f"; this node has {on_node}" if on_node >= 0 else ""
            raise SlurmError(
                f"The job has {total} GPUs over {num_nodes} nodes (--gpus){here}: every node must run the same number of "
                "ranks. Ask for --gpus-per-node=N instead of --gpus."
            )
    if nproc is not None:
        if nproc < 1:
            raise SlurmError(f"--nproc (processes per node) must be at least 1, got {nproc}.")
        return nproc
    if on_node == 0:
        raise SlurmError(
            "This node has no GPUs in the job (SLURM_GPUS_ON_NODE=0). Ask for --gpus-per-node, or pass --nproc."
        )
    return on_node if on_node > 0 else default_nproc()


def machines(
    env: Mapping[str, str], nproc: int | None = None, address_of: Callable[[str], str] = node_address
) -> Machines:
    """This node's part of the run, from the environment of its srun task (or the batch shell of a one-node job)."""
    job_id = _int(env, "SLURM_JOB_ID")
    in_step = "SLURM_STEP_ID" in env
    nodelist = env.get("SLURM_STEP_NODELIST" if in_step else "SLURM_JOB_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise SlurmError(
            "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: this is not a complete Slurm job environment. "
            "Run inside sbatch/salloc, or unset SLURM_JOB_ID to run locally."
        )
    nodes = expand_nodelist(nodelist)
    count_name = "SLURM_STEP_NUM_NODES" if in_step and "SLURM_STEP_NUM_NODES" in env else "SLURM_NNODES"
    if _int(env, count_name, default=len(nodes)) != len(nodes):
        raise SlurmError(f"{count_name}={env[count_name]} does not match the {len(nodes)} nodes in `{nodelist}`.")
    if len(nodes) > 1:
        if not in_step:
            raise SlurmError(
                f"`qlaunch train` is running in the batch script of a {len(nodes)}-node job, not in a job step, so only "
                "one node would start. Start it once per node: `srun --ntasks-per-node=1 qlaunch train ...` "
                "(as slurm/multi_node.sbatch does)."
            )
        tasks = _int(env, "SLURM_STEP_NUM_TASKS", default=len(nodes))
        if tasks != len(nodes):
            raise SlurmError(
                f"This job step runs {tasks} tasks on {len(nodes)} nodes. qlaunch starts one `accelerate launch` per node, "
                "which starts a rank per GPU: run it with `srun --ntasks-per-node=1`."
            )
    rank = _int(env, "SLURM_NODEID", default=0 if len(nodes) == 1 else None)
    if rank >= len(nodes):
        raise SlurmError(f"SLURM_NODEID={rank}, but the step has only {len(nodes)} nodes ({nodelist}).")
    here = env.get("SLURMD_NODENAME")
    if here and here != nodes[rank]:
        raise SlurmError(
            f"SLURM_NODEID={rank} names node {nodes[rank]}, but this task runs on {here}. Rank variables must be read "
            "by each task itself; one expanded in the batch shell (e.g. inside double quotes) gives every node its value."
        )
    head = nodes[0]
    return Machines(
        num_machines=len(nodes),
        machine_rank=rank,
        head_address=address_of(head) if len(nodes) > 1 else "127.0.0.1",
        port=port_for_job(job_id),
        procs_per_machine=procs_per_node(env, nproc, len(nodes)),
        head_node=head,
        where=f"Slurm job {job_id}, node {nodes[rank]}",
    )
