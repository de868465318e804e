"""Checkpoint files are read as data, never as code: resuming and exporting check every pickle first."""

import json
import pickle
import random
import warnings
from collections import OrderedDict
from contextlib import suppress

import numpy as np
import pytest
import torch

LORA_A = "base_model.model.q.lora_A.default.weight"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file if ever unpickled


class _NeverLoads:
    def load_trainable(self, *args):
        raise AssertionError("the trainable state was read before the checkpoint's pickles were checked")


REFUSED = r"holds objects no qlaunch checkpoint holds \(it names `[\w.]*open`\); it was not loaded, since unpickling"


def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path):
    from launcher.checkpoint import store
    from launcher.config import ConfigError

    step = tmp_path / "step-000002"
    (step / "rng").mkdir(parents=True)
    torch.save(store.rng_state(), step / "rng" / "rank-00000.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    marker = tmp_path / "ran"
    torch.save({"last_epoch": 2, "payload": _RunsCode(marker)}, step / "scheduler.pt")

    with pytest.raises(ConfigError, match=r"scheduler.pt` " + REFUSED):
        store.load(step, _NeverLoads(), None, None, None)
    assert not marker.exists()
    # What qlaunch writes loads: the RNG state (with its numpy array) restores the exact streams.
    store.restore_rng_state(store.load_plain(step / "rng" / "rank-00000.pt"))
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]


def write_dcp(directory, extra=None):
    """trainable/ as the DCP strategies write it: adapter, Adam state and param groups (the groups'
    values are the non-tensor items), plus `extra` as one more non-tensor item."""
    import torch.distributed.checkpoint as dcp

    weight = torch.randn(2, 4)
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "fused": None, "amsgrad": False, "params": [LORA_A]}]
    adam = {LORA_A: {"step": torch.tensor(2.0), "exp_avg": torch.randn(2, 4), "exp_avg_sq": torch.rand(2, 4)}}
    state = {"model": {LORA_A: weight}, "optimizer": {"state": adam, "param_groups": groups}}
    if extra is not None:
        state["extra"] = extra
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process, no group: intended
        dcp.save(state, checkpoint_id=str(directory))
    return weight


def write_deepspeed(directory, planted_in=None, payload=None):
    """trainable/zero/ with the globals DeepSpeed's ZeRO-2 files name; `payload` goes into the file
    whose name ends with `planted_in`."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    files = {
        "mp_rank_00_model_states.pt": {
            "module": OrderedDict({LORA_A: torch.randn(2, 4)}),
            "param_shapes": [OrderedDict({LORA_A: torch.Size([2, 4])})],
            "ds_config": {"zero_optimization": {"stage": 2}},
            "ds_version": "0.19.8",
        },
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": {
            "optimizer_state_dict": {
                "loss_scaler": LossScaler(1.0),
                "zero_stage": ZeroStageEnum.gradients,
                "single_partition_of_fp32_groups": [torch.randn(8)],
                "param_slice_mappings": [OrderedDict({LORA_A: fragment_address(numel=8, start=0)})],
            },
            "ds_version": "0.19.8",
        },
    }
    (directory / "zero").mkdir(parents=True)
    for name, content in files.items():
        if planted_in and name.endswith(planted_in):
            content["payload"] = payload
        torch.save(content, directory / "zero" / name)


def write_checkpoint(step, checkpoint_format: str):
    """A complete checkpoint directory except for trainable/, which the caller writes."""
    from peft import LoraConfig

    from launcher.checkpoint import store

    (step / "rng").mkdir(parents=True)
    torch.save(store.rng_state(), step / "rng" / "rank-00000.pt")
    torch.save({"last_epoch": 2}, step / "scheduler.pt")
    LoraConfig(target_modules=["q"]).save_pretrained(step)
    (step / "meta.json").write_text(json.dumps({"step": 2, "checkpoint_format": checkpoint_format}))


def plant_dcp_metadata(trainable, payload):
    write_dcp(trainable)
    (trainable / ".metadata").write_bytes(pickle.dumps(payload))


PLANTS = {
    # where the payload goes: (checkpoint format, writes trainable/ with it, the message names)
    "dcp-metadata": ("dcp", plant_dcp_metadata, r"trainable/\.metadata` "),
    "dcp-item": (
        "dcp",
        lambda trainable, payload: write_dcp(trainable, extra=payload),
        r"Item `extra` of `.*\.distcp` ",
    ),
    "deepspeed-optim": (
        "deepspeed",
        lambda trainable, payload: write_deepspeed(trainable, "optim_states.pt", payload),
        r"zero_pp_rank_0_mp_rank_00_optim_states\.pt` ",
    ),
    "deepspeed-model": (
        "deepspeed",
        lambda trainable, payload: write_deepspeed(trainable, "model_states.pt", payload),
        r"mp_rank_00_model_states\.pt` ",
    ),
}


def unchecked_load(trainable, checkpoint_format):
    """What the libraries did with these files before the check."""
    if checkpoint_format == "deepspeed":
        for path in (trainable / "zero").glob("*.pt"):
            torch.load(path, weights_only=False)  # as DeepSpeed's load_checkpoint and zero_to_fp32 do
    else:
        from torch.distributed.checkpoint import CheckpointException

        from launcher import strategies

        with suppress(CheckpointException, TypeError):  # DCP fails on the file the payload opened, after opening it
            strategies.get("fsdp2").read_trainable(trainable)


@pytest.mark.parametrize("plant", PLANTS)
def test_a_planted_pickle_in_the_trainable_state_is_refused_on_resume_and_export(tmp_path, plant):
    from launcher.checkpoint import export, store
    from launcher.config import ConfigError

    checkpoint_format, write_trainable, named = PLANTS[plant]
    step, marker = tmp_path / "step-000002", tmp_path / "ran"
    write_checkpoint(step, checkpoint_format)
    write_trainable(step / "trainable", _RunsCode(marker))

    with pytest.raises(ConfigError, match=named + REFUSED):
        store.load(step, _NeverLoads(), None, None, None)
    with pytest.raises(ConfigError, match=named + REFUSED):
        export.export_checkpoint(step, tmp_path / "exported")
    assert not marker.exists() and not (tmp_path / "exported").exists()

    unchecked_load(step / "trainable", checkpoint_format)
    assert marker.exists(), "negative control: the planted pickle runs when loaded unchecked"


def test_genuine_checkpoints_pass_and_a_dcp_one_exports(tmp_path):
    from safetensors.torch import load_file

    from launcher.checkpoint.export import export_checkpoint
    from launcher.safe_load import check_checkpoint_files

    dcp_step, deepspeed_step = tmp_path / "dcp" / "step-000002", tmp_path / "deepspeed" / "step-000002"
    write_checkpoint(dcp_step, "dcp")
    weight = write_dcp(dcp_step / "trainable")
    write_checkpoint(deepspeed_step, "deepspeed")
    write_deepspeed(deepspeed_step / "trainable")

    check_checkpoint_files(deepspeed_step)
    exported = export_checkpoint(dcp_step, tmp_path / "exported")  # checks, then reads with weights_only=True
    assert torch.equal(load_file(exported / "adapter_model.safetensors")["base_model.model.q.lora_A.weight"], weight)


def test_what_the_check_cannot_read_is_refused(tmp_path):
    """A legacy-format torch file (unpickled with no zip to check) and a DCP item stored through a
    transform (the bytes loaded are not the bytes checked) are refused, though qlaunch writes neither."""
    import dataclasses

    from launcher.config import ConfigError
    from launcher.safe_load import check_checkpoint_files

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"module": {}}, legacy / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ConfigError, match=r"model_states\.pt` holds .* \(not a torch\.save file"):
        check_checkpoint_files(legacy)

    transformed = tmp_path / "transformed"
    write_dcp(transformed)
    metadata = pickle.loads((transformed / ".metadata").read_bytes())
    metadata.storage_data = {
        index: dataclasses.replace(info, transform_descriptors=["zstd"])
        for index, info in metadata.storage_data.items()
    }
    (transformed / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(
        ConfigError, match=r"Item `optimizer\.param_groups\.0\..*` holds .* \(stored through transforms"
    ):
        check_checkpoint_files(transformed)
