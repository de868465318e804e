"""FSDP1's units: one dtype each, norms on their own, and a budget that matches FSDP2's.

FSDP1 flattens each unit into one tensor of one dtype. The launcher wraps each decoder layer, each
LoRA matrix and every module whose weights' dtype differs from the rest of its layer; these tests
check that rule on every family's model as the budget builds it (training builds the same tree:
the matrix compares both to the byte), with and without mixed precision.
"""

import json

import pytest
import torch

from launcher import cli, strategies
from launcher.config import load_config
from launcher.memory.predict import resolve_quant
from launcher.memory.skeleton import describe_model
from launcher.model.build import read_model_config
from launcher.strategies.fsdp1 import unit_of
from support.families import FAMILIES

FSDP1 = strategies.get("fsdp1")
RUNNABLE = [f for f in FAMILIES if "fsdp1" not in f.refused]


@pytest.mark.parametrize("mixed", ["bf16", "no"])
@pytest.mark.parametrize("family", [f.name for f in RUNNABLE])
def test_every_unit_holds_one_dtype_and_the_packed_data_keeps_the_compute_dtype(family, mixed, family_assets):
    cfg = load_config(None, [("model.path", str(family_assets(family) / "base")), ("strategy", "fsdp1")])
    cfg = resolve_quant(cfg, FSDP1, mixed, "cuda")  # the dtypes of a GPU run
    policy = strategies.dtype_policy(cfg.quant, FSDP1, mixed)
    tensors = describe_model(cfg, policy, read_model_config(cfg.model.path, False)).tensors
    unit = unit_of(tensors)
    dtypes: dict[str, set] = {}
    for t in tensors:
        dtypes.setdefault(unit[t.name], set()).add(t.dtype)
    assert all(len(found) == 1 for found in dtypes.values()), dtypes
    # The packed 4-bit data is stored as the compute dtype (a cast to it changes no bit), in its layer's unit,
    # or in a unit of its own where the module above it holds another dtype (gpt-oss's fp32 attention sinks).
    packed = [t for t in tensors if t.component == "base_4bit"]
    assert packed and all(t.dtype == torch.bfloat16 and unit[t.name] in (t.layer, t.module) for t in packed)
    # (gpt-oss's attention holds fp32 sinks, Qwen3-Next's linear attention and Falcon-H1's Mamba fp32 decay terms).
    own = {t.module for t in packed if unit[t.name] == t.module}
    units_of_other_dtype = {unit for unit, found in dtypes.items() if found != {torch.bfloat16}}
    assert all(any(m.startswith(u + ".") for u in units_of_other_dtype if u) for m in own), own
    # fp32 norms sit beside it in their own units, or inside a unit of fp32 weights made for others (Jamba's Mamba
    # mixer, whose decay terms are fp32, holds its dt/B/C norms); each LoRA matrix is a unit.
    norms = [t for t in tensors if t.component == "norms" and t.layer]
    assert norms and all(t.dtype == torch.float32 for t in norms)
    assert all(unit[t.name] == t.module or dtypes[unit[t.name]] == {torch.float32} for t in norms)
    assert all(unit[t.name] == t.module for t in tensors if t.trainable)
    # A tied embedding is one parameter, in the root unit beside the rest of the root's weights.
    assert all(unit[t.name] == "" for t in tensors if "embed_tokens" in t.name)


def test_fsdp1_needs_what_fsdp2_needs_for_llama_2_7b(tmp_path, capsys):
    """The issue's example: Llama-2-7B, LoRA r=64, 1 x 2048 on 2 ranks (it was 8.06 GiB vs 6.46 GiB)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    totals = {}
    for strategy in ("fsdp1", "fsdp2"):
        args = ["budget", "--model", str(tmp_path / "config.json"), "--world-size", "2", "--seq-len", "2048"]
        assert cli.main([*args, "--lora-r", "64", "--gpu-memory", "24GiB", "--strategy", strategy, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["mixed_precision"] == "bf16"
        totals[strategy] = max(r["total_bytes"] for r in report["ranks"])
        components = report["ranks"][0]["components"]
        # Embeddings and lm_head in bf16: 2 x 32000 x 4096 x 2 bytes, half on each rank.
        assert components["frozen_dense"] == 32000 * 4096 * 2
    assert abs(totals["fsdp1"] - totals["fsdp2"]) <= 0.10 * totals["fsdp2"], totals
