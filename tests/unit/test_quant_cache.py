"""The quantized-base cache: a later start reads the source rank's 4-bit base from disk, bit for bit what
quantizing gives, and quantizes nothing; any change to the checkpoint, the quantization or the storage
dtype misses; processes sharing the cache quantize once; the source rank quantizes every 4-bit weight on
the device it is given (its GPU when there is one) bit for bit as the ordinary load does, and entries
quantized on another kind of device are never mixed."""

import contextlib
import multiprocessing
import os

import pytest
import torch

from launcher.collectives import this_rank_device
from launcher.config import ModelConfig, QuantConfig
from launcher.dtypes import DtypePolicy
from launcher.model import build as model_module
from launcher.model.quant_cache import COMPLETE, cache_root
from support.families import BY_NAME

BF16 = DtypePolicy.uniform(torch.bfloat16)


@pytest.fixture
def quantize_calls(monkeypatch):
    """Counts the quantizing loads (`load_quantized_base`) that `load_base` makes."""
    calls = []
    original = model_module.load_quantized_base

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(model_module, "load_quantized_base", counting)
    return calls


def snapshot(model) -> dict:
    """Every parameter and buffer (kind, dtype, shape, bytes) and every 4-bit weight's or expert's quantization
    constants."""
    from launcher.model.experts import quantized_experts

    out = {}
    for key, (_, _, parametrization) in quantized_experts(model).items():
        state = parametrization.quant_state
        for k, v in state.as_dict(packed=True).items():
            out[f"{key}:{k}"] = (type(v).__name__, v.dtype, tuple(v.shape), raw(v))
        out[f"{key}:spec"] = (parametrization.shape, parametrization.dtype)
    for name, module in model.named_modules():
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            out[f"{name}.{key}"] = (type(tensor).__name__, tensor.dtype, tuple(tensor.shape), raw(tensor))
            state = getattr(tensor, "quant_state", None)
            if state is not None:
                for k, v in state.as_dict(packed=True).items():
                    out[f"{name}.{key}:{k}"] = (type(v).__name__, v.dtype, tuple(v.shape), raw(v))
    return out


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def ties(model) -> list[tuple[str, str]]:
    seen, tied = {}, []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append((seen[id(param)], name))
        seen.setdefault(id(param), name)
    return tied


def entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "qwen2-moe", "gpt-oss", "llama4"])
def test_second_start_reads_the_cache_bit_for_bit(family, family_assets, tmp_path, quantize_calls, capsys):
    """MoE families (a shared expert beside the routed ones; expert biases; Llama-4, whose experts transformers
    turns into per-expert linears when it reads a pre-quantized checkpoint) keep their experts 4-bit in the cache."""
    path = str(family_assets(family) / "base")
    cfg = ModelConfig(path=path, quant_cache_dir=str(tmp_path / "cache"))
    first = model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == 1 and "written to the cache" in capsys.readouterr().err
    second = model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == 1, "the second start quantized again"
    assert "read from the cache" in capsys.readouterr().err
    fresh = model_module.load_base(
        ModelConfig(path=path, quant_cache=False), QuantConfig(compute_dtype="bfloat16"), BF16
    )
    assert len(quantize_calls) == 2
    expected = snapshot(fresh)
    assert any(":absmax" in k for k in expected)
    assert any("bias" in k for k in expected) == (family in ("qwen2", "qwen2-moe", "gpt-oss"))
    assert any(k.endswith(":spec") for k in expected) == BY_NAME[family].moe
    for got in (first, second):
        mine = snapshot(got)
        assert sorted(mine) == sorted(expected)
        assert [k for k in expected if mine[k] != expected[k]] == []
        assert ties(got) == ties(fresh) and bool(ties(fresh)) == BY_NAME[family].tied
        assert got.config.to_dict() == fresh.config.to_dict() and got.name_or_path == path
        assert got.training == fresh.training and got.is_loaded_in_4bit
    assert len(entries(tmp_path / "cache")) == 1


def test_a_checkpoint_whose_weights_transformers_converts_is_cached(tmp_path, quantize_calls, capsys):
    """ERGO's checkpoints store the shared expert transposed; transformers transposes it when it loads. The cache
    keeps the loaded model's own names and layout (transposing back would meet packed 4-bit bytes)."""
    from support.families import Family, build_family
    from support.tiny_configs import tiny_config

    path = str(build_family(Family("ergo", "", lambda tokens: tiny_config("ergo")), tmp_path / "ergo") / "base")
    cfg = ModelConfig(path=path, quant_cache_dir=str(tmp_path / "cache"))
    first = model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    second = model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == 1 and "read from the cache" in capsys.readouterr().err
    assert any("shared_experts.up_proj.weight:absmax" in k for k in snapshot(first))
    assert snapshot(second) == snapshot(first)


def test_an_entry_that_does_not_load_back_in_4_bits_is_not_trusted(tmp_path, quantize_calls, capsys):
    """transformers reads Qwen4-exp's hyper-connection weights back from a pre-quantized checkpoint as plain
    tensors of packed bytes: such an entry is quantized again, and the start says why."""
    import bitsandbytes as bnb

    from support.families import Family, build_family
    from support.tiny_configs import tiny_config

    family = Family("qwen4_exp_text", "", lambda tokens: tiny_config("qwen4_exp_text"))
    cfg = ModelConfig(path=str(build_family(family, tmp_path / "m") / "base"), quant_cache_dir=str(tmp_path / "c"))
    model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    second = model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == 2 and "load back unpacked" in capsys.readouterr().err
    linears = [m for m in second.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(isinstance(m.weight, bnb.nn.Params4bit) for m in linears)


def test_a_changed_quantization_or_touched_checkpoint_misses(family_assets, tmp_path, quantize_calls):
    import shutil

    model_dir = tmp_path / "base"
    shutil.copytree(family_assets("llama-tied") / "base", model_dir)
    cfg = ModelConfig(path=str(model_dir), quant_cache_dir=str(tmp_path / "cache"))
    runs = [
        (QuantConfig(compute_dtype="bfloat16"), BF16),
        (QuantConfig(type="fp4", compute_dtype="bfloat16"), BF16),
        (QuantConfig(compute_dtype="float16"), BF16),
        (QuantConfig(double_quant=False, compute_dtype="bfloat16"), BF16),
        (
            QuantConfig(compute_dtype="bfloat16"),
            DtypePolicy.uniform(torch.float32),
        ),  # another storage dtype (`quant.storage_dtype: float32`)
    ]
    for k, (quant, policy) in enumerate(runs, start=1):
        model_module.load_base(cfg, quant, policy)
        assert len(quantize_calls) == k
    for quant, policy in runs:
        model_module.load_base(cfg, quant, policy)
    assert len(quantize_calls) == len(runs) and len(entries(tmp_path / "cache")) == len(runs)
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == len(runs) + 1


def test_the_cache_can_be_turned_off_and_defaults_to_the_environment(
    family_assets, tmp_path, quantize_calls, monkeypatch
):
    monkeypatch.setenv("QLAUNCH_QUANT_CACHE", str(tmp_path / "env"))
    assert cache_root(ModelConfig()) == tmp_path / "env"
    assert cache_root(ModelConfig(quant_cache_dir=str(tmp_path / "set"))) == tmp_path / "set"
    cfg = ModelConfig(path=str(family_assets("llama-tied") / "base"), quant_cache=False)
    for _ in range(2):
        model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == 2 and not (tmp_path / "env").exists()


def _load_in_child(path: str, cache: str, results) -> None:
    from launcher.model.quant_cache import cached_quantized_base

    cfg = ModelConfig(path=path, quant_cache_dir=cache)
    base, hit = cached_quantized_base(
        cfg,
        QuantConfig(compute_dtype="bfloat16"),
        BF16,
        lambda: model_module.load_quantized_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16),
        "cpu",
    )
    results.put((hit, raw(base.model.layers[0].mlp.down_proj.weight)))


def test_two_jobs_sharing_the_cache_quantize_once(family_assets, tmp_path):
    path = str(family_assets("qwen2") / "base")
    context = multiprocessing.get_context("spawn")  # a forked child of a process that ran torch's thread pool can hang
    results = context.Queue()
    children = [context.Process(target=_load_in_child, args=(path, str(tmp_path / "cache"), results)) for _ in range(2)]
    for child in children:
        child.start()
    got = [results.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert sorted(hit for hit, _ in got) == [False, True]
    assert got[0][1] == got[1][1]
    names = entries(tmp_path / "cache")
    assert len(names) == 1 and (tmp_path / "cache" / names[0] / COMPLETE).is_file()


@pytest.fixture
def quantize_4bit_inputs(monkeypatch):
    """The device of every tensor handed to bitsandbytes' `quantize_4bit`, in order."""
    import bitsandbytes as bnb

    devices = []
    original = bnb.functional.quantize_4bit

    def recording(A, *args, **kwargs):
        devices.append(A.device)
        return original(A, *args, **kwargs)

    monkeypatch.setattr(bnb.functional, "quantize_4bit", recording)
    return devices


@pytest.fixture
def opened_backends(monkeypatch):
    """The storage backend asked for each safetensors file transformers opens."""
    import safetensors
    import transformers.modeling_utils

    backends = []
    original = safetensors.safe_open

    def recording(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording)
    monkeypatch.setattr(transformers.modeling_utils, "safe_open", recording)
    return backends


@pytest.mark.parametrize("family", ["llama-tied", "phi3", "mixtral"])
def test_the_quantize_device_quantizes_every_4bit_weight_bit_for_bit(
    family, family_assets, quantize_4bit_inputs, opened_backends, monkeypatch
):
    """The source rank's load quantizes each 4-bit weight on the device it is given (its GPU when CUDA is
    present; here the CPU, given explicitly, so the same path runs), reads the checkpoint with pread, and
    gives bit for bit what an ordinary `from_pretrained` gives: fused projections (phi3), fused MoE experts
    (mixtral) and tied embeddings (llama-tied) stay transformers' own."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from launcher.model import quantize

    contexts = []
    original = quantize.quantizing_on

    @contextlib.contextmanager
    def recording(device):
        with original(device) as done:
            contexts.append(done)
            yield done

    monkeypatch.setattr(model_module, "quantizing_on", recording)
    path = str(family_assets(family) / "base")
    quantize_method = bnb.nn.Params4bit._quantize
    got = model_module.load_quantized_base(
        ModelConfig(path=path, quant_cache=False), QuantConfig(compute_dtype="bfloat16", experts="16bit"), BF16, "cpu"
    )
    assert bnb.nn.Params4bit._quantize is quantize_method, "the patch outlived the load"
    linears = [m for m in got.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(contexts) == 1 and linears
    cpu = torch.device("cpu")
    assert contexts[0].device == cpu
    assert sorted(shape for shape, _, _ in contexts[0].weights) == sorted(
        (m.out_features, m.in_features) for m in linears
    ), "a 4-bit weight was quantized outside the quantize device's path"
    assert {(on, left) for _, on, left in contexts[0].weights} == {(cpu, cpu)}
    assert quantize_4bit_inputs == [cpu] * len(linears)
    assert opened_backends == ["pread"]

    ordinary = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=model_module.quantization_config(QuantConfig(compute_dtype="bfloat16"), BF16),
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
    )
    assert opened_backends[1:] == ["mmap"] and len(quantize_4bit_inputs) == 2 * len(linears)
    expected = snapshot(ordinary)
    assert any(":absmax" in k for k in expected)
    mine = snapshot(got)
    assert sorted(mine) == sorted(expected)
    assert [k for k in expected if mine[k] != expected[k]] == []
    assert ties(got) == ties(ordinary) and got.config.to_dict() == ordinary.config.to_dict()
    if family == "mixtral":
        assert any(p.dim() == 3 for p in got.parameters()), "fused experts expected"


def test_the_quantize_device_is_the_local_gpu_when_cuda_is_present(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert this_rank_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert this_rank_device() == torch.device("cpu")


def test_entries_quantized_on_another_kind_of_device_are_never_mixed(family_assets, tmp_path):
    """A cache shared by a machine with GPUs and one without holds one entry for each."""
    from launcher.model.quant_cache import cache_key, cached_quantized_base

    cfg = ModelConfig(path=str(family_assets("llama-tied") / "base"), quant_cache_dir=str(tmp_path / "cache"))
    assert (
        cache_key(cfg, QuantConfig(compute_dtype="bfloat16"), BF16, "cpu")[0]
        != cache_key(cfg, QuantConfig(compute_dtype="bfloat16"), BF16, "cuda")[0]
    )
    assert cache_key(cfg, QuantConfig(compute_dtype="bfloat16"), BF16, "cuda")[1]["quantized_on"] == "cuda"
    quantized = []

    def quantize():
        quantized.append(1)
        return model_module.load_quantized_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16, "cpu")

    hits = [
        cached_quantized_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16, quantize, kind)[1]
        for kind in ("cpu", "cuda", "cpu", "cuda")
    ]
    assert hits == [False, False, True, True] and len(quantized) == 2
    assert len(entries(tmp_path / "cache")) == 2


def test_a_damaged_entry_is_replaced_not_trusted(family_assets, tmp_path, quantize_calls, capsys):
    path = str(family_assets("llama-tied") / "base")
    cfg = ModelConfig(path=path, quant_cache_dir=str(tmp_path / "cache"))
    model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    (entry,) = [tmp_path / "cache" / name for name in entries(tmp_path / "cache")]
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # complete once, cut short since
    capsys.readouterr()
    again = model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == 2 and "cannot be read" in capsys.readouterr().err
    fresh = model_module.load_base(
        ModelConfig(path=path, quant_cache=False), QuantConfig(compute_dtype="bfloat16"), BF16
    )
    assert snapshot(again) == snapshot(fresh)
    # The replacement is a whole entry, read by the next start; nothing of the damaged one is left.
    model_module.load_base(cfg, QuantConfig(compute_dtype="bfloat16"), BF16)
    assert len(quantize_calls) == 3 and "read from the cache" in capsys.readouterr().err
    assert entries(tmp_path / "cache") == [entry.name]
