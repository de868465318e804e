"""The run config: one typed, frozen object, filled from a YAML file and `--section.key value` overrides.

Every stage of a run reads this object and nothing else; what a run resolves (the strategy, mixed
precision) makes a new one (launcher.preflight.RunSetup), so no stage changes what another reads. Unknown keys and values of the wrong
type are rejected here, with the fix in the message, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

STRATEGIES = ("fsdp2", "fsdp1", "zero2", "zero3", "ddp")
DTYPES = ("bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A problem with the user's input, with the fix in the message."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Local directory saved with `save_pretrained`, or a hub id already in the local cache."""
    trust_remote_code: bool = False
    quant_cache: bool = True
    """Keep the quantized base on disk after the first start and load it on later starts, not quantizing again."""
    quant_cache_dir: str = ""
    """Where the quantized base is kept (empty: $QLAUNCH_QUANT_CACHE, else ~/.cache/qlaunch/quantized)."""


@dataclass(frozen=True)
class QuantConfig:
    type: str = "nf4"
    """nf4 or fp4."""
    double_quant: bool = True
    compute_dtype: str = "auto"
    """dtype of the 4-bit matmuls: auto, bfloat16, float16 or float32. auto: the autocast dtype under mixed
    precision, else bfloat16 where the device has it natively, float16 on older GPUs, float32 on other CPUs."""
    storage_dtype: str = "auto"
    """dtype the packed 4-bit bytes are stored as; auto picks what the strategy can shard (bfloat16, as on GPUs,
    where a CPU computes in float32 for lack of bf16)."""
    experts: str = "4bit"
    """MoE expert weights (fused 3D parameters): 4bit (quantized like the linears, with the same type and double
    quantization) or 16bit (kept in the compute dtype, as before)."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    """Module names (or all-linear: every nn.Linear but the output layer). MoE experts are not modules."""
    target_parameters: list[str] = field(default_factory=list)
    """Parameters to adapt directly, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] for fused MoE
    experts (peft's target_parameters). peft has no dropout there: lora.dropout then applies to the modules only."""


@dataclass(frozen=True)
class DataSource:
    """One dataset file and how to read its records."""

    path: str = ""
    format: str = "auto"
    """auto (from the file ending), json, jsonl, parquet or text."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    """Chat records: a list of {"role", "content"} messages; the loss covers the assistant turns."""
    weight: float = 1.0
    """Samples drawn from this source per epoch, as a multiple of its records (2: each twice, 0.5: a seeded half)."""


@dataclass(frozen=True)
class DataConfig(DataSource):
    """`path` and the fields above describe a single dataset; `datasets` lists several instead."""

    datasets: list[DataSource] = field(default_factory=list)
    """Several sources, each with its own path, format, fields and weight, mixed deterministically from the seed."""
    chat_template: str = ""
    """A Jinja chat template, or a file holding one, for a tokenizer without one (or to replace it)."""
    max_seq_len: int = 512
    packing: bool = False
    """Pack samples into rows of max_seq_len tokens; positions restart and attention stops at each sample's start."""
    eval_path: str = ""
    """A held-out dataset (read with the fields above) for the eval loss."""
    eval_fraction: float = 0.0
    """Or: this fraction of each source's samples, held out from training by the seed."""
    cache_dir: str = ""
    """Where tokenized data is kept between runs (empty: $QLAUNCH_DATA_CACHE, else ~/.cache/qlaunch/data)."""
    tokenize_workers: int = 0
    """Processes tokenizing a source (0: every core for chat records, which render in Python; 1 otherwise)."""

    def sources(self) -> list[DataSource]:
        if self.datasets:
            return list(self.datasets)
        return [DataSource(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataSource)})]

    def eval_source(self) -> DataSource:
        return dataclasses.replace(self.sources()[0], path=self.eval_path, format="auto", weight=1.0)


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    """cosine, linear or constant, after warmup."""
    warmup_steps: int = 0
    max_steps: int = 0
    """Optimizer steps; 0 means run `epochs` full passes."""
    epochs: int = 1
    seed: int = 0
    eval_every_steps: int = 0
    """Eval loss every N optimizer steps (and at the end) when the data has an eval split; 0: at the end only."""
    log_interval: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    gradient_checkpointing: bool = True
    loss_chunk_tokens: int = 1024
    """The loss is computed over this many tokens at a time, so the fp32 logits of a whole micro batch never
    exist (launcher/model/loss.py); 0: the model's own loss over all logits at once."""
    activation_offload: bool = False
    """Keep what forward saves for backward (with checkpointing: each layer's input) in host RAM until backward
    needs it (launcher/run/activation_offload.py)."""
    sequence_parallel: int = 1
    """Split each sequence across this many ranks (launcher/run/sequence_parallel.py): the world is data-parallel
    groups x this; 1: every rank holds whole sequences."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, none on CPU), no, bf16 or fp16."""
    report_to: list[str] | str = field(default_factory=list)
    """Accelerate trackers to log to as well as metrics.jsonl (one, or a list): tensorboard, wandb, mlflow, ..."""
    project: str = "qlaunch"
    """The trackers' project (TensorBoard: <output_dir>/trackers/<project>)."""
    run_name: str = ""
    """The trackers' run name (empty: the output directory's name)."""
    check_4bit_weights: bool = False
    """Check that the 4-bit weights every rank receives in its first forward are the source rank's bytes (a
    digest per weight, in shard_report.json; costs one pass over the base at start-up)."""
    offload: str = "none"
    """What lives in host RAM between uses: none, optimizer (the adapter's gradients, master copies and optimizer
    states; ZeRO's offload_optimizer) or params (the frozen 4-bit base and the adapters too, with the optimizer
    state). Each strategy offers some of these; `qlaunch plan` says which fit."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are removed only after a newer one is complete."""


@dataclass(frozen=True)
class DistConfig:
    timeout_s: int = 1800
    """Collective timeout: a rank that stops taking part (hung or gone) fails the run after this many seconds."""
    rendezvous_timeout_s: int = 600
    """How long the nodes of a run wait for each other at start (head unreachable, port taken, a node that never starts)."""
    preempt_exit_code: int = 85
    """Exit status of a run stopped by SIGUSR2 or SIGTERM after a complete checkpoint; the slurm/ scripts requeue on it."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    strategy: str = ""
    """fsdp2, fsdp1, zero2, zero3 or ddp; empty means: follow the accelerate config (fsdp2 if none)."""
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    resume: str = ""
    """"auto" (the latest complete checkpoint in output_dir, else start fresh), a checkpoint path, or empty."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks `value` against the field type `tp`; ints are accepted where floats are expected."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
    elif typing.get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(item, typing.get_args(tp)[0], f"{where}[{i}]") for i, item in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, f"{where}.")
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp in (int, float) and isinstance(value, str):
        # PyYAML reads `1e-4` as a string (YAML 1.1 wants `1.0e-4`); accept what Python parses.
        try:
            return tp(value)
        except ValueError:
            pass
    elif tp is bool and isinstance(value, bool) or tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    elif tp is str and value is False:
        # YAML 1.1 reads `no` (and off, false) as False: the text options that take it mean "no"
        # (`train.mixed_precision: no`).
        return "no"
    raise ConfigError(
        f"`{where}` must be {_type_name(tp)}, got {value!r}. Fix the value in the YAML or on the command line."
    )


# Names users bring from transformers' Trainer and peft, mapped to ours for "did you mean".
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_train_epochs": "epochs",
    "warmup": "warmup_steps",
    "lora_r": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "max_length": "max_seq_len",
    "seq_len": "max_seq_len",
    "model_name_or_path": "path",
    "output": "output_dir",
}


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    candidates = known + [name for name, ours in FAMILIAR_NAMES.items() if ours in known]
    close = [FAMILIAR_NAMES.get(match, match) for match in difflib.get_close_matches(key, candidates, n=1)]
    hint = f" Did you mean `{where}{close[0]}`?" if close else ""
    return ConfigError(
        f"Unknown config key `{where}{key}`.{hint} Valid keys here: {', '.join(known)}. "
        "Remove or rename it (see `qlaunch train --help` for the full list)."
    )


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"`{where.rstrip('.') or 'config'}` must be a mapping of keys to values, got {data!r}.")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key not in known:
            raise _unknown_key(key, known, where)
        values[key] = _coerce(value, hints[key], f"{where}{key}")
    return cls(**values)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.replace("-", "_").split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"`{dotted}`: `{part}` is a value, not a section.")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turns `--train.lr 1e-4 --lora.r=8` into [("train.lr", 1e-4), ("lora.r", 8)]; values are YAML."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"Expected an override like `--train.lr 1e-4`, got `{arg}`.")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"`{arg}` needs a value, e.g. `{arg} VALUE`.")
            raw = args[i + 1]
            i += 1
        i += 1
        try:
            pairs.append((key, yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as error:
            raise ConfigError(f"The value of `--{key}` is not valid YAML ({yaml_problem(error)}): `{raw}`.") from error
    return pairs


def yaml_problem(error: yaml.YAMLError) -> str:
    """The YAML error on one line: what is wrong, and where."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or 'cannot parse'}{where}"


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] = ()) -> RunConfig:
    """Reads the YAML at `path` (if any), applies the dotted overrides, and returns a typed RunConfig."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Run config `{path}` does not exist. Pass an existing YAML file to --config.")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"Run config `{path}` is not valid YAML: {yaml_problem(error)}.") from error
        if not isinstance(tree, dict):
            raise ConfigError(f"Run config `{path}` must be a mapping at the top level (keys like `model:`, `train:`).")
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return _build(RunConfig, tree)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe_keys() -> str:
    """All config keys with their defaults, for --help."""
    lines = []
    for section in dataclasses.fields(RunConfig):
        default = RunConfig().__getattribute__(section.name)
        if dataclasses.is_dataclass(default):
            for f in dataclasses.fields(default):
                lines.append(f"  {section.name}.{f.name} = {getattr(default, f.name)!r}")
        else:
            lines.append(f"  {section.name} = {default!r}")
    return "\n".join(lines)
