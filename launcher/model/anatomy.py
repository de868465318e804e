"""What a causal LM is made of: where its decoder layers are, and what each of its frozen parameters is."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from . import experts


def decoder_layers(model: nn.Module) -> list[str]:
    """Paths of the decoder layers: the modules of the classes the model declares unsplittable, but the one that
    holds the input embeddings (BERT-style families list their embeddings module too; its table is tied to the
    output layer, which belongs to the root)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = set(getattr(base, "_no_split_modules", None) or ())
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    return [
        name
        for name, module in model.named_modules()
        if type(module).__name__ in classes and not any(m is embeddings for m in module.modules())
    ]


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def frozen_component(module: nn.Module, name: str, param: torch.Tensor) -> str:
    """What a base parameter is, as the dtype policy and the memory budget name it."""
    if isinstance(module, bnb.nn.Linear4bit):
        return "base_4bit" if name == "weight" else "biases"
    if experts.is_packed_expert(module):
        return "base_4bit"
    if is_norm(module):
        return "norms"
    if name.endswith("_bias") and param.dim() == 2:  # gpt-oss's expert biases, one row per expert
        return "biases"
    if experts.is_expert_parameter(module, name, param):
        return "experts"
    return "frozen_dense"


def parameter_component(module: nn.Module, name: str, param: nn.Parameter) -> str:
    """What any parameter is as the memory budget names it: a trained one `lora`, a frozen one `frozen_component`'s."""
    return "lora" if param.requires_grad else frozen_component(module, name, param)
