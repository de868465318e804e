"""The run config: YAML + overrides onto one typed object, and clear errors for bad keys and values."""

import dataclasses
import typing

import pytest

from launcher import config
from launcher.config import (
    ConfigError,
    DataConfig,
    DataSource,
    QuantConfig,
    RunConfig,
    TrainConfig,
    load_config,
    parse_overrides,
)


def test_yaml_and_overrides_map_onto_the_typed_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  path: m\ntrain:\n  lr: 1e-4\n  max_steps: 5\nlora:\n  target_modules: [q_proj, v_proj]\n"
    )
    cfg = load_config(
        path, parse_overrides(["--train.lr", "3e-3", "--lora.r=8", "--strategy", "zero3", "--data.max-seq-len", "128"])
    )
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 3e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 5
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.strategy == "zero3"
    assert cfg.data.max_seq_len == 128
    assert cfg.lora.alpha == RunConfig().lora.alpha  # untouched keys keep their defaults


def test_unknown_key_names_the_key_and_suggests_the_fix():
    with pytest.raises(ConfigError, match=r"Unknown config key `train.learning_rat`.*Did you mean `train.lr`"):
        load_config(None, [("train.learning_rat", 1.0)])
    with pytest.raises(ConfigError, match=r"Did you mean `lora`"):
        load_config(None, [("lorra.r", 4)])


def test_wrong_type_is_rejected_with_the_expected_type():
    with pytest.raises(ConfigError, match=r"`lora.r` must be int, got 'eight'"):
        load_config(None, parse_overrides(["--lora.r", "eight"]))
    with pytest.raises(ConfigError, match=r"`train.gradient_checkpointing` must be bool"):
        load_config(None, [("train.gradient_checkpointing", "maybe")])


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="Expected an override"):
        parse_overrides(["train.lr", "1"])


def test_no_stays_a_word_where_the_option_is_a_word(tmp_path):
    """YAML 1.1 reads `no` as False; `train.mixed_precision: no` (YAML or command line) still means "no"."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, parse_overrides(["--train.mixed_precision", "no"])).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"`train.mixed_precision` must be one of auto, no, bf16 or fp16, got True"):
        load_config(None, parse_overrides(["--train.mixed_precision", "yes"]))


def test_every_value_rule_holds_for_a_config_built_in_code_too():
    """The rules live with the sections: a RunConfig made in code (or with dataclasses.replace) meets them."""
    with pytest.raises(ConfigError, match=r"`train.max_steps` must be 0 \(use epochs\) or positive, got -1"):
        RunConfig(train=TrainConfig(max_steps=-1))
    with pytest.raises(ConfigError, match=r"`data.datasets\[1\].weight` must be positive, got 0"):
        RunConfig(data=DataConfig(datasets=[DataSource(path="a"), DataSource(path="b", weight=0)]))
    with pytest.raises(ConfigError, match=r"`quant.storage_dtype` is `int8`; use one of auto, bfloat16, float16"):
        dataclasses.replace(RunConfig(), quant=QuantConfig(storage_dtype="int8"))
    with pytest.raises(ConfigError, match=r"`checkpoint.keep_last` must be at least 1"):
        load_config(None, [("checkpoint.keep_last", 0)])
    with pytest.raises(ConfigError, match=r"Unknown strategy `zero4`. Choose one of: fsdp2, fsdp1"):
        RunConfig(strategy="zero4")
    # The edges of the rules are accepted, and a config built in code equals the one the command line loads.
    edge = RunConfig(strategy="", train=TrainConfig(max_steps=0))
    assert edge == load_config(None, [("strategy", ""), ("train.max_steps", 0)])


def test_the_config_names_what_the_registry_and_dtypes_hold():
    """config keeps the names for what must not import torch (bench/gpu.py); they are the live ones."""
    from launcher import dtypes, strategies

    assert config.STRATEGIES == strategies.NAMES
    assert strategies.OFFLOAD_MODES == ("none", "optimizer", "params")
    assert tuple(dtypes.DTYPE_BY_NAME) == config.DTYPES
    assert set(dtypes.AUTOCAST_DTYPES) | {"auto", "no"} == set(typing.get_args(config.MixedPrecision))
    for strategy in strategies.NAMES:
        assert set(strategies.get(strategy).spec.offload_modes) <= set(strategies.OFFLOAD_MODES)


def test_a_global_batch_becomes_the_accumulation_for_the_world_size():
    """A requeued job on fewer nodes keeps its global batch: the accumulation follows the ranks."""
    train = TrainConfig(micro_batch_size=2, global_batch_size=8)
    assert [(t.grad_accum_steps, t.global_batch_size) for t in map(train.for_world, (1, 2, 4))] == [
        (4, 0),
        (2, 0),
        (1, 0),
    ]
    split = dataclasses.replace(train, sequence_parallel=2)
    assert split.for_world(4).grad_accum_steps == 2  # 2 data-parallel groups of 2 ranks
    assert TrainConfig(grad_accum_steps=3).for_world(2).grad_accum_steps == 3  # no global batch: as given
    with pytest.raises(ConfigError, match=r"micro_batch_size 2 x 8 data-parallel ranks \(16 samples per pass\)"):
        train.for_world(8)
    with pytest.raises(ConfigError, match=r"choose a number of data-parallel ranks that divides 8"):
        train.for_world(3)
    with pytest.raises(ConfigError, match=r"choose a micro_batch_size that divides 3"):
        TrainConfig(micro_batch_size=2, global_batch_size=6).for_world(2)
    with pytest.raises(ConfigError, match=r"not both"):
        RunConfig(train=TrainConfig(global_batch_size=8, grad_accum_steps=2))
    with pytest.raises(ConfigError, match=r"`train.global_batch_size` must be 0 .* got -4"):
        RunConfig(train=TrainConfig(global_batch_size=-4))
