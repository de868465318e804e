"""Adapter variants reach peft as asked: rsLoRA's scaling, rank and alpha patterns, LoRA+'s optimizer groups; a
pattern naming no adapted module is refused before launch (launcher/model/lora_targets.py)."""

import math

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from launcher.config import ConfigError, LoraConfig, ModelConfig
from launcher.model import targets
from launcher.model.lora_targets import check_lora_targets
from launcher.strategies.param_groups import group_index, parameter_groups
from support.tiny_configs import meta_model, tiny_config


def adapted(family: str, lora: LoraConfig):
    model = meta_model(tiny_config(family))
    return get_peft_model(model, targets.peft_lora_config(model, lora))


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_rank_and_alpha_patterns_and_rslora_reach_every_adapted_module(family):
    lora = LoraConfig(
        r=8, alpha=16, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.0\.self_attn\.v_proj": 2}
    )
    layers = {name: m for name, m in adapted(family, lora).named_modules() if isinstance(m, LoraLayer)}
    assert layers
    for name, layer in layers.items():
        rank = 4 if name.endswith("q_proj") else 8
        alpha = 2 if name.endswith("layers.0.self_attn.v_proj") else 16
        assert layer.r["default"] == rank, name
        assert layer.lora_A["default"].weight.shape[0] == rank, name
        assert layer.scaling["default"] == pytest.approx(alpha / math.sqrt(rank)), name


@pytest.mark.parametrize("option", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_naming_no_adapted_module_is_refused(option):
    model = meta_model(tiny_config("llama"))
    lora = LoraConfig(target_modules=["q_proj", "v_proj"], **{option: {"up_proj": 4}})
    with pytest.raises(ConfigError, match=rf"`lora.{option}` names `up_proj`, which matches no module this run"):
        check_lora_targets(lora, ModelConfig(path="tiny"), model)
    check_lora_targets(LoraConfig(target_modules=["q_proj", "v_proj"], **{option: {"v_proj": 4}}), ModelConfig(), model)


def test_loraplus_puts_the_b_matrices_in_their_own_group_at_ratio_times_the_rate():
    model = adapted("llama", LoraConfig(r=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    plain = parameter_groups(model, 1e-4, 0.0)
    assert len(plain) == 1 and len(plain[0]["params"]) == len(trainable)
    groups = parameter_groups(model, 1e-4, 16.0)
    names = {id(p): name for name, p in model.named_parameters()}
    assert [len(g["params"]) for g in groups] == [len(trainable) // 2] * 2
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert "lr" not in groups[0] and groups[1]["lr"] == pytest.approx(1.6e-3)
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1.6e-3])
    assert group_index("x.lora_embedding_B.default", 2) == 1 and group_index("x.lora_B.default.weight", 1) == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dora_magnitudes_are_made_on_meta_where_no_4bit_weight_is_held(family):
    """The ranks without weights (and the budget's skeleton) build DoRA's magnitude vectors on meta, one value per
    output feature of each adapted 4-bit linear; peft alone dequantizes a meta 4-bit weight there and fails."""
    import bitsandbytes as bnb
    from peft.tuners.lora.dora import DoraLinearLayer

    from launcher import strategies
    from launcher.config import RunConfig
    from launcher.memory.predict import resolve_quant
    from launcher.memory.skeleton import build_skeleton

    cfg = resolve_quant(
        RunConfig(model=ModelConfig(path=family), lora=LoraConfig(use_dora=True, rank_pattern={"o_proj": 4})),
        strategies.get("fsdp2"),
        "no",
        "cpu",
    )
    policy = strategies.dtype_policy(cfg.quant, strategies.get("fsdp2"), "no")
    model = build_skeleton(cfg, policy, tiny_config(family))
    layers = [
        m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)
    ]
    assert layers
    for layer in layers:
        magnitude = layer.lora_magnitude_vector["default"]
        assert isinstance(magnitude, DoraLinearLayer) and magnitude.weight.is_meta and magnitude.weight.requires_grad
        assert magnitude.weight.shape == (layer.get_base_layer().out_features,)
    assert DoraLinearLayer.update_layer.__name__ == "update_layer", "the meta-aware stand-in outlived the build"
