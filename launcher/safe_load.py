"""Checkpoint files are read as data, never as code.

A checkpoint directory someone hands over may hold a pickle that runs whatever it names when it is
unpickled, and three loaders unpickle what a checkpoint holds:
  * `load_plain` (scheduler.pt, rng/*.pt): torch's weights_only loader, so it refuses code itself;
  * torch.distributed.checkpoint (`trainable/.metadata` is a plain pickle; the non-tensor items in
    its `.distcp` files are torch.save blobs that its default load planner reads with
    weights_only=False; tensor items it reads with weights_only=True);
  * DeepSpeed (`trainable/zero/*.pt`, read with weights_only=False on resume and on export).
`check_checkpoint_files` reads the pickle part of every one of those files without running it and
refuses the checkpoint when one names a global outside the allow-lists below; resuming and exporting
call it before anything is loaded. It never reads tensor payloads: of a torch.save file only its
`data.pkl` record, of a `.distcp` file only the non-tensor items.

The allow-lists are what real checkpoints of every strategy name (tests/integration/test_resume.py
checks its checkpoints against them); a name missing here makes a genuine checkpoint unloadable.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata

from .config import ConfigError

# Globals qlaunch's torch.save files name beyond torch's own weights_only allow-list, as
# `torch.serialization.get_unsafe_globals_in_checkpoint` reports them.
TORCH_FILE_GLOBALS = frozenset(
    {
        # numpy's RNG state (rng/rank-*.pt)
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        # DeepSpeed's optimizer partitions (trainable/zero/*_optim_states.pt)
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs (DeepSpeed's CreateLossScaler)
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def _global(obj) -> tuple[str, str]:
    """The (module, name) pair pickle writes for a class or function."""
    return obj.__module__, obj.__qualname__


# Every global a torch.distributed.checkpoint `.metadata` pickle names, keyed as pickle names them.
DCP_METADATA_GLOBALS: dict[tuple[str, str], object] = {
    **{
        _global(cls): cls
        for cls in (
            dcp_metadata.Metadata,
            dcp_metadata.MetadataIndex,
            dcp_metadata.StorageMeta,
            dcp_metadata.TensorStorageMetadata,
            dcp_metadata.BytesStorageMetadata,
            dcp_metadata.ChunkStorageMetadata,
            dcp_metadata.TensorProperties,
            dcp_metadata._MEM_FORMAT_ENCODING,
            dcp_filesystem._StorageInfo,
            torch.Size,
            torch.serialization._get_layout,  # how torch.layout pickles
            type(pathlib.Path()),  # StorageMeta.checkpoint_id
        )
    },
    # A dtype pickles as the torch attribute of its name.
    **{("torch", str(t).removeprefix("torch.")): t for t in vars(torch).values() if isinstance(t, torch.dtype)},
}


class _Unlisted(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return DCP_METADATA_GLOBALS[(module, name)]
        except KeyError:
            raise _Unlisted(f"{module}.{name}") from None


def _refusal(what: str, found: str) -> ConfigError:
    return ConfigError(
        f"{what} holds objects no qlaunch checkpoint holds ({found}); it was not loaded, since unpickling "
        "it could run code. Use a checkpoint qlaunch wrote."
    )


def load_plain(path: Path, allowed: tuple = ()):
    """A checkpoint file read as tensors, numbers, strings, containers and numpy arrays (and the classes in
    `allowed`), never as code."""
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), *allowed]  # the RNG state's numpy
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        raise _refusal(
            f"`{path}`", f"it names `{named.group(1)}`" if named else "not tensors or plain values"
        ) from error


def load_deepspeed_state(path: Path):
    """A DeepSpeed optimizer-state file, read as `load_plain` reads (its loss scaler and stage enum allowed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return load_plain(path, (LossScaler, DynamicLossScaler, ZeroStageEnum))


def check_checkpoint_files(checkpoint_dir: Path) -> None:
    """Raises ConfigError if a pickle in `checkpoint_dir` (a `step-NNNNNN` directory) names anything
    beyond the allow-lists; runs none of them."""
    for path in sorted(p for p in Path(checkpoint_dir).rglob("*") if p.is_file()):
        if path.suffix == ".pt":
            _check_torch_save(path, f"`{path}`")
        elif path.name.endswith(".metadata"):
            _check_dcp(path)


def _check_torch_save(file, what: str) -> None:
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - TORCH_FILE_GLOBALS
    # Whatever cannot be read as a torch.save zip (a legacy or TorchScript file, a pickle using opcodes
    # beyond what tensors and plain values need) is refused: the loaders would unpickle it unchecked.
    except Exception as error:
        raise _refusal(what, "not a torch.save file of tensors and plain values") from error
    if unsafe:
        raise _refusal(what, f"it names `{sorted(unsafe)[0]}`")


def _check_dcp(metadata_path: Path) -> None:
    """A torch.distributed.checkpoint `.metadata`, then the non-tensor items its files hold."""
    with open(metadata_path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except _Unlisted as error:
            raise _refusal(f"`{metadata_path}`", f"it names `{error.name}`") from error
        except Exception as error:
            raise _refusal(f"`{metadata_path}`", "not torch.distributed.checkpoint metadata") from error
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise _refusal(f"`{metadata_path}`", "not torch.distributed.checkpoint metadata")
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata):
            continue  # a tensor item, which torch.distributed.checkpoint reads with weights_only=True
        data_file = metadata_path.parent / info.relative_path
        what = f"Item `{index.fqn}` of `{data_file}`"
        if info.transform_descriptors:
            # The bytes loaded would be the transformed ones, not those checked here; qlaunch writes none.
            raise _refusal(what, f"stored through transforms {list(info.transform_descriptors)}")
        with open(data_file, "rb") as f:
            f.seek(info.offset)
            _check_torch_save(io.BytesIO(f.read(info.length)), what)
