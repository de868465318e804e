"""Typed, frozen dataclasses from YAML trees: each value checked against its field's type with the fix in the
message, unknown keys answered with a did-you-mean, and `--section.key value` overrides parsed as YAML.

Choice fields (`Literal`) are read as text here; which texts they accept is checked with the rest of a
section's rules (`launcher.config`), so a config built in code meets the same rule as one read from a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A problem with the user's input, with the fix in the message."""


def spoken_choices(choices: tuple[str, ...]) -> str:
    """`a`, `a or b`, `a, b or c`, `one of a, b, c or d`."""
    if len(choices) == 1:
        return choices[0]
    listed = f"{', '.join(choices[:-1])} or {choices[-1]}"
    return f"one of {listed}" if len(choices) > 3 else listed


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return spoken_choices(typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
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
    elif typing.get_origin(tp) is dict:
        if isinstance(value, dict):
            key_type, value_type = typing.get_args(tp)
            return {
                _coerce(k, key_type, f"{where} key"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()
            }
    elif dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, f"{where}.")
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
    elif (
        (tp is str or typing.get_origin(tp) is Literal)
        and isinstance(value, (str, int, float))
        and not isinstance(value, bool)
    ):
        return str(value)
    elif (tp is str or typing.get_origin(tp) is Literal) and value is False:
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


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
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


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
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
