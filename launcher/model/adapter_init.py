"""`lora.init_from`: training continues a PEFT adapter (one this launcher exported, or any PEFT LoRA adapter).

Its LoRA settings replace the run's (rank, alpha, the modules and parameters it adapts), before anything is
checked or built, so the run's config file records what trains; its weights are loaded into the source rank's
model after the adapters are attached, and reach every rank as the source rank's initialization does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..config import ConfigError, LoraConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adopted(lora: LoraConfig) -> LoraConfig:
    """`lora` with the settings of the adapter at `lora.init_from` (unchanged without one)."""
    if not lora.init_from:
        return lora
    config = adapter_config(lora.init_from)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise ConfigError(
            f"`lora.init_from`: {lora.init_from} is not a plain LoRA adapter (peft_type {config.get('peft_type')}, "
            "DoRA or modules_to_save): this launcher continues LoRA adapters only."
        )
    targets = config.get("target_modules") or []
    return dataclasses.replace(
        lora,
        r=int(config["r"]),
        alpha=int(config["lora_alpha"]),
        target_modules=sorted(targets) if isinstance(targets, (list, set)) else targets,
        target_parameters=sorted(config.get("target_parameters") or []),
        use_rslora=bool(config.get("use_rslora")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )


def adapter_config(path: str) -> dict:
    folder = Path(path)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"`lora.init_from` is `{path}`, which has no {' and no '.join(missing)}. Point it at a PEFT adapter "
            "directory (a run's `adapter/`, or what `qlaunch export` wrote)."
        )
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"`lora.init_from`: {folder / CONFIG_FILE} is not valid JSON ({error}).") from error


def load_adapter_weights(model: nn.Module, path: str) -> None:
    """The adapter's weights into `model` (a PEFT model of the same adapters); every one must land."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / WEIGHTS_FILE))
    result = set_peft_model_state_dict(model, state)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(n for n in result.missing_keys if n in expected)
    if result.unexpected_keys or missing:
        raise ConfigError(
            f"`lora.init_from`: the weights in {path} do not fit this model's adapters (not loaded: "
            f"{sorted(result.unexpected_keys)[:3]}; left as initialized: {missing[:3]}). Was it trained on this base?"
        )
