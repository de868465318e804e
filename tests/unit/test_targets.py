"""`all-linear` decided by what modules are and do (launcher/model/targets.py), on families whose names mislead:
routers that derive from nn.Linear, gates, Mamba's projections, GPT-2's Conv1D, and MoE families whose dense and
shared-expert linears carry the names peft takes for fused experts."""

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from launcher.config import LoraConfig
from launcher.model import roles, targets
from support.tiny_configs import meta_model, tiny_config


def resolution(family: str):
    model = meta_model(tiny_config(family))
    return model, targets.resolve(model, LoraConfig())


def leaves(names) -> set[str]:
    return {name.rpartition(".")[2] for name in names}


@pytest.mark.parametrize(
    "family,left_out,why",
    [
        ("llama4_text", {"router"}, "router or gate"),  # derives from nn.Linear, returns a tuple
        ("phimoe", {"router"}, "router or gate"),
        ("afmoe", {"gate"}, "router or gate"),  # an nn.Linear whose output reaches a top-k through a sigmoid
        ("qwen2_moe", {"shared_expert_gate"}, "router or gate"),  # one sigmoid gate value per token
        ("falcon_h1", {"out_proj"}, "peft refuses it for this architecture"),  # Mamba kernels read the weight
        ("nemotron_h", {"out_proj"}, "peft refuses it for this architecture"),
        # The mixer multiplies by dt_proj's weight itself (in 4 bits, by its packed bytes).
        ("mamba", {"out_proj", "dt_proj"}, None),
        ("jamba", {"dt_proj"}, roles.READ_OUTSIDE),
        ("longcat_flash", {"classifier"}, roles.READ_OUTSIDE),  # its router reads the weight
        # DeepSeek-V3.2's sparse-attention indexer: its scores only pick the top-k keys, no gradient comes back.
        ("deepseek_v32", {"wq_b", "wk", "weights_proj"}, roles.NO_GRADIENT),
        ("glm_moe_dsa", {"wq_b", "wk", "weights_proj"}, roles.NO_GRADIENT),
    ],
)
def test_routers_gates_and_what_peft_refuses_are_left_out(family, left_out, why):
    model, found = resolution(family)
    assert leaves(found.left_out) == left_out, found.left_out
    assert why is None or set(found.left_out.values()) == {why}, found.left_out

    read_outside = {n for n, reason in found.left_out.items() if reason == roles.READ_OUTSIDE}
    assert leaves(read_outside) == ({"dt_proj"} if "dt_proj" in left_out else {"classifier"} & left_out)
    assert not leaves(found.targets) & left_out
    output = model.get_output_embeddings()
    assert all(model.get_submodule(name) is not output for name in found.targets)


def test_a_linear_that_is_not_a_plain_projection_is_left_out():
    """DeepSeek-V4's grouped output projection derives from nn.Linear but multiplies each head group by its own
    block: an adapter's `B(A(x))` has another shape than its output. Its compressor's indexer only picks keys."""
    model, found = resolution("deepseek_v4")
    grouped = {n for n, _ in model.named_modules() if n.endswith("self_attn.o_a_proj")}
    assert grouped and all(found.left_out[n] == roles.NOT_PLAIN for n in grouped)
    indexer = {n for n in found.left_out if ".indexer." in n}
    assert indexer and all(found.left_out[n] == roles.NO_GRADIENT for n in indexer)
    assert any(n.endswith("self_attn.q_b_proj") for n in found.targets)
    assert any(n.endswith("self_attn.o_b_proj") for n in found.targets)


def test_attention_gates_wider_than_one_value_are_adapted():
    """MiniMax's attention output gate is a projection (a sigmoid per hidden unit), not a router."""
    _, found = resolution("minimax")
    assert "output_gate" in leaves(found.targets) and not found.left_out


def test_gpt2_conv1d_projections_are_linear():
    _, found = resolution("gpt2")
    assert leaves(found.targets) == {"c_attn", "c_fc", "c_proj"}


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3", "ernie4_5_moe", "qwen3_next"])
def test_dense_and_shared_expert_linears_are_adapted_as_modules_and_experts_stay_parameters(family):
    """peft 0.21 takes gate/up/down_proj for fused experts in these families (issue 3711): they are named in full and
    kept as modules, so the dense first layers' and shared experts' MLPs are adapted and the experts are not."""
    model, found = resolution(family)
    mlp = {n for n in found.targets if leaves([n]) & {"gate_proj", "up_proj", "down_proj"}}
    assert mlp and all("experts." not in n.replace("shared_experts.", "").replace("shared_expert.", "") for n in mlp)
    config = targets.peft_lora_config(model, LoraConfig(dropout=0.0), found)
    assert set(config.target_modules) >= mlp and not config.target_parameters
    with torch.device("meta"):
        adapted = get_peft_model(model, config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(found.targets)


def test_peft_keeps_a_target_named_in_full_and_still_remaps_a_bare_name():
    model = meta_model(tiny_config("glm4_moe"))
    dense = next(n for n, _ in model.named_modules() if n.endswith("mlp.gate_proj") and "experts" not in n)
    assert targets.remapped_by_peft(model, ["gate_proj", "q_proj"]) == {"gate_proj"}
    targets.keep_named_modules()
    assert targets.remapped_by_peft(model, [dense]) == set()


@pytest.mark.parametrize(
    "family,reason",
    [
        ("qwen3_next", "layers of type linear_attention"),
        ("lfm2", "layers of type conv"),
        ("falcon_h1", "layers of type hybrid"),
        ("mamba", "mix tokens outside attention"),
        ("llama4_text", "chunked attention"),
        ("llama", None),
        ("gemma3_text", None),  # sliding and full attention layers split
    ],
)
def test_sequence_parallelism_refuses_layers_that_mix_tokens_outside_attention(family, reason):
    from launcher.run.sequence_parallel import layers_refusal

    config = tiny_config(family)
    if family == "lfm2":  # the shrunk config keeps its first two layers, both attention
        config.layer_types = ["conv", "full_attention"]
    found = layers_refusal(meta_model(config))
    assert (found is None) if reason is None else reason in found, found


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "jamba", "llama"])
def test_a_linear_whose_weight_is_read_outside_its_forward_stays_16_bit(family):
    from transformers.quantizers import AutoHfQuantizer

    from launcher.config import QuantConfig
    from launcher.dtypes import DtypePolicy
    from launcher.model.build import apply_quantized_layout, quantization_config, quantized_layout

    model = meta_model(tiny_config(family))
    kept = targets.read_outside_forward(model)
    assert leaves(kept) == (set() if family == "llama" else {"dt_proj"})
    quant, policy = QuantConfig(compute_dtype="float32"), DtypePolicy.uniform(torch.float32)
    config = quantization_config(quant, policy, model)
    AutoHfQuantizer.from_config(config, pre_quantized=False).preprocess_model(model, device_map={"": "cpu"})
    # As a rank without weights builds it (and the budget's skeleton).
    apply_quantized_layout(model, quant, policy, quantized_layout(model, policy.quant_storage, experts_4bit=True))
    four_bit = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # transformers' own exclusions stay: the output layer is not 4-bit; every other linear is.
    assert linears - four_bit == {*kept, "lm_head"}, linears - four_bit
    # Quantized, Jamba and FalconMamba call dt_proj as a module (adapted); Mamba still multiplies by its weight.
    adapted = leaves(targets.resolve(model, LoraConfig()).targets)
    assert ("dt_proj" in adapted) == (family in ("jamba", "falcon_mamba")), adapted


@pytest.mark.parametrize(
    "family,layer_class", [("bert", "BertLayer"), ("camembert", "CamembertLayer"), ("llama", "LlamaDecoderLayer")]
)
def test_the_decoder_layers_are_the_unsplittable_modules_but_the_one_holding_the_embeddings(family, layer_class):
    """BERT-style families declare their embeddings module unsplittable too; its table is tied to the output layer,
    so as a sharding unit of its own it would be sharded twice (FSDP2 fails on the already sharded table)."""
    from launcher.model.anatomy import decoder_layers

    model = meta_model(tiny_config(family))
    layers = decoder_layers(model)
    assert layers and {type(model.get_submodule(name)).__name__ for name in layers} == {layer_class}
    classes = set(model._no_split_modules)
    assert (len(classes) > 1) == (family != "llama")  # the BERT-style ones list their embeddings module too


def test_the_probe_runs_alike_where_peft_attaches_under_the_meta_device():
    """The budget's skeleton attaches LoRA under `torch.device("meta")`; Gemma-3n's forward makes tensors of its own,
    which must not become real meta tensors inside the fake run (the probe then failed and adapted every linear)."""
    model = meta_model(tiny_config("gemma3n_text"))
    outside = targets.resolve(model, LoraConfig())
    with torch.device("meta"):
        inside = targets.resolve(model, LoraConfig())
    assert not inside.unprobed and inside.left_out == outside.left_out
    assert leaves(inside.left_out) == {"correction_coefs", "prediction_coefs"}
