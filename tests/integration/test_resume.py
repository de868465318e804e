"""Resumable checkpoints for real: exact resume on every strategy, kills, export round trips.

Dropout is on, so the RNG states matter; the dataset is small (10 steps an epoch) so the resumed
half crosses an epoch boundary. Run A trains 2k steps in one go, saving at step k; run B is a fresh
launch resuming from A's step-k checkpoint into its own output directory. Each strategy resumes a
different model family (RESUME_FAMILY), so tied embeddings, biases and adapted MoE experts go
through a checkpoint too; the kill tests use the demo's Llama.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launcher import strategies
from launcher.strategies import NAMES as STRATEGIES
from support.families import BY_NAME
from support.launches import (
    load_probes,
    probe_launch_command,
    probe_runs_command,
    qlaunch,
    read_metrics,
    run_command,
    start_command,
    tail,
    wait_for,
)

K = 6
RESUME_FAMILY = {
    "fsdp2": "qwen2",
    "fsdp1": "gemma2",
    "zero2": "qwen3-moe",
    "zero3": "mixtral-experts",
    "ddp": "llama-tied",
}
RECORDS = 40  # global batch 4: 10 optimizer steps per epoch


@pytest.fixture(scope="module")
def small_data(demo_assets, tmp_path_factory) -> Path:
    return first_records(demo_assets / "data.jsonl", tmp_path_factory.mktemp("data") / "small.jsonl")


def first_records(data: Path, path: Path) -> Path:
    path.write_text("\n".join(data.read_text().splitlines()[:RECORDS]) + "\n")
    return path


def args(demo_assets, data: Path, out: Path, strategy: str, steps: int, *extra: str) -> list[str]:
    """A run of the demo's model (its run.yaml) on `data`."""
    return ["--config", str(demo_assets / "run.yaml"), *common_args(data, out, strategy, steps, *extra)]


def family_args(assets: Path, family: str, out: Path, strategy: str, steps: int, *extra: str) -> list[str]:
    """A run of a support/families.py model (built in `assets`) on its first RECORDS records."""
    data = assets / "small.jsonl"
    if not data.is_file():
        first_records(assets / "data.jsonl", data)
    model = ["--model.path", str(assets / "base"), *BY_NAME[family].run_args]
    return [*model, *common_args(data, out, strategy, steps, *extra)]


def common_args(data: Path, out: Path, strategy: str, steps: int, *extra: str) -> list[str]:
    return [
        "--strategy",
        strategy,
        "--data.path",
        str(data),
        "--output_dir",
        str(out),
        "--train.micro_batch_size",
        "2",
        "--train.max_steps",
        str(steps),
        "--train.warmup_steps",
        "2",
        "--lora.dropout",
        "0.1",
        "--checkpoint.every_steps",
        str(K),
        *extra,
    ]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def launch(strategy, root: Path, name: str, train_args, env=None):
    log = root / f"{name}.log"
    proc = run_command(probe_launch_command(strategy, root / name, train_args), log, env=env)
    return proc, log


@pytest.fixture(scope="module")
def uninterrupted(family_assets, tmp_path_factory):
    """Runs A and B of a strategy on its RESUME_FAMILY, in one launch and shared: A trains 2k steps in one go,
    saving at step k; then B, in the same ranks (dist_probe.py --runs: a new run as a new process starts it),
    resumes from A's checkpoint at step k and trains to 2k. Returns the root, with each run's part of the launch
    log in A.log and B.log."""
    roots: dict[str, Path] = {}

    def run_a_then_b(strategy: str) -> Path:
        if strategy not in roots:
            root = tmp_path_factory.mktemp(f"resume-{strategy}")
            checkpoint = root / "A" / "checkpoints" / f"step-{K:06d}"
            runs = [
                {
                    "probe_dir": str(root / "A"),
                    "args": resume_args(family_assets, root / "A", strategy, 2 * K, *fresh_quant_cache(root)),
                },
                {
                    "probe_dir": str(root / "B"),
                    "args": resume_args(
                        family_assets,
                        root / "B",
                        strategy,
                        2 * K,
                        "--resume",
                        str(checkpoint),
                        *fresh_quant_cache(root),
                    ),
                },
            ]
            (root / "runs.json").write_text(json.dumps(runs))
            log = root / "launch.log"
            proc = run_command(probe_runs_command(strategy, root / "runs.json"), log, timeout=600)
            assert proc.returncode == 0, tail(log)
            a_part, b_part = split_runs(log.read_text(), [root / "A", root / "B"])
            (root / "A.log").write_text(a_part)
            (root / "B.log").write_text(b_part)
            roots[strategy] = root
        return roots[strategy]

    return run_a_then_b


def split_runs(text: str, probe_dirs: list[Path]) -> list[str]:
    """A --runs launch's log cut at the line dist_probe.py prints as each run starts."""
    starts = [text.index(f"dist_probe: run {directory}\n") for directory in probe_dirs]
    return [text[start:end] for start, end in zip(starts, [*starts[1:], len(text)], strict=True)]


def fresh_quant_cache(root: Path) -> list[str]:
    """Runs A and B share a quantized-base cache of their own: A starts cold (quantizes and writes it), B,
    a second start, reads it; B's losses equal A's only if the cached base is A's bit for bit."""
    return ["--model.quant_cache_dir", str(root / "quant-cache")]


def resume_args(family_assets, out: Path, strategy: str, steps: int, *extra: str) -> list[str]:
    family = RESUME_FAMILY[strategy]
    return family_args(family_assets(family), family, out, strategy, steps, *extra)


@pytest.fixture(scope="module", params=STRATEGIES, ids=[f"{s}-{RESUME_FAMILY[s]}" for s in STRATEGIES])
def resumed(request, uninterrupted):
    strategy = request.param
    root = uninterrupted(strategy)
    assert f"Resuming from step {K}" in (root / "B.log").read_text()
    return strategy, root, root / "A" / "checkpoints" / f"step-{K:06d}"


def test_a_resumed_start_reads_the_quantized_base_from_the_cache(resumed):
    """Run A quantized the base and wrote it to the cache; run B, whose losses equal A's (the test
    below), read it and quantized nothing: a MoE family's 4-bit experts included."""
    _, root, _ = resumed
    a_log, b_log = (root / "A.log").read_text(), (root / "B.log").read_text()
    assert "quantized in" in a_log and "written to the cache" in a_log and "not quantized again" not in a_log
    assert "not quantized again" in b_log and "written to the cache" not in b_log


def test_resumed_losses_equal_the_uninterrupted_run(resumed):
    _, root, _ = resumed
    a, b = losses(root / "A"), losses(root / "B")
    assert sorted(b) == list(range(K + 1, 2 * K + 1))
    for step in b:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a[step], b[step])


def test_resumed_ranks_see_the_same_batches_across_the_epoch_boundary(resumed):
    _, root, _ = resumed
    for rank, (a, b) in enumerate(zip(load_probes(root / "A"), load_probes(root / "B"), strict=True)):
        assert sorted(b["batches"]) == list(range(K, 2 * K))
        for step in range(K, 2 * K):
            assert b["batches"][step] == a["batches"][step], (rank, step)
    # Steps 10 and 11 are the second epoch: a new permutation, not a repeat of steps 0 and 1.
    first = load_probes(root / "A")[0]["batches"]
    assert first[10] != first[0]


def test_checkpoint_holds_only_trainable_state(resumed):
    from safetensors.torch import load_file

    strategy, root, checkpoint = resumed
    adapter_tensors = len(load_file(root / "A" / "adapter" / "adapter_model.safetensors"))
    trainable = checkpoint / "trainable"
    if strategies.get(strategy).spec.checkpoint_format == "deepspeed":
        model_states = sorted((trainable / "zero").glob("*model_states.pt"))  # ZeRO-3 writes one per rank
        assert model_states
        names = list(torch.load(model_states[0], weights_only=False)["module"])
    else:
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(trainable)).read_metadata().state_dict_metadata
        names = [k[len("model.") :] for k in keys if k.startswith("model.")]
        optimizer_params = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in keys if k.startswith("optimizer.state.")}
        assert optimizer_params == set(names)
    assert len(names) == adapter_tensors
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    total = sum(f.stat().st_size for f in trainable.rglob("*") if f.is_file())
    assert total < 20 * 1024 * 1024  # adapters and their Adam state, not the base


def test_checkpoint_pickles_pass_the_allow_lists(resumed):
    """launcher/safe_load.py's allow-lists hold every global a real checkpoint of this strategy names."""
    from launcher.safe_load import check_checkpoint_files

    _, _, checkpoint = resumed
    check_checkpoint_files(checkpoint)


def test_export_round_trip(resumed):
    from safetensors.torch import load_file

    from launcher.checkpoint.export import ADAPTER_DIR, CHECK_FILE, load_for_inference

    _, root, _ = resumed
    out = root / "A"
    exported = root / "exported"
    qlaunch(root / "export.log", "export", str(out), "--output", str(exported))
    gathered = load_file(out / ADAPTER_DIR / "adapter_model.safetensors")
    restored = load_file(exported / "adapter_model.safetensors")
    assert restored.keys() == gathered.keys() and len(restored) > 0
    for name, tensor in gathered.items():
        assert torch.equal(restored[name], tensor), name
    model = load_for_inference(out, adapter_dir=exported)
    check = load_file(out / CHECK_FILE)
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"]).logits.float()
    assert (logits - check["logits"]).abs().max().item() <= 1e-4


def test_without_rng_restore_the_resume_check_fails(uninterrupted, family_assets, tmp_path):
    """Negative control: the exact-resume check above can fail."""
    strategy = "fsdp2"
    a_root = uninterrupted(strategy)
    checkpoint = a_root / "A" / "checkpoints" / f"step-{K:06d}"
    proc, log = launch(
        strategy,
        tmp_path,
        "C",
        resume_args(family_assets, tmp_path / "C", strategy, 2 * K, "--resume", str(checkpoint)),
        env={"PROBE_SKIP_RNG_RESTORE": "1"},
    )
    assert proc.returncode == 0, tail(log)
    a, c = losses(a_root / "A"), losses(tmp_path / "C")
    assert max(abs(a[s] - c[s]) for s in c) > 1e-4

    # A DCP checkpoint reshards: the 2-rank step-K checkpoint loads into one process unchanged.
    single = tmp_path / "single"
    qlaunch(
        tmp_path / "single.log",
        "train",
        "--nproc",
        "1",
        *resume_args(family_assets, single, strategy, K, "--resume", str(checkpoint), "--train.micro_batch_size", "4"),
    )
    exported = tmp_path / "exported"
    qlaunch(tmp_path / "export.log", "export", str(checkpoint), "--output", str(exported))
    from safetensors.torch import load_file

    resharded, saved = (
        load_file(single / "adapter" / "adapter_model.safetensors"),
        load_file(exported / "adapter_model.safetensors"),
    )
    assert resharded.keys() == saved.keys()
    assert all(torch.equal(resharded[k], saved[k]) for k in saved)


def start(strategy, root: Path, name: str, train_args, env: dict) -> tuple[subprocess.Popen, Path]:
    log = root / f"{name}.log"
    return start_command(probe_launch_command(strategy, root / name, train_args), log, env), log


def test_killed_rank_ends_the_job_and_auto_resume_continues(demo_assets, small_data, tmp_path):
    strategy, steps, out = "fsdp2", 30, tmp_path / "run"
    train_args = args(demo_assets, small_data, out, strategy, steps, "--checkpoint.every_steps", "3")
    proc, log = start(strategy, tmp_path, "killed", train_args, {"PROBE_STEP_SLEEP": "0.3"})
    wait_for(lambda: (out / "checkpoints" / "step-000006" / "meta.json").is_file(), 300, proc, log)
    pid = int((tmp_path / "killed" / "pid-rank1").read_text())
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60, "the job did not end soon after a rank died"
    last_complete = max(int(p.name[-6:]) for p in (out / "checkpoints").glob("step-*") if (p / "meta.json").is_file())

    proc, log = launch(strategy, tmp_path, "resumed", train_args + ["--resume", "auto"])
    assert proc.returncode == 0, tail(log)
    assert f"Resuming from step {last_complete}" in log.read_text()
    logged = [r["step"] for r in read_metrics(out)]
    assert logged == list(range(1, steps + 1))  # every step exactly once, none lost, none twice


def test_kill_during_checkpoint_write_keeps_the_previous_one(demo_assets, small_data, tmp_path):
    strategy, steps, out = "zero2", 12, tmp_path / "run"
    train_args = args(
        demo_assets, small_data, out, strategy, steps, "--checkpoint.every_steps", "3", "--checkpoint.keep_last", "1"
    )
    proc, log = launch(strategy, tmp_path, "killed", train_args, env={"PROBE_KILL_DURING_SAVE": "1:6"})
    assert proc.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-000003"
    assert (checkpoints / "step-000003" / "meta.json").is_file()
    assert (checkpoints / ".tmp-step-000006").is_dir() and not (checkpoints / "step-000006").exists()

    proc, log = launch(strategy, tmp_path, "resumed", train_args + ["--resume", "auto"])
    assert proc.returncode == 0, tail(log)
    assert "Resuming from step 3" in log.read_text()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000012"]  # keep_last 1, no stale temp


def test_resume_refuses_what_would_change_its_meaning(demo_assets, small_data, tmp_path, capsys, no_launch):
    from launcher import cli

    out = tmp_path / "run"
    qlaunch(tmp_path / "a.log", "train", "--nproc", "1", *args(demo_assets, small_data, out, "fsdp2", 3))
    code = cli.main(
        ["train", "--nproc", "1", *args(demo_assets, small_data, out, "fsdp2", 6, "--resume", "auto", "--lora.r", "8")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "lora.r: 16 -> 8" in err and "Cannot resume" in err


def test_resume_on_another_world_size_keeps_the_global_batch(demo_assets, small_data, tmp_path, capsys, no_launch):
    """A checkpoint of 2 ranks x micro batch 2 resumed on 1 rank must keep its global batch of 4 (the data
    order and the loss's scale depend on it); the message says how."""
    from launcher import cli, preflight, strategies
    from launcher.checkpoint import store
    from launcher.config import load_config, parse_overrides

    train_args = args(demo_assets, small_data, tmp_path / "run", "zero2", 6)
    asked = load_config(train_args[1], parse_overrides(train_args[2:]) + [("train.mixed_precision", "no")])
    cfg = preflight.prelaunch_resolved(asked, strategies.resolve(asked), 2)  # as its ranks wrote it
    written = tmp_path / "run" / "checkpoints" / "step-000003"
    written.mkdir(parents=True)
    (written / "meta.json").write_text(
        json.dumps(
            {
                "step": 3,
                "world_size": 2,
                "strategy": "zero2",
                "checkpoint_format": "deepspeed",
                "fingerprint": store.fingerprint(cfg),
            }
        )
    )
    code = cli.main(["train", "--nproc", "1", *train_args, "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "with a global batch of 2 samples per step" in err and "it was trained with 4" in err
    assert "Keep it with --train.micro_batch_size 4, or set --train.global_batch_size 4" in err
    for keep in (["--train.grad_accum_steps", "2"], ["--train.global_batch_size", "4"]):  # 2 x 2 x 1
        kept = load_config(train_args[1], parse_overrides([*train_args[2:], "--resume", "auto", *keep]))
        strategy = strategies.resolve(kept)
        assert preflight.check_resume(preflight.prelaunch_resolved(kept, strategy, 1), strategy, 1) == written
