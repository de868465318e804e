"""Quantize once, reuse on every later start: the source rank's 4-bit base, kept on disk.

Quantizing the checkpoint on the CPU runs at tens of millions of parameters a second, and a requeue,
a resume or another strategy used to pay for it again. The first start writes the quantized model
with `save_pretrained` (transformers' own format for a pre-quantized bitsandbytes model: the packed
4-bit data, each weight's quantization constants as `weight.absmax`, `weight.quant_map`,
`weight.nested_*` and `weight.quant_state.bitsandbytes__*` tensors, the unquantized tensors, and a
config carrying the `quantization_config`); later starts load it with `from_pretrained`, which
installs those bytes as they are and quantizes nothing. The tests check that the result is bit for
bit what quantizing gives.

4-bit MoE experts (experts.py) are kept beside it in a file of this cache's own, `experts.safetensors`: each
expert parameter's packed bytes under `<module path>.<name>` and its quantization state as bitsandbytes packs
it (`QuantState.as_dict(packed=True)`) under `<module path>.<name>:<item>`. `save_pretrained` cannot hold them:
it turns fused experts back into the checkpoint's per-expert matrices, which packed bytes cannot be split
into. They are left out of its state dict; on reading, transformers is told they are not missing (so it
allocates no 16-bit placeholder for them) and the parametrization is installed on the packed bytes.

An entry is keyed by the checkpoint's files (path, size, modification time), the quantization config
and the storage dtype the strategy resolved, the versions of torch, transformers and bitsandbytes,
and the kind of device that quantized it: "cuda" when the source rank had a GPU, else "cpu"
(`launcher.collectives.this_rank_device`). It is not known whether bitsandbytes' CUDA kernel gives the same
NF4 bits as its CPU path for the same weights (the CPU path scales by a float reciprocal and buckets
in torch, the CUDA kernel does its own arithmetic, and double quantization's offset is a float mean
summed in another order), so a cache shared between a machine with GPUs and one without keeps one
entry for each and never hands one's result to the other. The tests check bit identity on the CPU only.

The directory is `model.quant_cache_dir` (`model.quant_cache: false` turns it off). The first process
to miss takes a file lock and quantizes into a temporary directory renamed into place when complete;
another job sharing the directory waits for the lock and reads what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import SafetensorError

from .. import vision
from ..config import ModelConfig, QuantConfig
from ..dtypes import DTYPE_BY_NAME, DtypePolicy
from ..node_cache import exclusive, fresh_temporary, say
from . import experts

CACHE_FORMAT = 4
"""Raise when an entry's layout or meaning changes: every cached base is then quantized again."""
COMPLETE = "qlaunch-quant-cache.json"
"""Written last into the temporary directory: an entry without it is not one."""
EXPERTS_FILE = "experts.safetensors"
FACTORS_FILE = "decomposed-adapters.safetensors"
"""A residual base's adapter factors (lora.init: pissa, olora, loftq): `<module path>:A` and `<module path>:B`."""


def cache_root(model: ModelConfig) -> Path:
    if model.quant_cache_dir:
        return Path(model.quant_cache_dir).expanduser()
    if os.environ.get("QLAUNCH_QUANT_CACHE"):
        return Path(os.environ["QLAUNCH_QUANT_CACHE"])
    return Path.home() / ".cache" / "qlaunch" / "quantized"


def checkpoint_files(model: ModelConfig) -> list[list]:
    """Every file of the model's directory (config, weights, remote code): resolved path, size, mtime."""
    from .files import model_directory

    directory = model_directory(model.path)
    found = []
    for file in sorted(directory.iterdir()):
        if file.is_file():
            stat = file.stat()
            found.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return found


def library_versions() -> dict[str, str]:
    import bitsandbytes
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def cache_key(
    model: ModelConfig, quant: QuantConfig, policy: DtypePolicy, quantized_on: str, decomposition: dict | None = None
) -> tuple[str, dict]:
    what = {
        "format": CACHE_FORMAT,
        "quantized_on": quantized_on,
        "files": checkpoint_files(model),
        "trust_remote_code": model.trust_remote_code,
        "quant": {
            "type": quant.type,
            "double_quant": quant.double_quant,
            "compute_dtype": quant.compute_dtype,
            "storage": str(policy.quant_storage),
            "experts": quant.experts,
        },
        "versions": library_versions(),
    }
    if model.quantize_vision:  # a vision-language model's vision parts in 4 bits too (the default keeps older keys)
        what["quantize_vision"] = True
    if decomposition:  # a base decomposed for some adapters (lora.init: pissa, olora, loftq) keeps their factors
        what["decomposition"] = decomposition
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24], what


def cached_quantized_base(
    model: ModelConfig,
    quant: QuantConfig,
    policy: DtypePolicy,
    quantize: Callable[[], torch.nn.Module],
    quantized_on: str,
    decomposition: dict | None = None,
) -> tuple[torch.nn.Module, bool]:
    """The quantized base and whether it came from the cache: read from it, or `quantize()`d and written
    into it by the first process to ask. `quantized_on` is the kind of device `quantize` quantizes on
    ("cpu", "cuda"): part of the key, as is `decomposition` (decomposed_init.describe), the adapters a residual
    base was decomposed for, whose factors the entry keeps beside it."""
    root = cache_root(model)
    root.mkdir(parents=True, exist_ok=True)
    key, what = cache_key(model, quant, policy, quantized_on, decomposition)
    entry = root / key
    if not is_entry(entry):
        with exclusive(root, key, f"waiting for another process quantizing `{model.path}` into {entry}"):
            if not is_entry(entry):
                return write_entry(model, quantize, root, key, what), False
    started = time.perf_counter()
    try:
        base = read_entry(model, quant, entry)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        # Complete once, damaged since (a disk error, a file cut short by hand): replaced, not trusted.
        say(f"the cached quantized base {entry} cannot be read ({type(error).__name__}: {error}); quantizing again")
        with exclusive(root, key, f"waiting for another process replacing the damaged entry {entry}"):
            discard(entry)
            return write_entry(model, quantize, root, key, what), False
    say(
        f"quantized base of `{model.path}` read from the cache {entry} in {time.perf_counter() - started:.1f} s, not quantized again"
    )
    return base, True


def discard(entry: Path) -> None:
    """Moves an entry out of its key's place first, so no reader opens a half-removed one."""
    if entry.exists():
        doomed = entry.parent / f"{entry.name}.damaged-{os.getpid()}"
        os.rename(entry, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def is_entry(entry: Path) -> bool:
    return (entry / COMPLETE).is_file()


def write_entry(model: ModelConfig, quantize: Callable[[], torch.nn.Module], root: Path, key: str, what: dict):
    """Quantizes, saves into `<key>.tmp-<pid>` and renames it to `<key>` once complete: an entry is whole
    or absent. A cache that cannot be written (a full or read-only disk) costs the next start, not this one."""
    started = time.perf_counter()
    base = quantize()
    quantized_s = time.perf_counter() - started
    partial = root / f"{key}.tmp-{os.getpid()}"
    try:
        partial = fresh_temporary(root, key)
        save_base(base, partial)
        (partial / COMPLETE).write_text(json.dumps({**what, "quantize_s": round(quantized_s, 3)}, indent=2))
        shutil.rmtree(root / key, ignore_errors=True)  # an incomplete entry from before this format's marker
        os.rename(partial, root / key)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        say(f"could not write the quantized base into the cache {root} ({error}); the next start quantizes again")
        return base
    say(
        f"`{model.path}` read and quantized in {quantized_s:.1f} s and written to the cache {root / key} "
        f"in {time.perf_counter() - started - quantized_s:.1f} s"
    )
    return base


def read_entry(model: ModelConfig, quant: QuantConfig, entry: Path) -> torch.nn.Module:
    """The cached base, as the quantizing load gives it (named after `model.path`, not the cache)."""
    from transformers import AutoConfig

    packed = read_experts(entry)
    config = AutoConfig.from_pretrained(entry, trust_remote_code=model.trust_remote_code, local_files_only=True)
    with the_quantizing_load_s_tree({key for key in packed if ":" not in key}):
        base = vision.auto_class(config).from_pretrained(
            entry,
            dtype=DTYPE_BY_NAME[quant.compute_dtype],
            device_map={"": "cpu"},
            trust_remote_code=model.trust_remote_code,
            local_files_only=True,
        )
    install_experts(base, packed)
    unpacked = [
        name
        for name, m in base.named_modules()
        if isinstance(m, bnb.nn.Linear4bit) and not isinstance(m.weight, bnb.nn.Params4bit)
    ]
    if unpacked:
        # transformers did not take the entry's packed bytes for a 4-bit weight (Qwen4-exp's hyper-connections).
        raise ValueError(f"{len(unpacked)} 4-bit weights load back unpacked ({', '.join(unpacked[:3])})")
    if (entry / FACTORS_FILE).is_file():
        from safetensors.torch import load_file

        saved = load_file(entry / FACTORS_FILE)
        paths = sorted({key.rpartition(":")[0] for key in saved})
        base.qlaunch_factors = {path: (saved[f"{path}:A"], saved[f"{path}:B"]) for path in paths}
    base.config._name_or_path = model.path
    base.name_or_path = model.path
    return base


def save_base(base: torch.nn.Module, directory: Path) -> None:
    """The base in transformers' pre-quantized format under the model's own parameter names (a checkpoint's names
    are not restored: a conversion that transposes a weight, ERGO's shared expert, cannot transpose packed 4-bit
    bytes), its 4-bit experts (if any) in `EXPERTS_FILE`, the adapters'
    factors of a residual base in `FACTORS_FILE`."""
    from safetensors.torch import save_file

    factors = getattr(base, "qlaunch_factors", None)
    if factors:
        named = {
            f"{path}:{name}": t.contiguous() for path, ab in factors.items() for name, t in zip("AB", ab, strict=True)
        }
        save_file(named, directory / FACTORS_FILE)
    held = experts.quantized_experts(base)
    if not held:
        base.save_pretrained(directory, save_original_format=False)
        return
    tensors = {}
    for key, (module, name, parametrization) in held.items():
        tensors[key] = module.parametrizations[name].original.detach().contiguous()
        for item, value in parametrization.quant_state.as_dict(packed=True).items():
            tensors[f"{key}:{item}"] = value.contiguous()
    # Out of the module tree while saving: the state dict then holds everything but the packed experts.
    hidden = [
        (module, module._modules.pop("parametrizations")) for module in {id(m): m for m, _, _ in held.values()}.values()
    ]
    try:
        base.save_pretrained(directory, save_original_format=False)
    finally:
        for module, parametrizations in hidden:
            module._modules["parametrizations"] = parametrizations
    save_file(tensors, directory / EXPERTS_FILE)


def read_experts(entry: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = entry / EXPERTS_FILE
    return load_file(file) if file.is_file() else {}


def install_experts(base: torch.nn.Module, packed: dict[str, torch.Tensor]) -> None:
    """Each expert parameter left on meta by the load gets its packed bytes and 4-bit parametrization back."""
    from bitsandbytes.functional import QuantState

    for key in (k for k in packed if ":" not in k):
        path, _, name = key.rpartition(".")
        state = QuantState.from_dict(
            {item.partition(":")[2]: v for item, v in packed.items() if item.startswith(f"{key}:")}, torch.device("cpu")
        )
        spec = experts.ExpertSpec(tuple(state.shape), state.dtype, tuple(packed[key].shape))
        experts.install_packed(base.get_submodule(path) if path else base, name, packed[key], state, spec)
    experts.sort_parametrizations(base)


@contextlib.contextmanager
def the_quantizing_load_s_tree(expert_keys: set[str]):
    """Inside, `from_pretrained` of a cache entry builds the module tree the quantizing load built: it does not
    swap fused experts for per-expert linears as it does for pre-quantized checkpoints of some families
    (Llama-4), and it does not count `expert_keys` as missing weights, so it neither allocates nor initializes
    them (they stay on meta) nor reports them: the cache installs them afterwards."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import HfQuantizer

    finalize = PreTrainedModel._finalize_model_loading

    def finalize_without(model, load_config, loading_info):
        loading_info.missing_keys = set(loading_info.missing_keys) - expert_keys
        return finalize(model, load_config, loading_info)

    convert = HfQuantizer._convert_model_for_quantization
    PreTrainedModel._finalize_model_loading = staticmethod(finalize_without)
    HfQuantizer._convert_model_for_quantization = lambda self, model: None
    try:
        yield
    finally:
        PreTrainedModel._finalize_model_loading = staticmethod(finalize)
        HfQuantizer._convert_model_for_quantization = convert
