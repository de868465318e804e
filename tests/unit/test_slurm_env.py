"""From a Slurm allocation to `accelerate launch` arguments (launcher/slurm.py), without a cluster.

The environments are what Slurm 22.05 gives an srun task and a batch shell (see test_slurm.py for
the real ones); partial or inconsistent ones must be refused with what to change.
"""

import subprocess

import pytest

from launcher import cli, launch, strategies
from launcher.config import DistConfig
from launcher.launch import slurm
from launcher.launch.slurm import SlurmError
from support.launches import REPO


@pytest.mark.parametrize(
    "nodelist,nodes",
    [
        ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
        ("a,b", ["a", "b"]),
        ("node-[1,3-5]", ["node-1", "node-3", "node-4", "node-5"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("r[1-2]n[1-2],login", ["r1n1", "r1n2", "r2n1", "r2n2", "login"]),
        ("single", ["single"]),
        ("gpu[1-2],cpu[007,009]", ["gpu1", "gpu2", "cpu007", "cpu009"]),
    ],
)
def test_node_lists_expand_in_order(nodelist, nodes):
    assert slurm.expand_nodelist(nodelist) == nodes


@pytest.mark.parametrize(
    "nodelist", ["gpu[01-04", "gpu01-04]", "gpu[4-1]", "gpu[a-b]", "a,,b", "gpu[1-2]]", "gpu[[1]]", ""]
)
def test_bad_node_lists_are_refused(nodelist):
    with pytest.raises(SlurmError, match=r"Node list"):
        slurm.expand_nodelist(nodelist)


def task_env(node_id: int, **changes) -> dict:
    """An srun task's environment in a 2-node job, one task per node, 4 GPUs per node (as Slurm sets it)."""
    env = {
        "SLURM_JOB_ID": "4711",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_NODEID": str(node_id),
        "SLURM_PROCID": str(node_id),
        "SLURMD_NODENAME": f"gpu0{7 + node_id}",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_GPUS_PER_NODE": "a100:4",
    }
    env.update(changes)
    return {k: v for k, v in env.items() if v is not None}


def addresses(node: str) -> str:
    return {"gpu07": "10.0.0.7", "gpu08": "10.0.0.8"}[node]


def test_each_task_gets_its_own_machine_rank_and_the_same_head_and_port():
    asked = []
    first = slurm.machines(task_env(0), address_of=lambda n: asked.append(n) or addresses(n))
    second = slurm.machines(task_env(1), address_of=addresses)
    assert (first.machine_rank, second.machine_rank) == (0, 1)
    for m in (first, second):
        assert (m.num_machines, m.procs_per_machine, m.num_processes) == (2, 4, 8)
        assert (m.head_node, m.head_address, m.port) == ("gpu07", "10.0.0.7", slurm.port_for_job(4711))
    assert asked == ["gpu07"]  # the head's NodeAddr, looked up, never a hard-coded address


def test_the_arguments_reach_torchrun_as_one_multi_node_rendezvous(monkeypatch):
    """The command qlaunch builds, through Accelerate's own argument handling, to torchrun's arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    machines = slurm.machines(task_env(1), address_of=addresses)
    cmd = launch.accelerate_command(
        strategies.get("fsdp2"), machines, ["--config", "run.yaml"], DistConfig(rendezvous_timeout_s=42)
    )
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "accelerate_configs" / "multinode" / "fsdp2.yaml")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("accelerate.utils.launch.is_port_in_use", lambda port: False)
    args = launch_command_parser().parse_args(cmd[3:])
    args, _, _ = _validate_launch_command(args)
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    assert args.rdzv_endpoint == f"10.0.0.7:{slurm.port_for_job(4711)}"
    assert (args.rdzv_backend, args.rdzv_conf) == ("static", "timeout=42")
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "launcher",
        ["train", "--config", "run.yaml"],
    )


def test_ports_follow_the_job_id_and_stay_below_the_ephemeral_range():
    ports = {slurm.port_for_job(job) for job in range(4000, 4100)}
    assert len(ports) == 100
    assert all(slurm.PORT_BASE <= p < slurm.PORT_BASE + slurm.PORT_SPAN < 32768 for p in ports)


def test_a_one_node_job_runs_from_the_batch_shell_too():
    env = {
        "SLURM_JOB_ID": "12",
        "SLURM_JOB_NODELIST": "gpu03",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_GPUS_ON_NODE": "2",
    }
    m = slurm.machines(env, address_of=lambda n: pytest.fail("no head address is needed on one node"))
    assert (m.num_machines, m.machine_rank, m.num_processes, m.port) == (1, 0, 2, slurm.port_for_job(12))


def test_nproc_is_per_node():
    assert slurm.machines(task_env(0), nproc=2, address_of=addresses).num_processes == 4


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"SLURM_STEP_ID": None}, r"batch script of a 2-node job.*srun --ntasks-per-node=1"),
        ({"SLURM_STEP_NUM_TASKS": "8"}, r"runs 8 tasks on 2 nodes.*srun --ntasks-per-node=1"),
        ({"SLURMD_NODENAME": "gpu08"}, r"SLURM_NODEID=0 names node gpu07, but this task runs on gpu08.*batch shell"),
        ({"SLURM_NODEID": None}, r"SLURM_NODEID is not set although SLURM_JOB_ID is"),
        ({"SLURM_NODEID": "one"}, r"SLURM_NODEID is `one`, not a number"),
        ({"SLURM_NODEID": "2", "SLURMD_NODENAME": None}, r"SLURM_NODEID=2, but the step has only 2 nodes"),
        ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, r"SLURM_JOB_NODELIST is not"),
        ({"SLURM_STEP_NUM_NODES": "3"}, r"SLURM_STEP_NUM_NODES=3 does not match the 2 nodes in `gpu\[07-08\]`"),
        ({"SLURM_STEP_NODELIST": "gpu[07-08"}, r"Node list `gpu\[07-08` has unbalanced brackets"),
        ({"SLURM_JOB_ID": "abc"}, r"SLURM_JOB_ID is `abc`, not a number"),
    ],
)
def test_bad_or_partial_environments_are_refused(changes, message):
    with pytest.raises(SlurmError, match=message):
        slurm.machines(task_env(0, **changes), address_of=addresses)


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"SLURM_GPUS_PER_NODE": None, "SLURM_GPUS": "5", "SLURM_GPUS_ON_NODE": None},
            r"5 GPUs over 2 nodes.*--gpus-per-node",
        ),
        (
            {"SLURM_GPUS_PER_NODE": None, "SLURM_GPUS": "8", "SLURM_GPUS_ON_NODE": "3"},
            r"8 GPUs over 2 nodes \(--gpus\); this node has 3",
        ),
        ({"SLURM_GPUS_ON_NODE": "2"}, r"This node has 2 GPUs but the job asked for 4 per node"),
        ({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": None}, r"no GPUs in the job.*--nproc"),
        ({"SLURM_GPUS_PER_NODE": "a100:x"}, r"SLURM_GPUS_PER_NODE is `a100:x`"),
    ],
)
def test_uneven_or_missing_gpus_are_refused(changes, message):
    with pytest.raises(SlurmError, match=message):
        slurm.machines(task_env(0, **changes), address_of=addresses)


def test_an_even_total_gpu_request_is_accepted():
    env = task_env(1, SLURM_GPUS_PER_NODE=None, SLURM_GPUS="a100:8")
    assert slurm.machines(env, address_of=addresses).procs_per_machine == 4


def test_without_scontrol_the_head_address_is_its_name(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.node_address("gpu07") == "gpu07"


def test_qlaunch_in_the_batch_shell_of_a_multi_node_job_refuses_before_launching(
    capsys, monkeypatch, demo_assets, no_launch
):
    for key, value in task_env(0, SLURM_STEP_ID=None).items():
        monkeypatch.setenv(key, value)
    code = cli.main(["train", "--config", str(demo_assets / "run.yaml")])
    assert code == 2
    assert "not in a job step" in capsys.readouterr().err


def test_the_two_scripts_differ_only_in_their_sbatch_header():
    scripts = [REPO / "slurm" / name for name in ("single_node.sbatch", "multi_node.sbatch")]
    bodies = []
    for script in scripts:
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        assert "#SBATCH --signal=B:USR2@" in text and "#SBATCH --requeue" in text
        bodies.append(text[text.index("# ---- Same in") :])
    assert bodies[0] == bodies[1]
