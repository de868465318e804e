"""MoE experts in 4-bit: what the source rank's load makes of every fused expert parameter, and what LoRA on them does."""

import pytest
import torch

from launcher.config import LoraConfig, ModelConfig, QuantConfig
from launcher.dtypes import DtypePolicy
from launcher.model import build as model_module
from launcher.model import experts
from support.families import FAMILIES

MOE = [f.name for f in FAMILIES if f.moe and not f.run_args]
POLICY = DtypePolicy(
    quant_storage=torch.bfloat16,
    norm=torch.float32,
    dense=torch.float32,
    adapter=torch.float32,
    bias=torch.float32,
    experts=torch.float32,
)


def load(path, **quant) -> torch.nn.Module:
    return model_module.load_quantized_base(
        ModelConfig(path=str(path), quant_cache=False), QuantConfig(compute_dtype="float32", **quant), POLICY, "cpu"
    )


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_every_expert_is_4bit_after_loading_and_dequantizes_to_what_bitsandbytes_gives(
    family_assets, family, quant_type, double_quant
):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    path = family_assets(family) / "base"
    got = load(path, type=quant_type, double_quant=double_quant)
    modules = dict(got.named_modules())
    sixteen_bit = [
        n
        for n, p in got.named_parameters()
        if p.dim() == 3 and not isinstance(modules[n.rpartition(".")[0]], torch.nn.Conv1d)
    ]
    assert not sixteen_bit, "an expert stayed 16-bit"  # (a convolution's weight is 3D too, and no expert)
    ordinary = load(path, type=quant_type, double_quant=double_quant, experts="16bit")
    sixteen = {f"{path}.{name}": m._parameters[name] for path, m, name in experts.expert_parameters(ordinary)}
    quantized = experts.quantized_experts(got)
    assert sorted(quantized) == sorted(sixteen) and quantized
    for key, (module, name, parametrization) in quantized.items():
        packed = module.parametrizations[name].original
        assert packed.dtype == POLICY.quant_storage and not packed.requires_grad
        expected, state = quantize_4bit(
            sixteen[key].detach(), compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.bfloat16
        )
        assert torch.equal(packed.view(torch.uint8), expected.view(torch.uint8)), key
        assert torch.equal(getattr(module, name), dequantize_4bit(expected, state)), key
        assert parametrization.quant_state.quant_type == quant_type
        assert (parametrization.quant_state.nested) == double_quant
        # Two values per byte: about a quarter of the fp32 weight's bytes.
        assert packed.numel() * packed.element_size() * 8 == sixteen[key].numel() * 4


@pytest.mark.parametrize("family", MOE)
def test_16bit_experts_stay_3d_parameters_in_the_compute_dtype(family_assets, family):
    got = load(family_assets(family) / "base", experts="16bit")
    found = experts.expert_parameters(got)
    assert found and not experts.quantized_experts(got)
    assert {m._parameters[n].dtype for _, m, n in found} == {torch.float32}


def test_meta_ranks_rebuild_the_same_expert_parametrizations(family_assets):
    path = family_assets("qwen3-moe") / "base"
    source = load(path)
    layout = model_module.quantized_layout(source, POLICY.quant_storage, experts_4bit=False)
    assert layout.experts
    meta = model_module.meta_base(ModelConfig(path=str(path)), QuantConfig(compute_dtype="float32"))
    from transformers.quantizers import AutoHfQuantizer

    quant = QuantConfig(compute_dtype="float32")
    AutoHfQuantizer.from_config(model_module.quantization_config(quant, POLICY)).preprocess_model(
        meta, device_map={"": "cpu"}
    )
    model_module.apply_quantized_layout(meta, quant, POLICY, layout)
    shapes = [(n, tuple(p.shape), p.dtype) for n, p in source.named_parameters()]
    assert [(n, tuple(p.shape), p.dtype) for n, p in meta.named_parameters()] == shapes
    # Reading an expert on meta gives its dequantized shape (peft reads it to size the adapters).
    block = meta.model.layers[0].mlp.experts
    assert block.gate_up_proj.shape == source.model.layers[0].mlp.experts.gate_up_proj.shape


def test_lora_on_4bit_experts_trains_every_adapter_and_leaves_no_proxy_behind(family_assets):
    path = family_assets("mixtral") / "base"
    base = load(path)
    model_module.prepare_for_kbit_training(base, POLICY, gradient_checkpointing=True)
    lora = LoraConfig(dropout=0.0, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = model_module.attach_lora(base, lora, POLICY, seed=0)
    model.train()
    ids = torch.randint(3, 500, (2, 24))
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    for step in range(2):  # the second step meets whatever the first left on the parametrizations
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        # lora_B starts at zero, so lora_A's first gradient is zero too; after one step both move.
        moved = [n for n, p in adapters.items() if p.grad is not None and p.grad.abs().sum() > 0]
        assert sorted(moved) == sorted(n for n in adapters if step or "lora_B" in n)
        with torch.no_grad():
            for p in adapters.values():
                p -= 0.1 * p.grad
        stacks = [len(m) for m in model.modules() if experts.is_packed_expert(m)]
        assert stacks and set(stacks) == {1}, "a LoRA proxy stayed on a 4-bit expert"
