"""Bad input: a clear error naming the problem and the fix, before any process group or launch."""

import dataclasses
import json
import re

import pytest
import torch.distributed as dist

from launcher import cli


def train(capsys, *args) -> tuple[int, str]:
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--strategy", "zero4"], r"Unknown strategy `zero4`. Choose one of: fsdp2, fsdp1, zero2, zero3, ddp"),
        (
            ["--model.path", "/nonexistent/model"],
            r"Model `/nonexistent/model` not found.*Set `model.path` to a directory",
        ),
        (["--train.lrr", "1e-4"], r"Unknown config key `train.lrr`. Did you mean `train.lr`\?"),
        (["--lora.r", "0"], r"`lora.r` must be a positive integer, got 0"),
        (["--data.path", "/nonexistent/data.jsonl"], r"Dataset `/nonexistent/data.jsonl` does not exist"),
        (["--nproc", "0"], r"`--nproc` must be at least 1, got 0"),
        # Found by tokenizing before the launch (into the cache the ranks would read), not once per rank.
        (
            ["--train.micro_batch_size", "300"],
            r"makes 512 rows .* one optimizer step needs 600 .* 2 data-parallel ranks",
        ),
    ],
)
def test_bad_input_fails_before_launch(demo_assets, tmp_path, capsys, no_launch, extra, message):
    code, err = train(
        capsys, "--config", str(demo_assets / "run.yaml"), "--nproc", "2", "--output_dir", str(tmp_path / "out"), *extra
    )
    assert code == 2
    assert re.search(message, err), err
    assert not dist.is_initialized()
    assert not (tmp_path / "out").exists()


def test_dataset_without_needed_fields(demo_assets, tmp_path, capsys, no_launch):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "t1", "answer": "t2"}) + "\n")
    code, err = train(capsys, "--config", str(demo_assets / "run.yaml"), "--nproc", "2", "--data.path", str(data))
    assert code == 2
    assert "has fields ['answer', 'question']" in err and "`data.text_field`" in err


def test_existing_run_is_never_overwritten_unasked(demo_assets, tmp_path, capsys, no_launch):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"precious")
    code, err = train(capsys, "--config", str(demo_assets / "run.yaml"), "--nproc", "2", "--output_dir", str(out))
    assert code == 2 and "already holds a run" in err and "overwrite_output_dir" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"precious"


@pytest.mark.parametrize("left_behind,refused", [("metrics.jsonl", False), ("adapter", True)])
def test_auto_resume_without_checkpoint_restarts_only_an_unfinished_run(demo_assets, tmp_path, left_behind, refused):
    # What each rank checks when `--resume auto` finds no checkpoint: a requeued job killed before its
    # first checkpoint left only a metrics log and starts over; a finished run's adapter is never replaced.
    from launcher import preflight
    from launcher.config import ConfigError, load_config, parse_overrides

    out = tmp_path / "out"
    out.mkdir()
    if left_behind == "adapter":
        (out / "adapter").mkdir()
    else:
        (out / left_behind).write_text("{}\n")
    cfg = load_config(str(demo_assets / "run.yaml"), parse_overrides(["--output_dir", str(out), "--resume", "auto"]))
    if refused:
        with pytest.raises(ConfigError, match="already holds a run \\(adapter\\)"):
            preflight.check_output_dir(cfg)
    else:
        preflight.check_output_dir(cfg)
    cfg = dataclasses.replace(cfg, resume="")
    with pytest.raises(ConfigError, match="already holds a run"):
        preflight.check_output_dir(cfg)


def test_each_rank_validates_before_its_process_group(demo_assets, capsys, monkeypatch):
    # Under `accelerate launch` every rank runs this check itself, before Accelerator() joins the group.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    code, err = train(capsys, "--config", str(demo_assets / "run.yaml"), "--strategy", "fsdp2")
    assert code == 2
    assert "asks for strategy `fsdp2` but `accelerate launch` was given a config for `zero3`" in err
    assert not dist.is_initialized()


def test_dataset_that_is_not_utf8_is_refused_before_launch(demo_assets, tmp_path, capsys, no_launch):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "caf\xe9 t1 t2"}\n' * 8)
    args = ("--config", str(demo_assets / "run.yaml"), "--nproc", "2", "--data.path", str(data))
    code, err = train(capsys, *args, "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "o"))
    assert code == 2
    assert "is not UTF-8 text: invalid continuation byte (byte 0xe9 in b'caf\\xe9 t1 t2')" in err
    assert "iconv" in err and not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
