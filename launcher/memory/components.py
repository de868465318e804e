"""The components of a rank's memory, and which one each parameter belongs to (prediction and measurement alike)."""

from __future__ import annotations

from torch import nn

from ..model.anatomy import parameter_component
from ..strategies import clean_fqn
from ..strategies.layout import OPTIMIZER_STATE_COMPONENTS

COMPONENTS = {
    "base_4bit": "packed 4-bit base weights, MoE experts included (this rank's part)",
    "quant_states": "4-bit quantization constants: absmax, double-quant absmax and code, quant map (whole on every rank)",
    "frozen_dense": "unquantized frozen weights: embeddings, lm_head (once when tied), MoE routers",
    "experts": "MoE expert weights kept unquantized (`quant.experts: 16bit`); 4-bit experts count as base_4bit",
    "biases": "biases of the 4-bit linears (e.g. Qwen2's q/k/v)",
    "norms": "norm weights",
    "buffers": "module buffers (rotary frequencies)",
    "lora": "LoRA parameters",
    "shard_padding": "padding that makes shards equal or aligned",
    "gradients": "LoRA gradients, as the optimizer steps them",
    "master_weights": "copies of the LoRA parameters the optimizer updates (ZeRO)",
    "optimizer_states": "AdamW moments",
    "activations": "tensors saved for backward by one micro batch",
    "recompute": "one layer's activations recomputed in backward (checkpointing); with sequence parallelism, "
    "the all-to-all buffers of one layer's attention",
    "experts_dequantized": "one layer's 4-bit MoE experts dequantized while it runs or is recomputed (checkpointing)",
    "logits_backward": "one loss chunk in backward: its logits, fp32 log-probabilities and their gradients",
    "gathered_params": "parameters gathered from the other ranks while layers run (FSDP, ZeRO-3), prefetch included",
    "comm_buckets": "gradient communication buffers (DDP buckets, ZeRO reduce bucket, FSDP reduce-scatter input)",
    "runtime": "CUDA context, NCCL buffers and allocator slack (an allowance, --runtime-overhead)",
}
WEIGHT_COMPONENTS = (
    "base_4bit",
    "quant_states",
    "frozen_dense",
    "experts",
    "biases",
    "norms",
    "buffers",
    "lora",
    "shard_padding",
)
STATIC_COMPONENTS = WEIGHT_COMPONENTS + OPTIMIZER_STATE_COMPONENTS
ESTIMATED_COMPONENTS = ("gathered_params", "comm_buckets", "runtime")


def parameter_components(model: nn.Module) -> dict[str, str]:
    """Component of every parameter, by its name with wrapper prefixes removed."""
    return {
        clean_fqn(f"{module_name}.{name}" if module_name else name): parameter_component(module, name, param)
        for module_name, module in model.named_modules()
        for name, param in module.named_parameters(recurse=False)
    }
