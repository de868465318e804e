"""The tokenizer and the rows a run trains and evaluates on, checked to fill at least one optimizer step."""

from __future__ import annotations

from ..config import ConfigError, DataConfig, ModelConfig, TrainConfig
from .batches import Rows
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
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_training_data(model: ModelConfig, data: DataConfig, train: TrainConfig, world: int):
    """The tokenizer and the rows to train on (and to evaluate on, or None), in the shape `train.objective` trains
    on, checked to fill at least one optimizer step of a run of `world` ranks."""
    tokenizer = load_tokenizer(model)
    train_data, eval_data = load_tokenized(data, tokenizer, train.seed, train.objective)
    rows = Rows(train_data, data.packing, data.max_seq_len)
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
    eval_rows = Rows(eval_data, data.packing, data.max_seq_len) if eval_data is not None else None
    return tokenizer, rows, eval_rows
