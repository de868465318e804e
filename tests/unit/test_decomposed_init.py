"""PiSSA and OLoRA on a 4-bit base (launcher/model/decomposed_init.py): the adapters are peft's own initialization
of each 16-bit weight, the residual is what gets quantized, so the first forward is the 16-bit model's within NF4
error, and closer to it than plain QLoRA's; the quantized-base cache keeps a residual base apart from the original
and gives back its factors."""

import dataclasses

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from launcher.config import ConfigError, LoraConfig, ModelConfig, QuantConfig, TrainConfig, load_config
from launcher.dtypes import DtypePolicy
from launcher.model import build
from launcher.model.decomposed_init import AdapterShape, decompose

FP32 = DtypePolicy.uniform(torch.float32)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_decomposition_is_peft_s_own_and_leaves_the_residual(init):
    torch.manual_seed(0)
    weight = torch.randn(48, 32, dtype=torch.bfloat16)
    lora = LoraConfig(init=init, use_rslora=True)
    residual, a, b = decompose(weight, AdapterShape(r=8, alpha=16), lora)
    scaling = 16 / 8**0.5
    # peft's own initialization of a 16-bit linear, which is what it recommends quantizing the residual of
    base = nn.Linear(32, 48, bias=False, dtype=torch.bfloat16)
    base.weight.data = weight.clone()
    config = PeftLoraConfig(r=8, lora_alpha=16, use_rslora=True, init_lora_weights=init)
    theirs = LoraLinear(base, "default", config=config, r=8, lora_alpha=16)
    assert torch.equal(a, theirs.lora_A["default"].weight) and torch.equal(b, theirs.lora_B["default"].weight)
    assert torch.equal(residual, theirs.get_base_layer().weight) and residual.dtype == torch.bfloat16
    rebuilt = residual.float() + scaling * b @ a
    # the weight again, but for the residual's rounding to bf16 (within a unit in its last place)
    assert (rebuilt - weight.float()).abs().max() <= residual.float().abs().max() * 2**-7


def first_logits(path: str, lora: LoraConfig | None, quantized: bool) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    if not quantized:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        quant = QuantConfig(compute_dtype="float32")
        base = build.load_base(ModelConfig(path=path, quant_cache=False), quant, FP32, lora)
        model = build.build_model(base, quant, lora or LoraConfig(), TrainConfig(), FP32, 64)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", ["llama-tied", "qwen2"])
def test_pissa_and_olora_start_closer_to_the_16bit_model_than_plain_qlora(family, family_assets):
    path = str(family_assets(family) / "base")
    original = first_logits(path, None, quantized=False)
    plain = (first_logits(path, LoraConfig(dropout=0.0), quantized=True) - original).abs().mean().item()
    for init in ("pissa", "olora", "loftq"):
        decomposed = (first_logits(path, LoraConfig(dropout=0.0, init=init), quantized=True) - original).abs().mean()
        print(
            f"{family}: mean |logit error| against the 16-bit model: plain QLoRA {plain:.5f}, {init} {decomposed:.5f}"
        )
        assert decomposed.item() < plain, (init, decomposed.item(), plain)
    assert plain < 0.5  # NF4's error on these logits, not a broken load


def test_a_residual_base_is_cached_apart_and_brings_its_factors_back(family_assets, tmp_path):
    path = str(family_assets("llama-tied") / "base")
    cache = ModelConfig(path=path, quant_cache_dir=str(tmp_path / "cache"))
    quant = QuantConfig(compute_dtype="float32")
    pissa = LoraConfig(init="pissa", rank_pattern={"q_proj": 4})
    first = build.load_base(cache, quant, FP32, pissa)
    second = build.load_base(cache, quant, FP32, pissa)  # read from the cache
    plain = build.load_base(cache, quant, FP32, LoraConfig())
    assert len(list((tmp_path / "cache").glob("*/qlaunch-quant-cache.json"))) == 2
    assert not hasattr(plain, "qlaunch_factors") and sorted(first.qlaunch_factors) == sorted(second.qlaunch_factors)
    for path_, (a, b) in first.qlaunch_factors.items():
        assert torch.equal(a, second.qlaunch_factors[path_][0]) and torch.equal(b, second.qlaunch_factors[path_][1])
        assert a.shape[0] == (4 if path_.endswith("q_proj") else 16)
    olora = build.load_base(cache, quant, FP32, dataclasses.replace(pissa, init="olora"))
    assert olora.qlaunch_factors and len(list((tmp_path / "cache").glob("*/qlaunch-quant-cache.json"))) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("lora.init", "svd")], r"`lora.init` is `svd`; choose one of default, gaussian, pissa, olora, loftq\."),
        ([("lora.init", "pissa"), ("lora.init_from", "/x")], r"`lora.init: pissa` with `lora.init_from`"),
        ([("lora.init", "olora"), ("train.objective", "kto")], r"the reference is the model with the adapter switched"),
    ],
)
def test_a_bad_init_is_one_line_before_launch(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_puts_the_adapter_onto_the_residual_so_an_untrained_one_gives_the_original_back(
    init, family_assets, tmp_path
):
    """`qlaunch merge` of a PiSSA/OLoRA adapter: the 16-bit weights decomposed again as the run did, the adapter merged
    into the residual. The adapter as initialized (what training starts from) gives the original model back; one
    whose B moved gives the original plus exactly that move."""
    import yaml
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launcher import cli
    from launcher.model import targets
    from launcher.model.decomposed_init import install_factors

    base_path = str(family_assets("llama-tied") / "base")
    lora = LoraConfig(init=init, dropout=0.0, rank_pattern={"q_proj": 4})
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text(
        yaml.safe_dump({"model": {"path": base_path}, "lora": {"init": init, "rank_pattern": {"q_proj": 4}}})
    )
    original = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    quant = QuantConfig(compute_dtype="float32")
    factors = build.load_quantized_base(
        ModelConfig(path=base_path, quant_cache=False), quant, FP32, "cpu", lora
    ).qlaunch_factors
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(model, targets.peft_lora_config(model, lora))
    install_factors(model, factors)
    moved = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(f"base_model.model.{moved}").lora_B["default"].weight.add_(0.01)
    model.save_pretrained(run / "adapter")
    assert cli.main(["merge", str(run / "adapter"), "--output", str(run / "merged"), "--dtype", "float32"]) == 0
    merged = load_file(run / "merged" / "model.safetensors")
    layer = model.get_submodule(f"base_model.model.{moved}")
    change = (
        layer.scaling["default"]
        * torch.full_like(layer.lora_B["default"].weight, 0.01)
        @ layer.lora_A["default"].weight
    )
    weights = original.state_dict()
    assert f"{moved}.weight" in merged and set(merged) <= set(weights)  # the output layer is tied: saved once
    for name, tensor in merged.items():
        expected = weights[name] + change if name == f"{moved}.weight" else weights[name]
        assert (tensor - expected).abs().max() < 1e-4, name


def test_loftq_merges_onto_the_quantized_weights_it_trained_on_and_corrects_them(family_assets, tmp_path):
    """LoftQ leaves the weights as they are and starts the adapters from their 4-bit quantization error: merging its
    adapter as initialized puts each adapted weight closer to the original than the 4-bit weight alone."""
    import bitsandbytes.functional as bnb_functional
    import yaml
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launcher import cli
    from launcher.model import targets
    from launcher.model.decomposed_init import install_factors

    base_path = str(family_assets("qwen2") / "base")
    lora = LoraConfig(init="loftq", dropout=0.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text(yaml.safe_dump({"model": {"path": base_path}, "lora": {"init": "loftq"}}))
    quant = QuantConfig(compute_dtype="float32")
    loaded = build.load_quantized_base(ModelConfig(path=base_path, quant_cache=False), quant, FP32, "cpu", lora)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(model, targets.peft_lora_config(model, lora))
    install_factors(model, loaded.qlaunch_factors)
    model.save_pretrained(run / "adapter")
    assert cli.main(["merge", str(run / "adapter"), "--output", str(run / "merged"), "--dtype", "float32"]) == 0
    merged = load_file(run / "merged" / "model.safetensors")
    original = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).state_dict()
    adapted = {f"{path}.weight" for path in loaded.qlaunch_factors}
    assert adapted and adapted <= set(merged)
    for name, tensor in merged.items():
        if name not in adapted:
            assert torch.equal(tensor, original[name]), name
            continue
        packed, state = bnb_functional.quantize_4bit(
            original[name], blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        four_bit_error = (bnb_functional.dequantize_4bit(packed, state) - original[name]).norm()
        assert (tensor - original[name]).norm() < four_bit_error, name


def test_loftq_s_adapter_is_peft_s_decomposition_of_the_quantization_error_at_the_adapter_s_scale():
    import bitsandbytes.functional as bnb_functional
    from peft.utils.loftq_utils import _low_rank_decomposition

    from launcher.model.decomposed_init import loftq

    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    shape, lora = AdapterShape(r=8, alpha=32), LoraConfig(init="loftq")
    same, a, b = loftq(weight, shape, lora, QuantConfig(), torch.device("cpu"))
    assert same is weight
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    error = weight - bnb_functional.dequantize_4bit(packed, state)
    theirs = _low_rank_decomposition(error, reduced_rank=8)
    assert torch.allclose((32 / 8) * b @ a, theirs["L"] @ theirs["R"], atol=1e-5)
    assert (error - (32 / 8) * b @ a).norm() < error.norm()
