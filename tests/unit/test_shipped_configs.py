"""Every file in accelerate_configs/ and ds_configs/ is used by a test or validated here.

The single-node configs are launched for real by tests/integration/test_matrix.py. Here every config, the
multi-node ones too, goes through Accelerate's own `accelerate launch` argument handling, and the
environment it would give each rank must select the intended strategy in the launcher.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from launcher import strategies
from launcher.strategies import NAMES as STRATEGIES
from support.launches import REPO

ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").rglob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def launch_env(config: Path, extra: list[str]) -> dict[str, str]:
    """The environment `accelerate launch --config_file config` gives each rank."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "-m", "launcher"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_every_shipped_file_is_covered():
    single = {REPO / "accelerate_configs" / strategies.get(s).spec.accelerate_config for s in STRATEGIES}
    multi = {REPO / "accelerate_configs" / "multinode" / strategies.get(s).spec.accelerate_config for s in STRATEGIES}
    assert set(ACCELERATE_CONFIGS) == single | multi
    referenced = {
        REPO / yaml.safe_load(path.read_text())["deepspeed_config"]["deepspeed_config_file"]
        for path in ACCELERATE_CONFIGS
        if "deepspeed_config" in yaml.safe_load(path.read_text())
    }
    assert referenced == set(DS_CONFIGS) == {REPO / "ds_configs" / f"{s}.json" for s in ("zero2", "zero3")}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("multinode", [False, True], ids=["single-node", "multi-node"])
def test_config_selects_its_strategy(strategy, multinode, monkeypatch):
    folder = REPO / "accelerate_configs" / ("multinode" if multinode else "")
    extra = (
        ["--num_processes", "4", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.1.2.3"]
        if multinode
        else []
    )
    monkeypatch.chdir(REPO)
    env = launch_env(folder / strategies.get(strategy).spec.accelerate_config, extra)
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "4" if multinode else "2")  # set by torchrun for each rank
    assert strategies.from_accelerate_env() == strategy


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_configs_take_batch_settings_from_the_run_config(path):
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == int(path.stem[-1])
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
