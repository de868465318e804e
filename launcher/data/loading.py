"""The tokenizer and the rows a run trains and evaluates on, checked to fill at least one optimizer step."""

from __future__ import annotations

from ..config import ConfigError, DataConfig, ModelConfig, TrainConfig
from .batches import Rows
from .images import PixelBatch, VisionProcessor, load_processor
from .tokenized import load_tokenized


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except OSError as error:  # a missing directory, or a hub id not in the local cache
        raise ConfigError(
            f"Cannot read a tokenizer from `{model.path}`: {error}. Set `model.path` to a directory written by "
            "`save_pretrained` (or a hub id in the local cache)."
        ) from error
    return pad_token_set(tokenizer)


def pad_token_set(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_vision_processor(model: ModelConfig) -> VisionProcessor | None:
    """A vision-language model's processor (None for a causal LM, or where no model config is found: the tokenizer
    then says what is missing, and `qlaunch data` needs no more than a tokenizer)."""
    from transformers import AutoConfig

    from ..vision import is_vision_language

    try:
        config = AutoConfig.from_pretrained(
            model.path, trust_remote_code=model.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError):
        return None
    return load_processor(model.path, model.trust_remote_code, config) if is_vision_language(config) else None


def check_images(data: DataConfig, train: TrainConfig, tables: list) -> None:
    """Image samples train unpacked and whole on each rank: a ConfigError naming the option otherwise."""
    if not any("images" in table.column_names for table in tables):
        return
    for on, option, why in (
        (data.packing, "data.packing false", "an image's tokens and the rotary positions some families give them"),
        (train.sequence_parallel > 1, "train.sequence_parallel 1", "the vision encoder's output to every part"),
    ):
        if on:
            raise ConfigError(
                f"The data holds image chat records, which this launcher does not pack or split across ranks yet "
                f"({why} would have to follow): set {option}."
            )


def load_training_data(model: ModelConfig, data: DataConfig, train: TrainConfig, world: int):
    """The tokenizer and the rows to train on (and to evaluate on, or None), in the shape `train.objective` trains
    on, checked to fill at least one optimizer step of a run of `world` ranks."""
    vision = load_vision_processor(model)
    tokenizer = load_tokenizer(model) if vision is None else pad_token_set(vision.tokenizer)
    train_data, eval_data = load_tokenized(data, tokenizer, train.seed, train.objective, vision)
    splits = [d for d in (train_data, eval_data) if d is not None]
    check_images(data, train, [source.table for d in splits for source in d.sources])
    pixels = PixelBatch(vision) if vision is not None else None
    rows = Rows(train_data, data.packing, data.max_seq_len, pixels)
    train = train.for_world(world)
    data_world = world // train.sequence_parallel
    global_batch = train.micro_batch_size * train.grad_accum_steps * data_world
    if len(rows) < global_batch:
        dropped = ", ".join(f"{s.dropped} of {s.records} in `{s.source.path}`" for s in train_data.sources)
        raise ConfigError(
            f"The training data makes {len(rows)} rows (records dropped, with no target token within "
            f"data.max_seq_len={data.max_seq_len}: {dropped}), but one optimizer step needs {global_batch} "
            f"(micro_batch_size {train.micro_batch_size} x grad_accum_steps {train.grad_accum_steps} x "
            f"{data_world} data-parallel ranks). Add data or lower the batch settings."
        )
    eval_rows = Rows(eval_data, data.packing, data.max_seq_len, pixels) if eval_data is not None else None
    return tokenizer, rows, eval_rows
