"""The final adapter in PEFT format, written atomically, and a check that it reproduces training.

Besides the adapter, a run writes `adapter_check.safetensors`: a few input ids and the logits the
sharded model produced for them at the end of training. `qlaunch verify` (or `verify_adapter`)
reloads base + adapter in one process and compares, which catches the failures peers ship (an
empty adapter from ZeRO-3, only rank 0's shard from FSDP2).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import strategies
from ..config import ConfigError, ModelConfig, QuantConfig, load_config
from ..cpu_shims import disable_bnb_cpu_repack
from ..dtypes import DTYPE_BY_NAME
from ..model.build import decomposition_plan, load_quantized_base, prepare_for_kbit_training
from ..model.experts import fix_peft_stacked_parametrizations, sort_expert_parameters
from ..model.targets import keep_named_modules
from ..run import disk_full
from ..safe_load import check_checkpoint_files
from ..vision import auto_class, is_vision_language
from .store import read_meta

ADAPTER_DIR = "adapter"
CHECK_FILE = "adapter_check.safetensors"
ADAPTER_NAME = "default"


@contextmanager
def _removed_on_failure(tmp: Path, final: Path, what: str, needed: int):
    """A write to `tmp` that fails leaves nothing behind; one that meets a full disk says where and how much
    it needed."""
    try:
        with disk_full.writing(final, what, needed):  # reads the room left before the partial write is removed
            yield
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(final: Path, write, what: str = "output", needed: int = 0) -> None:
    """Calls write(tmp_dir), then renames tmp_dir to `final`; an existing `final` is replaced only at the end."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _removed_on_failure(tmp, final, what, needed):
        tmp.mkdir(parents=True)
        write(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def write_peft_adapter(final: Path, peft_config, full_trainable: dict[str, torch.Tensor]) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors (atomically) from full trainable weights."""
    # PEFT's file format is the trainable names without the adapter name. (peft's own
    # get_peft_model_state_dict finds LoRA layers by module path, which FSDP1's wrappers change.)
    state = {name.replace(f".{ADAPTER_NAME}.", "."): tensor for name, tensor in full_trainable.items()}
    if not state or any(t.numel() == 0 for t in state.values()):
        raise RuntimeError("The gathered adapter is empty; refusing to write it.")

    def write(tmp: Path) -> None:
        peft_config.save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, tmp / "adapter_model.safetensors", metadata={"format": "pt"}
        )

    write_atomically(Path(final), write, "adapter", sum(t.numel() * t.element_size() for t in state.values()))
    return Path(final)


def save_adapter(peft_model, full_trainable: dict[str, torch.Tensor], output_dir: Path) -> Path:
    return write_peft_adapter(Path(output_dir) / ADAPTER_DIR, peft_model.peft_config[ADAPTER_NAME], full_trainable)


def checkpoint_trainable(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The full adapter weights stored in a training checkpoint, read in one process."""
    checkpoint_dir = Path(checkpoint_dir)
    reader = strategies.by_checkpoint_format(read_meta(checkpoint_dir)["checkpoint_format"])
    check_checkpoint_files(checkpoint_dir)  # DCP and DeepSpeed unpickle what they read unchecked
    return reader.read_trainable(checkpoint_dir / "trainable")


def export_checkpoint(checkpoint_dir: Path, output: Path, overwrite: bool = False) -> Path:
    """Turns a training checkpoint into a PEFT adapter directory."""
    from peft import LoraConfig

    output = Path(output)
    if output.exists() and not overwrite:
        raise ConfigError(f"`{output}` already exists; choose another --output or pass --overwrite.")
    return write_peft_adapter(
        output, LoraConfig.from_pretrained(str(checkpoint_dir)), checkpoint_trainable(checkpoint_dir)
    )


def merge_adapter(adapter_dir: Path, output: Path, base_path: str | None = None, dtype: str = "bfloat16") -> Path:
    """Merges an adapter into a 16-bit copy of its base model and saves it with `save_pretrained`. A PiSSA or OLoRA
    adapter (its run's config beside it says so) trained on the residual its run quantized: it is merged into the
    16-bit residual, each adapted weight decomposed again as the run did, so the result is the original weights
    plus what training changed."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    output = Path(output)
    if output.exists():
        raise ConfigError(f"`{output}` already exists; choose another --output.")
    base_path = base_path or LoraConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    config = AutoConfig.from_pretrained(base_path)
    base = auto_class(config).from_pretrained(base_path, dtype=DTYPE_BY_NAME[dtype])
    leave_residuals(base, base_path, run_config_of(adapter_dir))
    sort_expert_parameters(base)  # the adapter's nesting, as training built it
    keep_named_modules()  # linears named in full stay modules (peft issue 3711)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        # a vision-language model's processor holds its tokenizer, image processor and chat template
        (AutoProcessor if is_vision_language(config) else AutoTokenizer).from_pretrained(base_path).save_pretrained(tmp)

    write_atomically(output, write)
    return output


def run_config_of(adapter_dir: Path):
    """The config of the run an adapter came from (its run_config.yaml beside it), None if unknown."""
    run_config = Path(adapter_dir).resolve().parent / "run_config.yaml"
    return load_config(run_config, ()) if run_config.is_file() else None


def leave_residuals(base: nn.Module, base_path: str, cfg) -> None:
    """Each weight the run's `lora.init` started the adapters from becomes what that run trained on (in 16 bits here):
    PiSSA's and OLoRA's residual, LoftQ's quantized weight; other runs trained on the weights as they are."""
    from ..model.decomposed_init import decompose, four_bit, one_thread

    lora = cfg.lora if cfg else None
    shapes = decomposition_plan(ModelConfig(path=base_path), QuantConfig(compute_dtype="float32"), lora)
    with torch.no_grad(), one_thread():
        for path, shape in shapes.items():
            weight = base.get_submodule(path).weight
            if lora.init == "loftq":
                weight.copy_(four_bit(weight, cfg.quant, weight.device))
            else:
                weight.copy_(decompose(weight, shape, lora)[0])


def save_check(output_dir: Path, inputs: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
    """The end-of-run check: the model's inputs (ids, and a vision-language model's image inputs) and its logits."""
    final = Path(output_dir) / CHECK_FILE
    tmp = final.with_name(f".{CHECK_FILE}.tmp-{os.getpid()}")
    tensors = {k: v.cpu().contiguous() for k, v in inputs.items()} | {"logits": logits.float().cpu().contiguous()}
    with _removed_on_failure(tmp, final, "adapter check", sum(t.numel() * t.element_size() for t in tensors.values())):
        save_file(tensors, tmp)
    os.replace(tmp, final)


def load_for_inference(output_dir: Path, base_path: str | None = None, adapter_dir: Path | None = None):
    """The run's 4-bit base, prepared with the run's dtypes, plus its adapter (or `adapter_dir`),
    through the standard PEFT API in one process."""
    from peft import PeftModel

    cfg = load_config(Path(output_dir) / "run_config.yaml", [("model.path", base_path)] if base_path else ())
    policy = strategies.dtype_policy(cfg.quant, strategies.get(cfg.strategy), cfg.train.mixed_precision)
    base = load_quantized_base(cfg.model, cfg.quant, policy, lora=cfg.lora)  # a residual base for PiSSA and OLoRA
    fix_peft_stacked_parametrizations()  # adapters on 4-bit experts
    keep_named_modules()  # linears named in full stay modules (peft issue 3711)
    disable_bnb_cpu_repack(base)
    prepare_for_kbit_training(base, policy, gradient_checkpointing=False)
    if torch.cuda.is_available():
        base = base.to("cuda")
    return PeftModel.from_pretrained(base, str(adapter_dir or Path(output_dir) / ADAPTER_DIR)).eval()


def verify_adapter(output_dir: Path, base_path: str | None = None) -> float:
    """Max |logit difference| between the single-process reload and the sharded model at the end of training."""
    output_dir = Path(output_dir)
    model = load_for_inference(output_dir, base_path)
    check = load_file(output_dir / CHECK_FILE)
    expected = check.pop("logits")
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in check.items()}).logits.float().cpu()
    return (logits - expected).abs().max().item()
