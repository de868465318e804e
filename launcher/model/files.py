"""The base model's files: where `from_pretrained` reads them from, and whether its weights are all there and
whole, checked from their headers without loading a weight.

A missing, truncated or corrupt weight file otherwise shows up as a raw OSError or safetensors traceback in
every rank, after the process group has started.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from ..config import ConfigError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_NAMES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH, PYTORCH_INDEX)
"""In the order `from_pretrained` prefers them in a directory."""
MAX_HEADER_BYTES = 100_000_000
"""safetensors refuses a longer header (its MAX_HEADER_SIZE)."""


def model_source(path: str, config_only: bool = False) -> str:
    """What `from_pretrained` is given for `model.path`: a directory written by `save_pretrained` (or, with
    `config_only`, a config.json file), else a hub id, looked up in the local cache only."""
    wanted = "a directory written by `save_pretrained`" + (
        " or its config.json (only the config is read)" if config_only else ""
    )
    if not path:
        raise ConfigError(f"No model given. Set `model.path` (--model) to {wanted}, or a cached hub id.")
    local = Path(path).expanduser()
    if (
        config_only
        and local.is_file()
        and local.suffix == ".json"
        or local.is_dir()
        and (local / "config.json").is_file()
    ):
        return str(local)
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"Model `{path}` not found: no `config.json` there. Set `model.path` to {wanted}.")
    return path


def model_directory(path: str) -> Path:
    """The directory the model's files are read from: `path` itself, or the cached snapshot of a hub id."""
    source = model_source(path)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(source, "config.json")
    if not isinstance(config, str):
        raise ConfigError(
            f"Model `{path}` is not in the local Hugging Face cache and nothing is fetched at run time. Download it "
            f"first (`huggingface-cli download {path}`)."
        )
    return Path(config).parent


def check_weights(path: str, explicit: str | None = None) -> None:
    """The weight files of the model at `path` are all there and whole (`explicit`: the config's
    `transformers_weights`, which `from_pretrained` reads instead); else a ConfigError naming the file and the fix."""
    directory = model_directory(path)
    hub = directory != Path(path).expanduser()
    where = f"`{directory}` (the cached copy of `{path}`)" if hub else f"`{directory}`"
    again = f"Download it again (`huggingface-cli download {path}`)." if hub else "Copy or download it again."
    files = weight_files(directory, (explicit,) if explicit else WEIGHT_NAMES, where, again)
    for file in files:
        try:
            if file.name.endswith(".safetensors"):
                check_safetensors(file, again)
            else:
                check_pickle_archive(file, again)
        except OSError as error:
            raise ConfigError(f"Weight file `{file}` cannot be read ({error.strerror or error}). {again}") from error


def weight_files(directory: Path, names: tuple[str, ...], where: str, again: str) -> list[Path]:
    """The first of `names` in `directory`, or the shards its index lists, all present."""
    for name in names:
        file = directory / name
        if file.is_file():
            return index_shards(file, again) if name.endswith(".index.json") else [file]
    held = sorted(p.name for p in directory.iterdir())
    raise ConfigError(
        f"Model directory {where} has config.json but no weights ({' or '.join(names)}); it holds "
        f"{', '.join(held)}: the weights were left behind. {again}"
    )


def index_shards(index: Path, again: str) -> list[Path]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"The shard index `{index}` cannot be read as JSON with a `weight_map` ({type(error).__name__}: {error}). "
            f"{again}"
        ) from error
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise ConfigError(
            f"The shard index `{index}` lists {len(shards)} weight files, but {len(missing)} of them are not in "
            f"`{index.parent}`: {', '.join(missing)}. Copy or download the missing shards again."
        )
    return [index.parent / shard for shard in shards]


def check_safetensors(file: Path, again: str) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data: the header must parse and the file's size must be exactly what it describes
    (safetensors refuses a file longer or shorter)."""
    size = file.stat().st_size
    if size < 8:
        raise ConfigError(f"Weight file `{file}` is truncated: {size} bytes, not even a header length. {again}")
    with open(file, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        if length > MAX_HEADER_BYTES:
            raise ConfigError(
                f"Weight file `{file}` is not a valid safetensors file: its first 8 bytes give a header of "
                f"{length:,} bytes. {again}"
            )
        if 8 + length > size:
            raise ConfigError(
                f"Weight file `{file}` is truncated: {size:,} bytes, shorter than its own header "
                f"({8 + length:,} bytes). {again}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise ConfigError(
            f"Weight file `{file}` is corrupt: its safetensors header does not parse ({type(error).__name__}: "
            f"{error}). {again}"
        ) from error
    expected = 8 + length + end
    if size != expected:
        state = "truncated" if size < expected else "corrupt (longer than its header describes)"
        raise ConfigError(f"Weight file `{file}` is {state}: expected {expected:,} bytes, found {size:,}. {again}")


def check_pickle_archive(file: Path, again: str) -> None:
    """`torch.save` writes a zip archive, whose directory is at its end: a cut-off copy has none. (Files from
    torch before 1.6 are plain pickles with no such check.)"""
    with open(file, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped and not zipfile.is_zipfile(file):
        raise ConfigError(
            f"Weight file `{file}` is truncated or corrupt: a zip archive (torch.save) without its closing "
            f"directory. {again}"
        )
