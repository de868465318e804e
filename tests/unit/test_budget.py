"""The memory budget in process: static components exact to the byte, activations within 10%, the commands.

Activations across sequence lengths x micro batches x checkpointing x two model shapes,
measured by the same probe training uses; the meta skeleton against the real loaded model; the
4-bit packing and quantization constants against bitsandbytes; `qlaunch budget` and `qlaunch plan`.
Real launches check the same per rank: integration/test_budget_launch.py and test_matrix.py.
"""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from launcher import cli, strategies
from launcher.config import load_config
from launcher.demo import build_base_model
from launcher.memory import components, measure, predict, skeleton
from launcher.model.build import packed_shape
from launcher.strategies import layout
from support.families import FAMILIES

LLAMA_2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


# --- Activations, in process, with the probe training uses -------------------------------------

SHAPES = {
    "llama-mha": dict(layers=3, hidden=128, heads=4, kv_heads=4),
    "llama-gqa": dict(layers=2, hidden=192, heads=6, kv_heads=2),
}
SEQ_LENS = (16, 80)
MICRO_BATCHES = (1, 3)


@pytest.fixture(scope="module")
def shape_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return {name: build_base_model(root / name, **dims) for name, dims in SHAPES.items()}


def measure_activations(model, cfg, batch: int, seq: int) -> int:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _, storages = measure.measure_weights(model, strategies.SingleProcess())
    probe = measure.FirstStepProbe(model, optimizer, storages)
    ids = torch.randint(4, 200, (batch, seq))
    loss = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids), num_items_in_batch=batch * seq).loss
    loss.backward()
    optimizer.step()
    assert probe.done and probe.activation_shape == (batch, seq)
    return probe.measured["activations"]


def run_config(path: Path, checkpointing: bool, batch: int = 1, seq: int = 16):
    """A one-process CPU run's config, its dtypes resolved as training resolves them on this CPU."""
    cfg = load_config(
        None,
        [
            ("model.path", str(path)),
            ("strategy", "ddp"),
            ("lora.dropout", 0.05),
            ("train.mixed_precision", "no"),
            ("train.gradient_checkpointing", checkpointing),
            ("train.micro_batch_size", batch),
            ("data.max_seq_len", seq),
        ],
    )
    return predict.resolve_quant(cfg, strategies.get(cfg.strategy), "no", "cpu")


def real_model(cfg):
    from launcher.model.build import build_model, load_quantized_base

    policy = strategies.dtype_policy(cfg.quant, strategies.get(cfg.strategy), "no")
    base = load_quantized_base(cfg.model, cfg.quant, policy)
    return build_model(base, cfg.quant, cfg.lora, cfg.train, policy, cfg.data.max_seq_len).train()


def assert_activations_match(path: Path, checkpointing: bool, shapes=tuple(itertools.product(SEQ_LENS, MICRO_BATCHES))):
    model = real_model(run_config(path, checkpointing))
    for seq, batch in shapes:
        cfg = run_config(path, checkpointing, batch, seq)
        predicted = predict.predict(cfg, predict.Hardware(device="cpu")).ranks[0].components["activations"]
        measured = measure_activations(model, cfg, batch, seq)
        assert abs(predicted - measured) <= 0.1 * measured, (path, checkpointing, batch, seq, predicted, measured)


CHECKPOINTING = pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])


@pytest.mark.parametrize("shape", SHAPES)
@CHECKPOINTING
def test_activations_within_ten_percent(shape_dirs, shape, checkpointing):
    assert_activations_match(shape_dirs[shape], checkpointing)


MODELS = [f.name for f in FAMILIES if not f.pairs and not f.run_args]
"""The families' models (a row with run arguments, such as a preference objective or an adapter variant, trains a
model another row has, and these tests build the run config of their own: the matrix checks its budget)."""


@pytest.mark.parametrize("family", MODELS)
@CHECKPOINTING
def test_every_family_s_activations_within_ten_percent(family_assets, family, checkpointing):
    # Sequences of 16 and 80 tokens: shorter and longer than the sliding windows (16) of Mistral and Gemma; the
    # shapes above take every pairing of length and micro batch, each family two of them.
    assert_activations_match(family_assets(family) / "base", checkpointing, shapes=((16, 3), (80, 1)))


@pytest.mark.parametrize(
    "family,checkpointing",
    [
        # The mixer multiplies by dt_proj's weight itself: kept 16-bit (targets.read_outside_forward), the 4-bit model
        # trains (a forward, backward and optimizer step here), and its trace runs.
        ("mamba", True),
        ("mamba", False),
        ("jamba", True),
        ("jamba", False),
        # Decoders that make a padding mask of their input, which the trace takes for all ones without reading it.
        ("bart", True),
        ("biogpt", False),
    ],
)
def test_families_outside_the_matrix_train_in_4_bits_and_are_predicted(tmp_path, family, checkpointing):
    from transformers import AutoModelForCausalLM

    from support.tiny_configs import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(family)).save_pretrained(tmp_path)
    assert_activations_match(tmp_path, checkpointing, shapes=((32, 2),))


def test_a_storage_freed_during_a_trace_is_not_the_next_one_at_its_address():
    # The trace notes storages (what it saved, the layers' inputs, the dequantized experts); a MoE router frees
    # tensors it saved, and a later activation the allocator put at the same address was once taken for one already
    # counted (glm4-moe's prediction moved by up to 10% with what ran before it in the process). Noted by address
    # alone, a fresh fake storage sits at the freed one's address here in about 99 tries of 100.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from launcher.model.fake_run import Storages

    with FakeTensorMode():
        for _ in range(20):
            noted = Storages()
            freed = torch.empty(64) * 2
            noted.note(freed, "freed")
            assert noted.get(freed) == "freed"
            del freed
            later = [torch.empty(64) + 1 for _ in range(20)]
            assert not any(tensor in noted for tensor in later)


@pytest.mark.parametrize("family", ["llama-gqa", *MODELS])
def test_meta_skeleton_is_the_loaded_model(shape_dirs, family_assets, family):
    # The budget's meta model has exactly the parameters, dtypes, quantization constants and buffers
    # of the model training loads and quantizes (tied weights once, biases, experts).
    cfg = run_config(shape_dirs[family] if family in shape_dirs else family_assets(family) / "base", True)
    model = real_model(cfg)
    predicted = predict.predict(cfg, predict.Hardware(device="cpu"))
    kinds = components.parameter_components(model)
    real = [(n, kinds[n], tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    meta = [(t.name, t.component, t.shape, t.dtype, t.trainable) for t in predicted.model.tensors]
    assert meta == real
    held, _ = measure.measure_weights(model, strategies.SingleProcess())
    assert predicted.model.quant_state_bytes == held["quant_states"] > 0
    assert predicted.model.buffer_bytes == held["buffers"]
    assert (held["buffers"] > 0) == any(True for _ in model.buffers())  # Jamba has no rotary tables, nor buffers


def test_offloaded_activations_at_a_reused_address_are_each_counted():
    """Offload drops each saved tensor once copied to the host: the allocator may put the next activation at the
    same address, and the probe must count it as the new storage it is (a rank was measured 25% low). Two tensors
    made over one buffer, one after the other, stand for that allocator."""
    from launcher.run.activation_offload import ActivationOffload

    class TwoAtOneAddress(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.memory = bytearray(4096 * 4)

        def forward(self, input_ids):
            first = torch.frombuffer(self.memory, dtype=torch.float32)
            out = (first * self.scale).sum()  # saves `first`, which offload copies to the host
            address = first.data_ptr()
            del first  # nothing holds it now
            second = torch.frombuffer(self.memory, dtype=torch.float32)
            assert second.data_ptr() == address
            return out + (second * self.scale).sum()

    model = TwoAtOneAddress()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = measure.FirstStepProbe(model, optimizer, {}, offload=ActivationOffload(torch.device("cpu")))
    model(input_ids=torch.ones(1, 8, dtype=torch.long)).backward()
    optimizer.step()
    assert probe.measured["activations"] == 2 * 4096 * 4


@pytest.mark.parametrize("shape", [(64, 64), (100, 60), (33, 96)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.uint8])
def test_packing_and_quant_constants_follow_bitsandbytes(shape, double_quant, storage):
    from bitsandbytes.functional import quantize_4bit

    numel = shape[0] * shape[1]
    if (numel // 2) % storage.itemsize:
        pytest.skip("bitsandbytes cannot view these packed bytes as this storage dtype")
    packed, state = quantize_4bit(
        torch.randn(shape, dtype=torch.bfloat16),
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=storage,
    )
    assert tuple(packed.shape) == packed_shape(numel, storage) and packed.dtype == storage
    tensors = {"absmax": state.absmax, "quant_map": state.code}
    if double_quant:
        tensors.update(nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code, offset=state.offset)
    expected = skeleton.quant_state_shapes(numel, state.blocksize, double_quant)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == expected


def test_flat_split_puts_padding_where_the_libraries_do():
    # Two 5-element pieces aligned to 4 and padded to a multiple of 3: [a a a a a _ _ _ b b b b b _ _] -> 5 per rank.
    pieces = [("lora", 5), ("norms", 5)]
    parts = [layout.split_flat(pieces, 4, 4, 3, 3, rank) for rank in range(3)]
    assert parts[0] == {"shard_padding": 0, "lora": 20, "norms": 0}
    assert parts[1] == {"shard_padding": 12, "lora": 0, "norms": 8}
    assert parts[2] == {"shard_padding": 8, "lora": 0, "norms": 12}
    assert layout.chunk_rows(5, 3, 2) == (1, 2) and layout.chunk_rows(2, 3, 2) == (0, 1)


# --- qlaunch budget ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama-2-70b") / "config.json"
    path.write_text(json.dumps(LLAMA_2_70B))
    return path


def budget_json(capsys, *args) -> dict:
    assert cli.main(["budget", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_budget_json_schema_and_sharding_of_a_70b_config(llama_70b, capsys):
    common = ["--model", str(llama_70b), "--world-size", "2", "--seq-len", "2048", "--gpu-memory", "24GiB"]
    fsdp2 = budget_json(capsys, *common, "--strategy", "fsdp2")
    ddp = budget_json(capsys, *common, "--strategy", "ddp")
    zero3 = budget_json(capsys, *common, "--strategy", "zero3", "--offload")
    for report in (fsdp2, ddp, zero3):
        assert report["schema_version"] == 1 and report["world_size"] == 2 and report["seq_len"] == 2048
        assert set(report["components"]) == set(components.COMPONENTS)
        assert [r["rank"] for r in report["ranks"]] == [0, 1]
        for rank in report["ranks"]:
            assert set(rank["components"]) == set(components.COMPONENTS)
            assert rank["total_bytes"] == sum(rank["components"].values())
            assert rank["headroom_bytes"] == 24 * 2**30 - rank["total_bytes"]
            assert rank["fits"] == (rank["headroom_bytes"] >= 0)
    one, full = fsdp2["ranks"][0]["components"], ddp["ranks"][0]["components"]
    # 70B parameters in 4 bits are about 35 GB; FSDP2 holds half of them, the constants whole.
    assert 30e9 < full["base_4bit"] < 40e9 and 2 * one["base_4bit"] == full["base_4bit"]
    assert one["quant_states"] == full["quant_states"] > 0.5e9
    assert 2 * one["optimizer_states"] == full["optimizer_states"] and full["master_weights"] == 0
    assert one["gathered_params"] > 0 and full["gathered_params"] == 0
    assert ddp["fits"] is False
    offloaded = zero3["ranks"][0]
    assert offloaded["components"]["optimizer_states"] == 0 and offloaded["host_components"]["optimizer_states"] > 0
    assert offloaded["host_components"]["master_weights"] == offloaded["host_components"]["gradients"] > 0


def test_budget_table_flags_override_the_run_config_and_plot(shape_dirs, tmp_path, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        f"model: {{path: {shape_dirs['llama-gqa']}}}\nlora: {{r: 8}}\ndata: {{max_seq_len: 128}}\nstrategy: zero3\n"
    )
    report = budget_json(capsys, "--config", str(run_yaml), "--seq-len", "256", "--nodes", "2", "--gpus-per-node", "2")
    assert (report["seq_len"], report["lora"]["r"], report["strategy"], report["world_size"], report["nodes"]) == (
        256,
        8,
        "zero3",
        4,
        2,
    )
    plot = tmp_path / "budget.png"
    assert (
        cli.main(
            ["budget", "--config", str(run_yaml), "--world-size", "3", "--gpu-memory", "80GB", "--plot", str(plot)]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "Memory budget per rank" in table and "ranks 0-1" in table and "rank 2" in table and "FITS" in table
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpt2") / "config.json"
    path.write_text(
        json.dumps(
            {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_embd": 64,
                "n_head": 4,
                "n_layer": 2,
                "vocab_size": 100,
            }
        )
    )
    return path


def test_any_architecture_is_budgeted_by_the_trace(gpt2, capsys):
    """GPT-2 (Conv1D projections, LayerNorm, a plain MLP, eager attention) had no activation formula: the trace
    needs none. Its eager attention keeps the scores of every head (tokens x tokens), which dominates recompute."""
    assert cli.main(["budget", "--model", str(gpt2), "--seq-len", "1024", "--json"]) == 0
    rank = json.loads(capsys.readouterr().out)["ranks"][0]["components"]
    scores = 1024 * 1024 * 4 * 2  # one layer's fp32 softmax output for 2 heads, kept for backward
    assert rank["activations"] > 0 and rank["recompute"] > scores


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "some-org/not-downloaded-model"], r"not in the local Hugging Face cache.*config.json"),
        (["--strategy", "zero4"], r"Unknown strategy `zero4`"),
        (["--gpu-memory", "lots"], r"--gpu-memory `lots` is not a size"),
        (
            ["--strategy", "fsdp2", "--offload"],
            r"fsdp2 cannot run this config: `train.offload: optimizer` is not offered",
        ),
        (
            ["--strategy", "zero2", "--offload", "params"],
            r"zero2 offloads: none, optimizer; ZeRO-2 .*Strategies that can: fsdp2, zero3\.",
        ),
        (["--strategy", "ddp", "--offload", "params"], r"ddp cannot run this config"),
        (["--gpu-memory", "24"], r"--gpu-memory `24` has no unit: write 24GiB"),
        (["--gpu-memory", "512MiB"], r"--gpu-memory `512MiB` is 512.00 MiB; it must be at least 1.00 GiB"),
        (["--runtime-overhead", "2"], r"--runtime-overhead `2` has no unit"),
        (["--world-size", "4", "--nodes", "2", "--gpus-per-node", "3"], r"disagrees"),
        (["--optimizer", "sgd"], r"Optimizer `sgd`"),
    ],
)
def test_budget_bad_input_gets_one_clear_error(llama_70b, capsys, args, message):
    import re

    full = args if args[0] == "--model" else ["--model", str(llama_70b), *args]
    assert cli.main(["budget", *full]) == 2
    assert re.search(message, capsys.readouterr().err)


# --- qlaunch plan ------------------------------------------------------------------------------


def test_plan_keeps_what_fits_and_recommends_the_fastest(shape_dirs, capsys):
    # GPU memory under 1 GiB is refused: a runtime allowance leaves this tiny model ~11 MiB of it.
    base = ["plan", "--model", str(shape_dirs["llama-mha"]), "--world-size", "2", "--seq-len", "64", "--margin", "0"]
    assert cli.main([*base, "--gpu-memory", "1GiB", "--runtime-overhead", "1013MiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fits = [c for c in report["candidates"] if c["fits"]]
    assert fits and len(fits) < len(report["candidates"])
    for c in report["candidates"]:
        assert c["fits"] == (c["peak_bytes"] <= report["limit_bytes"])
    best = report["recommended"]
    chosen = next(
        c
        for c in fits
        if all(c[k] == best[k] for k in ("strategy", "micro_batch", "gradient_checkpointing", "offload"))
    )
    assert chosen["estimated_tokens_per_s"] >= 0.99 * max(c["estimated_tokens_per_s"] for c in fits)
    assert (
        f"--strategy {best['strategy']}" in best["command"]
        and f"--train.micro_batch_size {best['micro_batch']}" in best["command"]
    )
    assert cli.main([*base, "--gpu-memory", "1GiB", "--runtime-overhead", "1GiB"]) == 0
    assert "Nothing fits" in capsys.readouterr().out


def test_a_strategy_that_cannot_run_the_config_is_refused_and_left_out_of_the_plan(family_assets, tmp_path, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        f"model: {{path: {family_assets('mixtral') / 'base'}}}\n"
        "lora: {target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]}\n"
    )
    assert cli.main(["budget", "--config", str(run_yaml), "--strategy", "fsdp1", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "fsdp1 cannot run this config" in err and "Strategies that can: fsdp2, zero2, zero3, ddp." in err
    report = budget_json(capsys, "--config", str(run_yaml), "--strategy", "zero3", "--world-size", "2")
    held = report["ranks"][0]["components"]
    assert held["experts"] == 0 and held["experts_dequantized"] > 0  # the experts are 4-bit (base_4bit)
    assert held["lora"] > 0 and held["activations"] > 0
    assert cli.main(["plan", "--config", str(run_yaml), "--world-size", "2", "--gpu-memory", "80GiB", "--json"]) == 0
    planned = {c["strategy"] for c in json.loads(capsys.readouterr().out)["candidates"]}
    assert planned == {"fsdp2", "zero2", "zero3", "ddp"}


# --- train.offload: what moves from the GPU to host RAM -----------------------------------------


@pytest.mark.parametrize(
    "strategy,offload,moved",
    [
        ("fsdp2", "params", {"base_4bit", "frozen_dense", "norms", "lora", "gradients", "optimizer_states"}),
        (
            "zero3",
            "params",
            {"base_4bit", "frozen_dense", "norms", "lora", "gradients", "master_weights", "optimizer_states"},
        ),
        ("zero3", "optimizer", {"gradients", "master_weights", "optimizer_states"}),
        ("zero2", "optimizer", {"gradients", "master_weights", "optimizer_states"}),
    ],
)
def test_offload_moves_exactly_its_components_to_host_ram(llama_70b, capsys, strategy, offload, moved):
    common = ["--model", str(llama_70b), "--world-size", "2", "--seq-len", "2048", "--strategy", strategy]
    resident = budget_json(capsys, *common)
    offloaded = budget_json(capsys, *common, "--offload", offload)
    assert offloaded["offload"] == offload and resident["offload"] == "none"
    for before, after in zip(resident["ranks"], offloaded["ranks"], strict=True):
        host = after["host_components"]
        assert {name for name, size in host.items() if size} == moved, host
        # Every byte is somewhere: on the GPU or in host RAM, the static components still exact.
        for name, size in before["components"].items():
            assert after["components"][name] + host.get(name, 0) == size, name
            assert after["components"][name] == (0 if name in host else size), name
        assert after["host_total_bytes"] == sum(host.values())
        assert after["total_bytes"] == before["total_bytes"] - after["host_total_bytes"]
        assert after["components"]["quant_states"] > 0  # the 4-bit matmul reads them on the GPU


@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_activation_offload_moves_the_saved_activations_to_host_ram(llama_70b, capsys, offload):
    common = ["--model", str(llama_70b), "--world-size", "2", "--seq-len", "8192", "--strategy", "zero3"]
    common += ["--offload", offload]
    resident, offloaded = budget_json(capsys, *common), budget_json(capsys, *common, "--activation-offload")
    for before, after in zip(resident["ranks"], offloaded["ranks"], strict=True):
        moved = {name: size - before["host_components"].get(name, 0) for name, size in after["host_components"].items()}
        assert {name for name, size in moved.items() if size} == {"activations"}
        assert moved["activations"] == before["components"]["activations"] > 0
        assert after["components"]["activations"] == 0
        assert after["components"]["recompute"] == before["components"]["recompute"] > 0  # on the GPU, in backward
        assert after["total_bytes"] == before["total_bytes"] - moved["activations"]


def test_offload_moves_nothing_on_cpu_ranks(shape_dirs):
    cfg = load_config(None, [("model.path", str(shape_dirs["llama-gqa"])), ("strategy", "fsdp2")])
    offloaded = load_config(
        None,
        [
            ("model.path", str(shape_dirs["llama-gqa"])),
            ("strategy", "fsdp2"),
            ("train.offload", "params"),
            ("train.activation_offload", True),
        ],
    )
    hardware = predict.Hardware(world_size=2, device="cpu")
    for a, b in zip(predict.predict(cfg, hardware).ranks, predict.predict(offloaded, hardware).ranks, strict=True):
        assert a.components == b.components and b.host_components == {}


def test_offload_modes_are_validated_and_refused_per_strategy():
    from launcher.config import ConfigError

    with pytest.raises(ConfigError, match=r"`train.offload` is `gpu`; use none, optimizer or params"):
        load_config(None, [("train.offload", "gpu")])
    offered = {name: strategies.get(name).spec.offload_modes for name in strategies.NAMES}
    assert offered == {
        "fsdp2": ("none", "params"),
        "fsdp1": ("none",),
        "zero2": ("none", "optimizer"),
        "zero3": ("none", "optimizer", "params"),
        "ddp": ("none",),
    }
    with pytest.raises(ConfigError, match=r"fsdp1 cannot run this config: `train.offload: params` .*: fsdp2, zero3\."):
        strategies.check(strategies.get("fsdp1"), load_config(None, [("train.offload", "params")]))


def test_offload_reaches_the_deepspeed_config_from_the_run_config(monkeypatch, tmp_path):
    import torch

    from launcher.resources import shipped_dir

    for strategy, mode, keys in (
        ("zero3", "params", {"offload_param", "offload_optimizer"}),
        ("zero3", "optimizer", {"offload_optimizer"}),
        ("zero2", "optimizer", {"offload_optimizer"}),
        ("zero3", "none", set()),
    ):
        # What `accelerate launch` tells a rank: the shipped JSON of the strategy, which has no offload keys.
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(shipped_dir("ds_configs") / f"{strategy}.json"))
        train = load_config(None, [("train.offload", mode)]).train
        ds = strategies.get(strategy).plugins(train, torch.device("cpu"))["deepspeed_plugin"].deepspeed_config
        zero = ds["zero_optimization"]
        assert {k for k in ("offload_param", "offload_optimizer") if k in zero} == keys, (strategy, mode)
        for key in keys:
            assert zero[key] == {"device": "cpu", "pin_memory": True}
        assert ds.get("zero_force_ds_cpu_optimizer", True) is (mode == "none")
    # A JSON that offloads by itself disagrees with a run config that does not: refused, not overridden.
    edited = tmp_path / "zero3.json"
    shipped = json.loads((shipped_dir("ds_configs") / "zero3.json").read_text())
    shipped["zero_optimization"]["offload_param"] = {"device": "cpu"}
    edited.write_text(json.dumps(shipped))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(edited))
    from launcher.config import ConfigError

    with pytest.raises(ConfigError, match=r"sets offload_param, which is `train.offload: params`, but the run config"):
        strategies.get("zero3").plugins(load_config().train, torch.device("cpu"))


def test_offload_reaches_the_fsdp2_plugin():
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy

    train = load_config(None, [("train.offload", "params")]).train
    policy = strategies.get("fsdp2").plugins(train, torch.device("cpu"))["fsdp_plugin"].cpu_offload
    assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory is False  # a CPU-only torch cannot pin
    resident = strategies.get("fsdp2").plugins(load_config().train, torch.device("cpu"))["fsdp_plugin"].cpu_offload
    assert not isinstance(resident, CPUOffloadPolicy)


def test_plan_fits_llama_2_70b_on_two_24gb_gpus_with_offloaded_params(llama_70b, capsys):
    args = ["plan", "--model", str(llama_70b), "--world-size", "2", "--gpu-memory", "24GiB", "--seq-len", "2048"]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    best = report["recommended"]
    assert best is not None and best["offload"] == "params" and best["strategy"] in ("fsdp2", "zero3")
    assert "--train.offload params" in best["command"] and f"--strategy {best['strategy']}" in best["command"]
    # Without offloaded parameters nothing fits on whole sequences: the 4-bit base alone is ~16 GiB per rank;
    # split across both ranks (half the activations each), ZeRO-3 with its optimizer in host RAM just does.
    resident = [c for c in report["candidates"] if c["offload"] != "params" and c["fits"]]
    assert resident and all(c["sequence_parallel"] == 2 and c["strategy"] == "zero3" for c in resident)
    assert all(c["host_bytes"] > 15 * 2**30 for c in report["candidates"] if c["offload"] == "params")


def test_plan_finds_llama_3_8b_at_64k_and_128k_tokens_and_bounds_host_ram(tmp_path, capsys):
    """The issue's targets: Llama-3-8B on 2 x 24 GiB at 65,536 tokens (whole sequences fit only with the
    activations in host RAM, ~20 GiB of it per rank; split across both ranks with half of that) and 131,072
    (split, and offloaded); the chunked loss is on by default. --host-memory leaves out what a node's RAM
    cannot hold."""
    config = {**LLAMA_2_70B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}
    config |= {
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))

    def plan(*extra: str) -> dict:
        args = ["plan", "--model", str(path), "--world-size", "2", "--gpu-memory", "24GiB", "--json", *extra]
        assert cli.main(args) == 0
        return json.loads(capsys.readouterr().out)

    whole = plan("--seq-len", "65536", "--sequence-parallel", "1")
    fitting = [c for c in whole["candidates"] if c["fits"]]
    assert fitting and all(c["activation_offload"] and c["gradient_checkpointing"] for c in fitting)
    assert "--train.activation_offload true" in whole["recommended"]["command"]
    assert plan("--seq-len", "65536", "--sequence-parallel", "1", "--host-memory", "24GiB")["recommended"] is None
    split = plan("--seq-len", "65536", "--host-memory", "24GiB")
    fitting = [c for c in split["candidates"] if c["fits"]]
    assert fitting and all(c["sequence_parallel"] == 2 and c["host_bytes"] < 12 * 2**30 for c in fitting)
    assert "--train.sequence_parallel 2" in split["recommended"]["command"]
    args = ["plan", "--model", str(path), "--world-size", "2", "--gpu-memory", "24GiB", "--seq-len", "65536"]
    assert cli.main([*args, "--host-memory", "16GiB"]) == 0  # what fits the GPUs needs more host RAM: said so
    assert "need more than 16.00 GiB of host RAM per node" in capsys.readouterr().out
    longest = plan("--seq-len", "131072")
    fitting = [c for c in longest["candidates"] if c["fits"]]
    assert fitting and all(c["sequence_parallel"] == 2 and c["activation_offload"] for c in fitting)


def test_longest_context_is_the_last_multiple_of_1024_that_fits(tmp_path, capsys):
    from launcher.memory.planner import candidates

    config = {**LLAMA_2_70B, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4}
    config |= {"num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    args = ["plan", "--model", str(path), "--world-size", "2", "--gpu-memory", "3GiB", "--longest-context", "--json"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    found, limit = report["strategies"], report["limit_bytes"]
    assert set(found) == set(strategies.NAMES)
    cfg = load_config(None, [("model.path", str(path))])
    hardware = predict.Hardware(world_size=2, gpu_memory=3 * 2**30)
    for strategy in ("fsdp2", "ddp"):
        seq = found[strategy]["max_seq_len"]
        assert seq % 1024 == 0 and found[strategy]["peak_bytes"] <= limit
        assert f"--data.max_seq_len {seq} " in found[strategy]["command"]
        longer = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=seq + 1024))
        assert not any(c.fits(limit) for c in candidates(longer, hardware, only=(strategy,)))
    assert found["fsdp2"]["max_seq_len"] > found["ddp"]["max_seq_len"]  # sharding leaves more room for activations
