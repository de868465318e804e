"""bench/gpu.py without a GPU: the no-CUDA exit, its arguments, the run it would start, and its tables read
back from a run directory in the launcher's own format (memory_budget.json, shard_report.json, metrics.jsonl)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(path: Path, ranks: int = 2, activations: tuple[int, ...] = (300 * MiB, 300 * MiB)) -> Path:
    """A finished fsdp2 run on CUDA as the launcher writes it (MemoryMeter.finish, run.summary.rank_report, MetricsLog)."""
    path.mkdir(parents=True)
    weights = {"base_4bit": 2 * GiB, "quant_states": 200 * MiB, "frozen_dense": 250 * MiB, "experts": 0}
    weights |= {"biases": 0, "norms": 256 * 1024, "buffers": 64, "lora": 40 * MiB, "shard_padding": 0}
    optimizer = {"gradients": 40 * MiB, "master_weights": 0, "optimizer_states": 80 * MiB}
    estimated = {"recompute": 100 * MiB, "logits_backward": 250 * MiB, "gathered_params": 600 * MiB}
    estimated |= {"comm_buckets": 40 * MiB, "runtime": GiB}
    predicted, measured = [], []
    for r in range(ranks):
        held = {**weights, **optimizer, "activations": 300 * MiB, **estimated}
        predicted.append({"rank": r, "components": held, "host_components": {}, "total_bytes": sum(held.values())})
        mine = {**weights, **optimizer, "activations": activations[r]}
        cuda = {"allocated_after_sharding_bytes": 3 * GiB, "peak_allocated_bytes": 4 * GiB}
        cuda |= {"peak_reserved_bytes": 5 * GiB, "first_steps": [{"peak_allocated_bytes": 4 * GiB}]}
        measured.append({"rank": r, "components": mine, "total_bytes": sum(mine.values()), "cuda": cuda})
    budget = {
        "schema_version": 1,
        "activation_shape": [1, 512],
        "predicted": {"strategy": "fsdp2", "world_size": ranks, "micro_batch": 1, "seq_len": 512, "ranks": predicted},
        "measured": {"ranks": measured},
        "comparison": [],
    }
    (path / "memory_budget.json").write_text(json.dumps(budget))
    check = {"checked": 14, "of": 14, "differing": []}
    shards = [
        {"rank": r, "strategy": "fsdp2", "peak_device_bytes": 4 * GiB + MiB, "packed_weights_in_first_forward": check}
        for r in range(ranks)
    ]
    (path / "shard_report.json").write_text(json.dumps(shards))
    steps = [
        {"step": s, "loss": 10.5 - s / 10, "tokens": 1024, "tokens_per_s": 2048.0, "elapsed_s": 2.0 + 0.5 * (s - 1)}
        for s in (1, 2, 3)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    return path


def test_without_cuda_it_says_so_in_one_line_and_exits_2_before_building_anything(tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(work)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1
    assert "no CUDA device" in out.stderr and "Nothing was built" in out.stderr
    assert not work.exists()


def test_arguments_default_to_fsdp2_at_512_and_2048_and_refuse_bad_lengths(gpu):
    args = gpu.parse_args([])
    assert (args.strategy, args.seq_lens, args.nproc, args.layers) == ("fsdp2", [512, 2048], None, 32)
    assert gpu.parse_args(["--strategy", "zero3", "--seq-lens", "1024"]).seq_lens == [1024]
    for bad in (["--seq-lens", "0"], ["--seq-lens", "x"], ["--strategy", "fsdp3"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)


def test_the_train_command_is_one_the_launcher_accepts(gpu, tmp_path):
    from launcher.cli import build_parser
    from launcher.config import load_config, parse_overrides

    (tmp_path / "run.yaml").write_text(json.dumps(gpu.run_config(tmp_path / "base", tmp_path / "data.jsonl", 5)))
    cmd = gpu.train_command(tmp_path, "fsdp2", 4, 2048)
    assert cmd[1:4] == ["-m", "launcher", "train"]
    args, extra = build_parser().parse_known_args(cmd[3:])
    assert (args.strategy, args.nproc) == ("fsdp2", 4)
    cfg = load_config(args.config, parse_overrides(extra))
    assert (cfg.data.max_seq_len, cfg.train.micro_batch_size, cfg.train.max_steps) == (2048, 1, 5)
    assert cfg.output_dir == str(gpu.run_dir(tmp_path, "fsdp2", 2048))
    assert cfg.model.quant_cache_dir == str(tmp_path / "quant-cache")


def test_tokens_per_s_leaves_out_the_first_step(gpu):
    steps = [{"tokens": 100, "elapsed_s": 5.0, "tokens_per_s": 20.0}, {"tokens": 100, "elapsed_s": 6.0}]
    assert gpu.steady_tokens_per_s(steps + [{"tokens": 300, "elapsed_s": 7.0}]) == 200.0
    assert gpu.steady_tokens_per_s(steps[:1]) == 20.0 and gpu.steady_tokens_per_s([]) is None


def test_the_table_puts_each_component_and_the_cuda_peaks_next_to_the_prediction(gpu, tmp_path):
    text = gpu.render_run(fake_run(tmp_path / "run"))
    lines = text.splitlines()
    assert "fsdp2 on 2 rank(s), micro batch 1 x 512 tokens, 3 steps; loss 10.4000 -> 10.2000" in lines[0]
    assert "2,048 tokens/s (all ranks, steps 2-3)" in lines[0]
    assert lines[1] == "predicted: `qlaunch budget` for the run's config (fsdp2, 2 ranks, 512 tokens)"
    header = next(line for line in lines if line.startswith("predicted / measured"))
    assert "ranks 0-1" in header  # equal ranks share a column
    row = {line.split("  ")[0]: line for line in lines[4:]}
    assert row["base_4bit"].rstrip().endswith("2.00 GiB / 2.00 GiB (+0.00%)")
    assert row["gathered_params"].rstrip().endswith("600.00 MiB / —")  # estimated, not measured
    assert "experts" not in row  # zero on both sides
    # The allocator sees no CUDA context: its peak is compared without the 1 GiB runtime allowance.
    predicted = 2 * GiB + 200 * MiB + 250 * MiB + 256 * 1024 + 64 + 40 * MiB + 120 * MiB + 300 * MiB + 990 * MiB
    assert f"{predicted / GiB:.2f} GiB / 4.00 GiB" in row["torch.cuda peak allocated, steps"]
    assert f"{(predicted + GiB) / GiB:.2f} GiB / 5.00 GiB" in row["torch.cuda peak reserved, steps"]
    assert "/ 4.00 GiB" in row["torch.cuda peak allocated, whole run"]


def test_ranks_that_differ_get_their_own_column_and_report_reads_runs_without_cuda(gpu, tmp_path, capsys):
    run = fake_run(tmp_path / "run", ranks=3, activations=(300 * MiB, 300 * MiB, 150 * MiB))
    assert gpu.main(["--report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ranks 0-1" in out and "rank 2" in out and "300.00 MiB / 150.00 MiB (+100.00%)" in out


def test_the_1945_note_says_what_was_and_was_not_checked(gpu):
    line = "max |logit difference| = 3.125e-02 (FAILED, tolerance 0.01)"
    assert gpu.parse_verify("loading...\n" + line) == (0.03125, False)
    assert gpu.parse_verify("Traceback ...") == (None, False)
    failed = gpu.issue_1945(2, 5, (0.03125, False, line), 0.01)
    assert "--strategy ddp" in failed and "3.125e-02, FAILED at tolerance 0.01" in failed
    same = {"checked": 224, "of": 224, "differing": []}
    assert gpu.bytes_verdict([("a rank 0", same), ("a rank 1", same)]) == (
        True,
        ["  byte for byte: OK, on 2 rank runs all 224 4-bit weights were rank 0's bytes in the first forward"],
    )
    ok, lines = gpu.bytes_verdict(
        [("a rank 0", same), ("a rank 1", {**same, "differing": ["model.layers.3.mlp.up_proj"]})]
    )
    assert not ok and "a rank 1: 1 of 224 differ: ['model.layers.3.mlp.up_proj']" in lines[1]
    assert gpu.bytes_verdict([("a rank 0", None)])[0] is False and gpu.bytes_verdict([])[0] is False


def test_the_byte_check_is_read_from_each_rank_of_each_run(gpu, tmp_path):
    runs = [fake_run(tmp_path / "a"), fake_run(tmp_path / "b", ranks=3, activations=(MiB,) * 3)]
    checks = gpu.packed_checks(runs)
    assert [where for where, _ in checks] == ["a rank 0", "a rank 1", "b rank 0", "b rank 1", "b rank 2"]
    assert gpu.bytes_verdict(checks)[0] is True
    single = gpu.issue_1945(1, 5, (1e-3, True, ""), 0.01)
    assert "1 rank: nothing was sharded" in single and "OK at tolerance" in single
    assert "skipped" in gpu.issue_1945(2, 5, None, 0.01)


def test_the_model_has_llama_2_7b_s_shape_and_is_saved_in_bf16_with_a_marker_written_last(gpu, tmp_path, monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        full = LlamaForCausalLM(LlamaConfig(**gpu.LLAMA2_7B, num_hidden_layers=32, tie_word_embeddings=False))
    assert sum(p.numel() for p in full.parameters()) == 6_738_415_616  # Llama-2-7b-hf's count
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
    monkeypatch.setattr(gpu, "LLAMA2_7B", {**gpu.LLAMA2_7B, **tiny, "vocab_size": 300})
    gpu.build_model(tmp_path / "base", layers=1)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "base" / gpu.BUILT).read_text())["layers"] == 1
    assert (tmp_path / "base" / "tokenizer.json").is_file() and torch.get_default_dtype() == torch.float32
