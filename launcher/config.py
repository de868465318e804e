"""The run config: one typed, frozen object, filled from a YAML file and `--section.key value` overrides.

Every stage of a run reads this object and nothing else; what a run resolves (the strategy, mixed
precision) makes a new one (launcher.preflight.RunSetup), so no stage changes what another reads. Unknown keys and
values of the wrong type are rejected on load (launcher.typed_yaml); every value rule lives with the section that
declares the value (its `rules`) and holds for every RunConfig, read from a file or built in code, before any
process group exists.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .adapter_config import FROM_WEIGHTS, LoraConfig
from .objective_config import DPOConfig, KTOConfig, Objective, ORPOConfig
from .typed_yaml import ConfigError, build, parse_overrides, set_dotted, spoken_choices, yaml_problem

__all__ = ["ConfigError", "LoraConfig", "RunConfig", "dump_config", "describe_keys", "load_config", "parse_overrides"]

StrategyName = Literal["fsdp2", "fsdp1", "zero2", "zero3", "ddp"]
Dtype = Literal["bfloat16", "float16", "float32"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Offload = Literal["none", "optimizer", "params"]
STRATEGIES: tuple[str, ...] = typing.get_args(StrategyName)
"""The registry's names (launcher.strategies.NAMES), here for what must not import torch."""
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
Rule = tuple[bool, str]


def unknown_strategy(name: str) -> ConfigError | None:
    if name in STRATEGIES:
        return None
    return ConfigError(f"Unknown strategy `{name}`. Choose one of: {', '.join(STRATEGIES)}.")


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Local directory saved with `save_pretrained`, or a hub id already in the local cache."""
    trust_remote_code: bool = False
    quant_cache: bool = True
    """Keep the quantized base on disk after the first start and load it on later starts, not quantizing again."""
    quant_cache_dir: str = ""
    """Where the quantized base is kept (empty: $QLAUNCH_QUANT_CACHE, else ~/.cache/qlaunch/quantized)."""
    quantize_vision: bool = False  # vision-language models: the vision encoder and projector in 4 bits too


@dataclass(frozen=True)
class QuantConfig:
    type: Literal["nf4", "fp4"] = "nf4"
    """nf4 or fp4."""
    double_quant: bool = True
    compute_dtype: Literal["auto", Dtype] = "auto"
    """dtype of the 4-bit matmuls: auto, bfloat16, float16 or float32. auto: the autocast dtype under mixed
    precision, else bfloat16 where the device has it natively, float16 on older GPUs, float32 on other CPUs."""
    storage_dtype: Literal["auto", Dtype] = "auto"
    """dtype the packed 4-bit bytes are stored as; auto picks what the strategy can shard (bfloat16, as on GPUs,
    where a CPU computes in float32 for lack of bf16)."""
    experts: Literal["4bit", "16bit"] = "4bit"
    """MoE expert weights (fused 3D parameters): 4bit (quantized like the linears, with the same type and double
    quantization) or 16bit (kept in the compute dtype, as before)."""


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
    images_field: str = "images"
    """Image chat records: one file path (relative to the dataset's directory) per `{"type": "image"}` part, in order."""
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    """Preference pairs (train.objective dpo, orpo, kto): prompt, chosen and rejected, texts or message lists."""
    label_field: str = "label"
    """Unpaired preference records (train.objective kto): prompt, completion, and this field, true where the
    completion is desirable and false where it is not."""
    weight: float = 1.0
    """Samples drawn from this source per epoch, as a multiple of its records (2: each twice, 0.5: a seeded half)."""

    def rules(self, at: str) -> list[Rule]:
        return [(self.weight > 0, f"`{at}weight` must be positive, got {self.weight}.")]


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
    images_per_sample: int = 0
    """`qlaunch budget`/`plan` of a vision-language model: images in each sample (training measures its own)."""
    image_size: int = 448  # with images_per_sample: each square image's side in pixels, as the processor gets it
    max_prompt_len: int = 0
    """Preference pairs: a longer prompt keeps its last this many tokens (0: prompts are not cut; a pair whose prompt
    leaves no room for its completions within max_seq_len is refused)."""

    def rules(self, at: str) -> list[Rule]:
        return super().rules(at) + [
            (self.max_seq_len > 1, f"`{at}max_seq_len` must be at least 2, got {self.max_seq_len}."),
            (
                not (self.datasets and self.path),
                f"Both `{at}path` and `{at}datasets` are set. Use `{at}path` for one dataset, or list every "
                f"dataset (this one too) under `{at}datasets`.",
            ),
            (
                0 <= self.max_prompt_len < self.max_seq_len,
                f"`{at}max_prompt_len` must be 0 (prompts not cut) or below max_seq_len ({self.max_seq_len}), so that "
                f"a completion fits after the prompt; got {self.max_prompt_len}.",
            ),
            (0 <= self.eval_fraction < 1, f"`{at}eval_fraction` must be in [0, 1), got {self.eval_fraction}."),
            (self.images_per_sample >= 0 < self.image_size, f"`{at}images_per_sample`, `image_size`: >= 0, > 0."),
            (
                not (self.eval_path and self.eval_fraction),
                f"Both `{at}eval_path` and `{at}eval_fraction` are set: evaluate on a held-out file, or hold out a "
                "fraction of the training data, not both.",
            ),
        ]

    def sources(self) -> list[DataSource]:
        if self.datasets:
            return list(self.datasets)
        return [DataSource(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataSource)})]

    def eval_source(self) -> DataSource:
        return dataclasses.replace(self.sources()[0], path=self.eval_path, format="auto", weight=1.0)


@dataclass(frozen=True)
class TrainConfig:
    objective: Objective = "sft"
    """sft (next-token loss on the targets), dpo (pairs; see `dpo:`), orpo (pairs; see `orpo:`) or kto (completions
    labelled desirable or not, or pairs; see `kto:`)."""
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; grad_accum_steps follows from it and the world size (a job
    requeued onto fewer nodes keeps its batch). 0: micro_batch_size x grad_accum_steps x data-parallel ranks."""
    lr: float = 2e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
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
    loraplus_lr_ratio: float = 0.0
    """LoRA+: the adapters' B matrices learn at lr x this ratio (16 in its paper), in an optimizer group of their
    own that every strategy keeps; 0: one learning rate for all."""
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
    mixed_precision: MixedPrecision = "auto"
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
    offload: Offload = "none"
    """What lives in host RAM between uses: none, optimizer (the adapter's gradients, master copies and optimizer
    states; ZeRO's offload_optimizer) or params (the frozen 4-bit base and the adapters too, with the optimizer
    state). Each strategy offers some of these; `qlaunch plan` says which fit."""

    def rules(self, at: str) -> list[Rule]:
        positive = ("micro_batch_size", "grad_accum_steps", "epochs", "log_interval")
        return [
            (getattr(self, k) > 0, f"`{at}{k}` must be a positive integer, got {getattr(self, k)}.") for k in positive
        ] + [
            (
                self.loraplus_lr_ratio >= 0,
                f"`{at}loraplus_lr_ratio` must be 0 (off) or positive, got {self.loraplus_lr_ratio}.",
            ),
            (
                self.global_batch_size >= 0,
                f"`{at}global_batch_size` must be 0 (micro batch x accumulation x ranks) or positive, got "
                f"{self.global_batch_size}.",
            ),
            (
                self.global_batch_size == 0 or self.grad_accum_steps == 1,
                f"Set `{at}global_batch_size` or `{at}grad_accum_steps`, not both: the accumulation follows from the "
                f"global batch ({self.global_batch_size}), the micro batch and the world size.",
            ),
            (self.max_steps >= 0, f"`{at}max_steps` must be 0 (use epochs) or positive, got {self.max_steps}."),
            (self.warmup_steps >= 0, f"`{at}warmup_steps` must be >= 0, got {self.warmup_steps}."),
            (
                self.loss_chunk_tokens >= 0,
                f"`{at}loss_chunk_tokens` must be 0 (the model's own loss) or positive, got {self.loss_chunk_tokens}.",
            ),
            (
                self.sequence_parallel >= 1,
                f"`{at}sequence_parallel` must be a positive number of ranks per sequence, got {self.sequence_parallel}.",
            ),
            (self.lr > 0, f"`{at}lr` must be positive, got {self.lr}."),
            (self.eval_every_steps >= 0, f"`{at}eval_every_steps` must be >= 0, got {self.eval_every_steps}."),
        ]

    def for_world(self, world: int) -> TrainConfig:
        """This section for a run of `world` ranks: a global batch becomes the accumulation that makes it."""
        size = self.global_batch_size
        if not size:
            return self
        data_world = world // self.sequence_parallel
        per_pass = self.micro_batch_size * data_world
        if size % per_pass:
            fix = (
                f"a micro_batch_size that divides {size // data_world}"
                if size % data_world == 0
                else f"a number of data-parallel ranks that divides {size}"
            )
            raise ConfigError(
                f"`train.global_batch_size` {size} is not a multiple of micro_batch_size {self.micro_batch_size} x "
                f"{data_world} data-parallel ranks ({per_pass} samples per pass): choose {fix}."
            )
        return dataclasses.replace(self, global_batch_size=0, grad_accum_steps=size // per_pass)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are removed only after a newer one is complete."""

    def rules(self, at: str) -> list[Rule]:
        return [
            (
                self.every_steps >= 0,
                f"`{at}every_steps` must be 0 (only at the end) or positive, got {self.every_steps}.",
            ),
            (self.keep_last >= 1, f"`{at}keep_last` must be at least 1 (the latest checkpoint), got {self.keep_last}."),
        ]


@dataclass(frozen=True)
class DistConfig:
    timeout_s: int = 1800
    """Collective timeout: a rank that stops taking part (hung or gone) fails the run after this many seconds."""
    rendezvous_timeout_s: int = 600
    """How long the nodes of a run wait for each other at start (head unreachable, port taken, a node that never starts)."""
    preempt_exit_code: int = 85
    """Exit status of a run stopped by SIGUSR2 or SIGTERM after a complete checkpoint; the slurm/ scripts requeue on it."""

    def rules(self, at: str) -> list[Rule]:
        seconds = ("timeout_s", "rendezvous_timeout_s")
        return [
            (getattr(self, k) > 0, f"`{at}{k}` must be a positive number of seconds, got {getattr(self, k)}.")
            for k in seconds
        ] + [
            (
                3 <= self.preempt_exit_code <= 125,
                f"`{at}preempt_exit_code` must be in 3..125 (1 and 2 mean errors, above 125 the shell's own), "
                f"got {self.preempt_exit_code}.",
            )
        ]


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    strategy: str = ""
    """fsdp2, fsdp1, zero2, zero3 or ddp; empty means: follow the accelerate config (fsdp2 if none)."""
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    resume: str = ""
    """"auto" (the latest complete checkpoint in output_dir, else start fresh), a checkpoint path, or empty."""

    def __post_init__(self) -> None:
        if self.strategy and (unknown := unknown_strategy(self.strategy)):
            raise unknown
        check_section(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rules(self, at: str) -> list[Rule]:
        against_reference = self.train.objective == "kto" or (
            self.train.objective == "dpo" and self.dpo.loss_type != "simpo"
        )
        return [
            (
                not (self.lora.init in FROM_WEIGHTS and against_reference),
                f"`lora.init: {self.lora.init}` with `train.objective: {self.train.objective}`: the reference is the "
                "model with the adapter switched off, which is not the model training starts from when the adapters "
                "start non-zero (the residual base PiSSA and OLoRA leave; LoftQ's quantized base without its "
                "correction). Use lora.init default or gaussian, or an objective without a reference (orpo, dpo's "
                "simpo).",
            )
        ]


@functools.cache
def _choices(cls: type) -> dict[str, tuple[str, ...]]:
    """The choice fields of a section and the texts each accepts."""
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(tp) for name, tp in hints.items() if typing.get_origin(tp) is Literal}


def check_section(section: Any, at: str = "") -> None:
    """Every rule of `section` and of the sections inside it, in field order; the first broken one is raised."""
    for f in dataclasses.fields(section):
        value, where = getattr(section, f.name), f"{at}{f.name}"
        choices = _choices(type(section)).get(f.name)
        if choices and value not in choices:
            raise ConfigError(f"`{where}` is `{value}`; use {spoken_choices(choices)}.")
        if dataclasses.is_dataclass(value):
            check_section(value, f"{where}.")
        for i, item in enumerate(value if isinstance(value, list) else ()):
            if dataclasses.is_dataclass(item):
                check_section(item, f"{where}[{i}].")
    for ok, message in section.rules(at) if hasattr(section, "rules") else ():
        if not ok:
            raise ConfigError(message)


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
        set_dotted(tree, key, value)
    return build(RunConfig, tree)


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
