"""Vision-language models: an image-text-to-text model whose language model is trained like a causal LM.

transformers 5 builds them through `AutoModelForImageTextToText` (Qwen2-VL, Gemma 3, LLaVA, ...): one inner model
holding the vision encoder, the projector that maps its features into the language model's embeddings, and the
language model; the output layer beside it. Here the language model is quantized and adapted as any causal LM; the
vision parts (every child of the inner model but the language model) stay 16-bit and frozen unless
`model.quantize_vision` / `lora.adapt_vision` say otherwise: quantizing them costs accuracy and saves little (they
are a few percent of the weights), and most recipes adapt the language model only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether `config` is of an image-text-to-text model (it has a vision config and transformers maps it to one)."""
    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return getattr(config, "vision_config", None) is not None and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def auto_class(config: PretrainedConfig):
    """The transformers auto class that builds the trained model of `config`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def vision_parts(model: nn.Module) -> list[str]:
    """Full names of the modules of a vision-language model outside its language model and output layer (the
    vision encoder, the projector); none for a causal LM."""
    if not is_vision_language(model.config):
        return []
    inner, language = model.base_model, model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is inner)
    return [f"{prefix}.{name}" if prefix else name for name, child in inner.named_children() if child is not language]


def in_vision_part(name: str, parts: list[str]) -> bool:
    return any(name == part or name.startswith(part + ".") for part in parts)


def unquantized_vision(model: nn.Module, quantize_vision: bool) -> list[str]:
    """The patterns (bitsandbytes' `llm_int8_skip_modules`) that keep the vision parts 16-bit."""
    return [] if quantize_vision else [re.escape(part) for part in vision_parts(model)]


TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")
"""Per-token inputs some families take beside the ids, 1 where a token is an image's (Gemma 3's bidirectional
attention over an image, Qwen2-VL's multimodal rotary positions)."""
TEXT_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", *TOKEN_TYPE_INPUTS)


def _tuples(values):
    return tuple(_tuples(v) for v in values) if isinstance(values, list) else values


@dataclass(frozen=True)
class ImageInputs:
    """A micro batch's image inputs as the budget's traced forward takes them: float inputs (pixels) by shape and
    dtype, made as fake tensors; integer ones by value (Qwen2-VL's `image_grid_thw` decides what its vision encoder
    computes); the image tokens of each row and the per-token marks the model takes."""

    floats: tuple[tuple[str, tuple[int, ...], str], ...]
    integers: tuple[tuple[str, tuple], ...]
    row_tokens: tuple[int, ...]
    token_id: int
    marks: tuple[str, ...]

    @classmethod
    def of(cls, batch: dict, token_id: int) -> ImageInputs | None:
        """The image inputs of a collated micro batch (None: it has none)."""
        inputs = {k: v for k, v in batch.items() if k not in TEXT_INPUTS and torch.is_tensor(v)}
        if not inputs:
            return None
        return cls(
            floats=tuple(
                (k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                for k, v in inputs.items()
                if v.is_floating_point()
            ),
            integers=tuple((k, _tuples(v.tolist())) for k, v in inputs.items() if not v.is_floating_point()),
            row_tokens=tuple((batch["input_ids"] == token_id).sum(-1).tolist()),
            token_id=token_id,
            marks=tuple(k for k in TOKEN_TYPE_INPUTS if k in batch),
        )

    def forward_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Puts each row's image tokens first in `ids` (in place) and gives the image inputs to go with them, made
        on `ids`' device (a fake one, in the trace)."""
        for row, count in enumerate(self.row_tokens):
            ids[row, :count] = self.token_id
        inputs = {
            k: torch.zeros(shape, dtype=getattr(torch, dtype), device=ids.device) for k, shape, dtype in self.floats
        }
        inputs.update({k: _constant(torch.tensor(values), ids) for k, values in self.integers})
        return inputs | {k: (ids == self.token_id).long() for k in self.marks}


def _constant(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` on `like`'s device; where `like` is a fake tensor, a fake one that keeps its values, which the fake mode
    computes with for real (what Qwen2-VL's vision encoder derives from `image_grid_thw` sizes its tensors)."""
    mode = getattr(like, "fake_mode", None)
    if mode is None:
        return values.to(like.device)
    return mode.fake_tensor_converter.from_real_tensor(mode, values.to(like.device), make_constant=True)
