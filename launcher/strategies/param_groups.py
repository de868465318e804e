"""The optimizer's parameter groups over the adapters: one, or with LoRA+ (`train.loraplus_lr_ratio`) two, the B
matrices learning at lr x ratio. A parameter's group follows from its name, so a strategy that points the groups at
the wrapped parameters itself (FSDP2: every rank but the source holds meta parameters, which Accelerate cannot tell
apart) puts each one back in its own group; the others keep the groups as torch and DeepSpeed shard them."""

from __future__ import annotations

import re

import torch
from torch import nn

LORA_B = re.compile(r"\.lora_(embedding_)?B\.")


def group_index(name: str, groups: int) -> int:
    """The group of the trainable parameter `name` among `groups` (1, or 2 with LoRA+)."""
    return 1 if groups == 2 and LORA_B.search(name) else 0


def parameter_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float) -> list[dict]:
    """AdamW's parameter groups over `model`'s trainable parameters."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = 2 if loraplus_lr_ratio else 1
    built = [{"params": [p for name, p in named if group_index(name, groups) == g]} for g in range(groups)]
    if loraplus_lr_ratio:
        built[1]["lr"] = lr * loraplus_lr_ratio
    return built


def regroup(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], trainable: list[str]) -> None:
    """Points each group of `optimizer` at the parameters of its names (`trainable`, in the model's order)."""
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        group["params"] = [params[name] for name in trainable if group_index(name, len(groups)) == index]
