"""What used to fail inside every rank, after the process group started, fails before any process starts:
missing or damaged weight files, LoRA targets the model does not have, a resume that cannot work."""

import dataclasses
import json
import re
import shutil
import struct

import pytest
import torch
import torch.distributed as dist

from launcher import cli, preflight, strategies
from launcher.checkpoint import store
from launcher.config import ConfigError, load_config, parse_overrides


def train(capsys, run_yaml, out, *extra) -> tuple[int, str]:
    code = cli.main(["train", "--config", str(run_yaml), "--nproc", "2", "--output_dir", str(out), *extra])
    return code, capsys.readouterr().err


def refused(capsys, run_yaml, out, *extra) -> str:
    """The error `qlaunch train` stops with, having started nothing and written nothing."""
    before = sorted(out.rglob("*")) if out.exists() else None
    code, err = train(capsys, run_yaml, out, *extra)
    assert code == 2, err
    assert not dist.is_initialized()
    assert (sorted(out.rglob("*")) if out.exists() else None) == before
    return err


@pytest.fixture
def model_copy(demo_assets, tmp_path):
    """A copy of the demo's model directory to damage, and a run config that trains on it."""
    model = shutil.copytree(demo_assets / "base", tmp_path / "model")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text((demo_assets / "run.yaml").read_text().replace(str(demo_assets / "base"), str(model)))
    return model, run_yaml


def test_model_directory_without_weights(model_copy, tmp_path, capsys, no_launch):
    model, run_yaml = model_copy
    (model / "model.safetensors").unlink()
    err = refused(capsys, run_yaml, tmp_path / "out")
    assert f"Model directory `{model}` has config.json but no weights (model.safetensors or " in err
    assert "it holds config.json, generation_config.json, tokenizer.json" in err


def test_truncated_safetensors(model_copy, tmp_path, capsys, no_launch):
    model, run_yaml = model_copy
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    err = refused(capsys, run_yaml, tmp_path / "out")
    assert f"Weight file `{weights}` is truncated: expected {size:,} bytes, found {size - 1000:,}." in err
    assert "Copy or download it again." in err
    with pytest.raises(ConfigError, match="is truncated"):  # and so does each rank
        preflight.resolve_run(load_config(run_yaml), 2)


def test_sharded_index_naming_a_missing_shard(model_copy, tmp_path, capsys, no_launch):
    model, run_yaml = model_copy
    names = json.loads(_header(model / "model.safetensors"))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {name: shards[i % 2] for i, name in enumerate(sorted(names)) if name != "__metadata__"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model / "model.safetensors").rename(model / shards[0])
    err = refused(capsys, run_yaml, tmp_path / "out")
    assert f"`{model / 'model.safetensors.index.json'}` lists 2 weight files, but 1 of them are not in" in err
    assert shards[1] in err and "Copy or download the missing shards again" in err


@pytest.mark.parametrize(
    "offset,written,message",
    [
        (8, b"{not json!", r"is corrupt: its safetensors header does not parse \(JSONDecodeError"),
        (0, struct.pack("<Q", 1 << 40), r"is not a valid safetensors file: its first 8 bytes give a header of "),
    ],
)
def test_corrupt_safetensors_header(model_copy, tmp_path, capsys, no_launch, offset, written, message):
    model, run_yaml = model_copy
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(offset)
        f.write(written)
    err = refused(capsys, run_yaml, tmp_path / "out")
    assert re.search(f"Weight file `{re.escape(str(weights))}` {message}", err), err


def _header(path) -> str:
    with open(path, "rb") as f:
        return f.read(struct.unpack("<Q", f.read(8))[0]).decode()


def test_truncated_pytorch_archive(model_copy, tmp_path, capsys, no_launch):
    model, run_yaml = model_copy
    (model / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(256)}, model / "pytorch_model.bin")
    with open(model / "pytorch_model.bin", "r+b") as f:
        f.truncate(600)
    err = refused(capsys, run_yaml, tmp_path / "out")
    assert f"`{model / 'pytorch_model.bin'}` is truncated or corrupt: a zip archive (torch.save)" in err


def test_weights_of_a_cached_hub_id_and_a_named_weights_file(model_copy, tmp_path, monkeypatch):
    from huggingface_hub import constants

    model, _ = model_copy
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = shutil.copytree(model, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    cfg = load_config(None, parse_overrides(["--model.path", "acme/tiny"]))
    preflight.check_model(cfg, strategies.get("fsdp2"))
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(
        ConfigError,
        match=r"\(the cached copy of `acme/tiny`\) has config.json but no weights .*"
        r"Download it again \(`huggingface-cli download acme/tiny`\)",
    ):
        preflight.check_model(cfg, strategies.get("fsdp2"))
    # A config naming its weights file (`transformers_weights`): from_pretrained reads that one only.
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_weights": "weights.safetensors"}))
    cfg = load_config(None, parse_overrides(["--model.path", str(model)]))
    with pytest.raises(ConfigError, match=r"no weights \(weights.safetensors\)"):
        preflight.check_model(cfg, strategies.get("fsdp2"))
    (model / "model.safetensors").rename(model / "weights.safetensors")
    preflight.check_model(cfg, strategies.get("fsdp2"))


LLAMA_LINEAR = "Its linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (all-linear"


@pytest.mark.parametrize(
    "targets,message",
    [
        (
            "[nope]",
            r"No name in `lora.target_modules` \(nope\) matches a module of `.*base`\. " + re.escape(LLAMA_LINEAR),
        ),
        (
            "[q_proj, nope_proj]",
            r"`lora.target_modules` names nope_proj, which match no module of `.*base`: peft would adapt the other "
            r"names only, and train fewer adapters than asked\. "
            + re.escape(LLAMA_LINEAR)
            + r".* Correct or drop it\.",
        ),
        (".*nope", r"regular expression over full module names \(such as `model.layers.0.self_attn.q_proj`\)"),
        ("q_proj(", r"which peft reads as a regular expression, and it does not compile \(missing \)"),
        ("[]", r"`lora.target_modules` is empty and there is no `lora.target_parameters`"),
    ],
)
def test_lora_targets_the_model_lacks(demo_assets, tmp_path, capsys, no_launch, targets, message):
    err = refused(capsys, demo_assets / "run.yaml", tmp_path / "out", "--lora.target_modules", targets)
    assert re.search(message, err), err
    # Each rank of a plain `accelerate launch` checks the same before its process group.
    cfg = load_config(demo_assets / "run.yaml", parse_overrides(["--lora.target_modules", targets]))
    with pytest.raises(ConfigError, match=message):
        preflight.resolve_run(cfg, 2)


def family_config(root, out, *extra):
    args = ["--model.path", str(root / "base"), "--data.path", str(root / "data.jsonl"), "--output_dir", str(out)]
    return load_config(None, parse_overrides([*args, *extra]))


def test_target_lists_on_a_moe_family(demo_assets, family_assets, tmp_path):
    # Mixtral (transformers 5): attention projections are modules, its experts fused 3D parameters.
    mixtral = family_assets("mixtral")
    for targets in ("[q_proj, k_proj, v_proj, o_proj]", r".*\.(q|v)_proj"):
        cfg = family_config(mixtral, tmp_path / "out", "--lora.target_modules", targets)
        assert preflight.check_all(cfg, 2).name == "fsdp2"
    # A Llama-style list: peft would silently adapt the attention only.
    llama_style = family_config(mixtral, tmp_path / "out", "--lora.target_modules", "[q_proj, v_proj, gate_proj]")
    with pytest.raises(
        ConfigError,
        match=r"names gate_proj, which match no module .* Its linear layers: k_proj, o_proj, q_proj, v_proj .* "
        r"MoE experts are 3D parameters, which `lora.target_parameters: \[mlp.experts.down_proj, "
        r"mlp.experts.gate_up_proj\]` adapts",
    ):
        preflight.check_all(llama_style, 2)
    # Expert names from before transformers 5 fused them: peft adapts those parameters, without dropout.
    v4_names = ("--lora.target_modules", "[q_proj, w1, w2, w3]")
    with pytest.raises(ConfigError, match=r"peft adapts them as the parameters down_proj, gate_up_proj, and takes"):
        preflight.check_all(family_config(mixtral, tmp_path / "out", *v4_names), 2)
    preflight.check_all(family_config(mixtral, tmp_path / "out", *v4_names, "--lora.dropout", "0"), 2)
    # A Llama list on the demo's Llama passes; checked in each rank too.
    overrides = ["--output_dir", str(tmp_path / "out"), "--lora.target_modules", "[q_proj, v_proj]"]
    cfg = load_config(demo_assets / "run.yaml", parse_overrides(overrides))
    assert preflight.resolve_run(cfg, 2).cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_resume_from_a_directory_that_is_not_a_checkpoint(demo_assets, tmp_path, capsys, no_launch):
    (tmp_path / "not-a-checkpoint").mkdir()
    err = refused(capsys, demo_assets / "run.yaml", tmp_path / "out", "--resume", str(tmp_path / "not-a-checkpoint"))
    assert f"`{tmp_path / 'not-a-checkpoint'}` is not a complete checkpoint (no meta.json)" in err


def fake_checkpoint(cfg, world: int = 2):
    """A complete checkpoint's meta.json (store.save's), as the ranks of `cfg` would write it."""
    setup = preflight.resolve_run(dataclasses.replace(cfg, resume=""), world)
    step = store.checkpoint_root(cfg.output_dir) / store.step_name(10)
    step.mkdir(parents=True)
    values = store.fingerprint(setup.cfg)
    meta = {
        "step": 10,
        "world_size": world,
        "strategy": setup.strategy.name,
        "checkpoint_format": setup.strategy.spec.checkpoint_format,
        "fingerprint": values,
        "fingerprint_sha256": store.fingerprint_hash(values),
    }
    (step / store.META).write_text(json.dumps(meta, indent=2, default=str))
    (step.parent / store.LATEST).write_text(step.name)
    return step


def test_resume_with_a_changed_lora_rank(demo_assets, tmp_path, capsys, no_launch):
    out = tmp_path / "out"
    cfg = load_config(demo_assets / "run.yaml", parse_overrides(["--output_dir", str(out)]))
    step = fake_checkpoint(cfg)
    assert preflight.check_all(dataclasses.replace(cfg, resume="auto"), 2).name == "fsdp2"
    err = refused(capsys, demo_assets / "run.yaml", out, "--resume", str(out), "--lora.r", "8")
    assert f"Cannot resume from `{step}`: the run config changed where the checkpoint depends on it" in err
    assert "lora.r: 16 -> 8" in err


def test_moving_caches_or_trackers_does_not_block_a_resume(demo_assets, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(demo_assets / "run.yaml", parse_overrides(["--output_dir", str(out)]))
    step = fake_checkpoint(cfg)
    meta = json.loads((step / store.META).read_text())
    meta["fingerprint"]["data.cache_dir"] = "/old/cache"  # written when the key was still in the fingerprint
    (step / store.META).write_text(json.dumps(meta))
    moved = ["--model.quant_cache_dir", str(tmp_path / "qc"), "--data.cache_dir", str(tmp_path / "dc")]
    moved += ["--train.report_to", "[tensorboard]", "--train.run_name", "again", "--resume", "auto"]
    assert preflight.check_all(
        load_config(demo_assets / "run.yaml", parse_overrides(["--output_dir", str(out), *moved])), 2
    )


def test_auto_precision_on_cuda_is_left_to_the_ranks(demo_assets, tmp_path, monkeypatch):
    # The ranks resolve "auto" on their own devices; before launch, only the other keys are compared.
    out = tmp_path / "out"
    cfg = load_config(demo_assets / "run.yaml", parse_overrides(["--output_dir", str(out)]))
    fake_checkpoint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision="bf16")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", pytest.fail)  # would make a CUDA context here
    assert preflight.check_all(dataclasses.replace(cfg, resume="auto"), 2).name == "fsdp2"
    changed = dataclasses.replace(cfg, resume="auto", lora=dataclasses.replace(cfg.lora, r=8))
    with pytest.raises(ConfigError, match="lora.r: 16 -> 8"):
        preflight.check_all(changed, 2)


def test_fp16_autocast_never_casts_4bit_data_stored_as_bf16():
    """On GPUs without bf16 "auto" picks fp16, and FSDP and DeepSpeed cast every parameter to it: bf16-stored
    packed bytes would be rewritten. Refused, unless the 4-bit compute dtype (so the storage) is fp16 too."""
    from launcher import strategies

    cfg = load_config(None, [("quant.compute_dtype", "bfloat16")])  # what "auto" is on a GPU with bf16
    for name in ("fsdp2", "fsdp1", "zero2", "zero3"):
        with pytest.raises(ConfigError, match=r"would rewrite the 4-bit data stored as torch.bfloat16.*float16"):
            strategies.dtype_policy(cfg.quant, strategies.get(name), "fp16")
        assert strategies.dtype_policy(cfg.quant, strategies.get(name), "bf16").quant_storage == torch.bfloat16
        fp16 = load_config(None, [("quant.compute_dtype", "float16")])
        assert strategies.dtype_policy(fp16.quant, strategies.get(name), "fp16").quant_storage == torch.float16
    # DDP casts nothing (autocast only).
    assert strategies.dtype_policy(cfg.quant, strategies.get("ddp"), "fp16").quant_storage == torch.bfloat16


def test_fsdp2_refuses_an_output_layer_sharing_a_parameter_with_its_parent(tmp_path, capsys, no_launch, demo_assets):
    """BERT's causal-LM head registers its output bias on the output layer and on the head around it; FSDP2 shards
    the output layer in a unit of its own and torch refuses a parameter in two units. ZeRO-3 trains it."""
    from support.families import Family, build_family
    from support.tiny_configs import tiny_config

    assets = build_family(Family("bert", "", lambda tokens: tiny_config("bert")), tmp_path / "bert")
    args = ["--model.path", str(assets / "base"), "--data.path", str(assets / "data.jsonl")]
    err = refused(capsys, demo_assets / "run.yaml", tmp_path / "out", *args)
    assert "fsdp2 cannot shard" in err and "`cls.predictions.bias`" in err and "zero3" in err
    cfg = load_config(None, parse_overrides([*args, "--strategy", "zero3"]))
    preflight.check_model(cfg, strategies.get("zero3"))
    preflight.check_model(load_config(demo_assets / "run.yaml"), strategies.get("fsdp2"))  # tied embeddings pass


def test_zero3_refuses_a_model_that_writes_its_weights_in_eval_mode():
    """RWKV rescales its weights in place when it runs in eval mode (the end-of-run check does): ZeRO-3 holds them
    partitioned there, and the ranks failed after training. FSDP2 trains it (bench/family_sweep.py)."""
    from support.tiny_configs import meta_model, tiny_config

    reason = strategies.get("zero3").model_refusal(meta_model(tiny_config("rwkv")))
    assert reason and "attention.output.weight" in reason and "RWKV rescales" in reason
    assert strategies.get("fsdp2").model_refusal(meta_model(tiny_config("rwkv"))) is None
    assert strategies.get("zero3").model_refusal(meta_model(tiny_config("llama"))) is None
