"""Any causal-LM family transformers ships, shrunk to a few hundred thousand weights from its own config class.

transformers' per-model test configs are not part of the package, so the shrinking is generic: the widths,
head counts, expert counts and vocabulary every config names (under whichever of the usual names it uses)
are set small where the class's defaults have them, and the layer count is the smallest that keeps every
distinct kind of layer the default config builds (a hybrid's attention and SSM layers, a MoE family's
dense first layers), with per-layer lists cut to match. A family whose shrunk config does not build says
why (`TinyConfigError`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

SMALL = {
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "max_seq_len": 256,
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "embedding_size": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "ffn_hidden_size": 128,
    "n_inner": 128,
    "num_attention_heads": 4,
    "n_head": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "kv_channels": 16,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "shared_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 16,
    "index_topk": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "mamba_d_state": 16,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_chunk_size": 16,
    "mamba_n_groups": 1,
    "mamba_d_ssm": 128,
    "state_size": 16,
    "time_step_rank": 8,
    "mamba_dt_rank": 8,
    "chunk_size": 16,
    "sliding_window": 16,
    "sliding_window_size": 16,
    "attention_window_size": 16,
    "rotary_dim": 8,
    "query_pre_attn_scalar": 16,
    "attention_hidden_size": 64,
    "swa_num_attention_heads": 4,
    "swa_head_dim": 16,
    "vocab_size_per_layer_input": 512,
    "hidden_size_per_layer_input": 16,
}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
SET_WHEN_NONE = {"head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts"}
"""Widths a config class leaves None by default although its model needs them (a checkpoint's config names them);
other None defaults (a sliding window, an expert count) mean the feature is off and stay so."""
OVERRIDES = {
    # Widths the generic names do not reach: Mamba-2's heads x head width must be its inner width.
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    # No default layer pattern: a convolution and an attention layer.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "dots1": {"n_shared_experts": 1},
    # Its attention reads the input and the embeddings side by side: twice the hidden width.
    "zamba2": {"attention_hidden_size": 128},
}
MAX_WEIGHTS = 20_000_000
"""A shrunk family above this still has a width the generic names missed: it is not run on the CPU."""


class TinyConfigError(Exception):
    """The family has no small config that builds (the reason is the message)."""


def meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


def tiny_config(model_type: str):
    """A small config of `model_type`'s config class (a TinyConfigError if there is none)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        config = _shrink(cls, cls())
        weights = sum(p.numel() for p in meta_model(config).parameters())
    except Exception as error:  # noqa: BLE001 - any failure of a third-party config is the reason
        raise TinyConfigError(f"{type(error).__name__}: {str(error).splitlines()[0][:160]}") from error
    if weights > MAX_WEIGHTS:
        raise TinyConfigError(f"shrunk to {weights / 1e6:,.0f}M weights only: a width the shrinking does not know")
    return config


def _shrink(cls, default):
    raw = default.to_dict()
    names = set(raw) | set(getattr(cls, "attribute_map", {}))
    kwargs = {
        k: v for k, v in SMALL.items() if k in names and (k in SET_WHEN_NONE or _default(default, raw, k) is not None)
    }
    # A width given per layer (Gemma-3n's intermediate sizes) is small in every layer.
    kwargs.update(
        {k: [v] * len(raw[k]) for k, v in kwargs.items() if isinstance(raw.get(k), list) and isinstance(v, int)}
    )
    kwargs.update({k: v for k, v in TOKENS.items() if k in names})
    if "qk_rope_head_dim" in kwargs:  # multi-head latent attention: head_dim is the rotary width
        kwargs.update(
            head_dim=kwargs["qk_rope_head_dim"],
            qk_head_dim=kwargs["qk_rope_head_dim"] + kwargs.get("qk_nope_head_dim", 0),
            num_key_value_heads=kwargs.get("num_attention_heads"),  # latent attention expands to every head
        )
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    kwargs.update(OVERRIDES.get(default.model_type, {}))
    if "is_decoder" in names:  # encoder families' causal-LM heads run as decoders only
        kwargs["is_decoder"] = True
    for key in getattr(cls, "sub_configs", None) or {}:
        sub = getattr(default, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[key] = _shrink(type(sub), sub).to_dict()
    kwargs.update(_layers(default, {**raw, **kwargs}))
    return cls(**kwargs)


def _default(default, raw: dict, key: str):
    try:
        return getattr(default, key, raw.get(key))
    except Exception:  # noqa: BLE001 - a per-layer attribute (Gemma-4's head_dim) refuses a global read: it is set
        return raw.get(key, True)


def _layers(default, raw: dict) -> dict:
    """The layer count that keeps every kind of layer of `default`, and its per-layer lists cut to it."""
    key = next((k for k in LAYER_COUNTS if isinstance(getattr(default, k, None), int)), None)
    if key is None:
        return {}
    count = getattr(default, key)
    keep = min(count, max(2, _layers_with_every_kind(default, count)))
    cut = {k: v[:keep] for k, v in raw.items() if isinstance(v, (list, str)) and len(v) == count and count > 1}
    return {key: keep, **cut}


def _layers_with_every_kind(default, count: int) -> int:
    try:
        model = meta_model(default)
    except Exception:  # noqa: BLE001 - the defaults may not build; the shrunk config then says why
        return 2
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not lists:
        return 2
    kinds = [frozenset((name, type(m).__name__) for name, m in layer.named_modules()) for layer in lists[0]]
    return next(k for k in range(1, count + 1) if set(kinds[:k]) == set(kinds))
