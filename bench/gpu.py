"""GPU run of a Llama-2-7B shape: memory per rank and component, measured vs predicted, tokens/s, bitsandbytes #1945.

    python bench/gpu.py [--strategy fsdp2] [--seq-lens 512,2048] [--steps 5] [--nproc N] [--workdir /tmp/qlaunch-gpu]
    python bench/gpu.py --layers 2 --no-record     # the same path on a 2-layer model: a quick first try
    python bench/gpu.py --report RUN_DIR [...]     # the tables again from finished runs (no GPU needed)

Builds a random Llama of Llama-2-7B's shape (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000) from a
`LlamaConfig`, saved with `save_pretrained` in bf16 and reused from the work directory, with the demo's tokenizer
and records longer than the longest sequence (every micro batch full, the shape the budget predicts). Trains it
with `qlaunch train` on every visible GPU, micro batch 1, once per sequence length. Nothing is measured twice: a
run's memory_budget.json holds per rank the prediction (the `qlaunch budget --json` object of its config), what the
rank held per component in step 1 and torch.cuda's peaks; shard_report.json the whole run's peak; metrics.jsonl tokens.
For #1945 (FSDP2 rewriting NaN bit patterns of NF4 data packed in bf16) the runs set `train.check_4bit_weights`:
every rank compares a digest of each 4-bit weight as its linear receives it in the first forward with rank 0's
before sharding (shard_report.json); `qlaunch verify` then compares the trained logits end to end.
Without CUDA it says so and exits with status 2 before building anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.config import STRATEGIES  # noqa: E402
from launcher.memory.sizes import format_bytes  # noqa: E402  (no torch: --help and --report stay quick

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
NO_CUDA = 2
BUILT = "built.json"  # written last: a base without it was interrupted and is built again
VERIFY_LINE = re.compile(r"max \|logit difference\| = (\S+) \((OK|FAILED)")
ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def seq_lens(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sequence lengths like 512,2048, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fsdp2", choices=STRATEGIES)
    parser.add_argument("--seq-lens", type=seq_lens, default=[512, 2048], help="comma-separated (default 512,2048)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default 5)")
    parser.add_argument("--nproc", type=int, help="ranks (default: every visible GPU)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, Llama-2-7B's)")
    parser.add_argument("--workdir", default="/tmp/qlaunch-gpu", help="model, data, caches and runs")
    parser.add_argument("--verify-tolerance", type=float, default=1e-2, help="qlaunch verify's (default 1e-2)")
    parser.add_argument("--no-verify", action="store_true", help="skip `qlaunch verify` (it quantizes the base again)")
    parser.add_argument("--no-record", action="store_true", help="do not append the result to bench/RESULTS.md")
    parser.add_argument("--report", nargs="+", metavar="RUN_DIR", help="print the tables of finished runs and stop")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.layers < 1 or (args.nproc is not None and args.nproc < 1):
        parser.error("--steps, --layers and --nproc must be positive")
    return args


def build_model(path: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.demo import build_tokenizer

    tokenizer = build_tokenizer()
    special = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    config = LlamaConfig(**LLAMA2_7B, **special, num_hidden_layers=layers, tie_word_embeddings=False)
    torch.manual_seed(0)
    # Initialised in bf16 (13.5 GB, where fp32 would not fit a 24 GB GPU), on a GPU in seconds rather than minutes.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    (path / BUILT).write_text(json.dumps({"layers": layers, "parameters": params}))


def run_config(base: Path, data: Path, steps: int) -> dict:
    return {
        "model": {"path": str(base)},
        "data": {"path": str(data)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "train": {"micro_batch_size": 1, "grad_accum_steps": 1, "max_steps": steps, "warmup_steps": 0, "lr": 2e-4},
    }


def prepare(workdir: Path, layers: int, longest: int, steps: int, nproc: int) -> Path:
    """Base model (built once per layer count), data and run config under `workdir`; returns the config's path."""
    from launcher.demo import write_dataset

    base = workdir / f"base-{layers}l"
    if not (base / BUILT).is_file():
        print(f"Building the {layers}-layer Llama-2-7B-shaped random model in {base} ...", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        # In a child process, so that its host and GPU memory are free before training starts.
        subprocess.check_call([sys.executable, __file__, "--build", str(base), "--layers", str(layers)])
    # The demo's words are one token each: records of longest + 8 words fill every row at every length.
    write_dataset(workdir / "data.jsonl", records=max(64, 2 * steps * nproc), words=longest + 8)
    path = workdir / "run.yaml"
    path.write_text(json.dumps(run_config(base, workdir / "data.jsonl", steps)))  # JSON is YAML
    return path


def train_command(workdir: Path, strategy: str, nproc: int, seq: int) -> list[str]:
    return [
        *(sys.executable, "-m", "launcher", "train", "--config", str(workdir / "run.yaml")),
        *("--strategy", strategy, "--nproc", str(nproc), "--data.max_seq_len", str(seq)),
        *("--output_dir", str(run_dir(workdir, strategy, seq)), "--train.check_4bit_weights", "true"),
        # Quantized once for every run here; tokenized once per length.
        *("--model.quant_cache_dir", str(workdir / "quant-cache"), "--data.cache_dir", str(workdir / "data-cache")),
    ]


def run_dir(workdir: Path, strategy: str, seq: int) -> Path:
    return workdir / "runs" / f"{strategy}-seq{seq}" / "run"


def launch(workdir: Path, strategy: str, nproc: int, seq: int) -> tuple[Path, float, bool]:
    run = run_dir(workdir, strategy, seq)
    shutil.rmtree(run.parent, ignore_errors=True)  # the launcher refuses an output_dir that holds a run
    run.parent.mkdir(parents=True)
    log = run.parent / "log.txt"
    print(f"seq {seq}: qlaunch train, {strategy} on {nproc} GPU(s) (log: {log}) ...", flush=True)
    started = time.time()
    with log.open("w") as f:
        command = train_command(workdir, strategy, nproc, seq)
        code = subprocess.call(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ | ENV)
    seconds = time.time() - started
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"seq {seq}: FAILED with exit status {code} after {seconds:.0f} s; the log ends:", *tail, sep="\n  ")
    return run, seconds, code == 0


def parse_verify(text: str) -> tuple[float | None, bool]:
    found = VERIFY_LINE.search(text)
    return (float(found.group(1)), found.group(2) == "OK") if found else (None, False)


def verify(run: Path, tolerance: float) -> tuple[float | None, bool, str]:
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "verify", str(run), "--tolerance", str(tolerance)],
        cwd=REPO,
        env=os.environ | ENV,
        capture_output=True,
        text=True,
    )
    text = out.stdout + out.stderr
    return *parse_verify(text), (text.strip().splitlines() or ["(no output)"])[-1]


def steady_tokens_per_s(steps: list[dict]) -> float | None:
    """All ranks' tokens/s over steps 2..N: step 1 also pays for first kernel launches and the memory probe."""
    if len(steps) < 2:
        return steps[0]["tokens_per_s"] if steps else None
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    return sum(s["tokens"] for s in steps[1:]) / seconds if seconds > 0 else None


def cell(predicted: int | None, measured: int | None) -> str:
    p = "—" if predicted is None else format_bytes(predicted)
    if measured is None:
        return f"{p} / —"
    error = "" if not measured or predicted is None else f" ({100 * (predicted - measured) / measured:+.2f}%)"
    return f"{p} / {format_bytes(measured)}{error}"


def memory_columns(budget: dict, shards: list[dict]) -> list[dict[str, tuple[int | None, int | None]]]:
    """Per rank, row name -> (predicted, measured) bytes: each component, then torch.cuda's peaks."""
    predicted = (budget.get("predicted") or {}).get("ranks")
    columns = []
    for r, m in enumerate(budget["measured"]["ranks"]):
        p = predicted[r] if predicted else {"components": {}, "host_components": {}, "total_bytes": None}
        # What a rank holds anywhere (GPU, or host RAM when offloaded) is what the measurement counts.
        held = {n: v + p["host_components"].get(n, 0) for n, v in p["components"].items()}
        names = [n for n in {**held, **m["components"]} if held.get(n) or m["components"].get(n)]
        column = {n: (held.get(n), m["components"].get(n)) for n in names}
        measured_names = list(m["components"])
        column["sum of the measured components"] = (
            sum(held.get(n, 0) for n in measured_names) if predicted else None,
            m["total_bytes"],
        )
        total, runtime = p["total_bytes"], p["components"].get("runtime", 0)
        # torch.cuda's allocator does not see the CUDA context and NCCL: compare it without the runtime allowance.
        allocated = None if total is None else total - runtime
        cuda = m.get("cuda") or {}
        column["torch.cuda peak allocated, steps"] = (allocated, cuda.get("peak_allocated_bytes"))
        column["torch.cuda peak reserved, steps"] = (total, cuda.get("peak_reserved_bytes"))
        column["torch.cuda peak allocated, whole run"] = (allocated, shards[r].get("peak_device_bytes"))
        columns.append(column)
    return columns


def memory_table(budget: dict, shards: list[dict]) -> str:
    columns = memory_columns(budget, shards)
    groups, start = [], 0  # consecutive ranks with equal columns share one
    for i in range(1, len(columns) + 1):
        if i == len(columns) or columns[i] != columns[start]:
            groups.append((f"rank {start}" if i - 1 == start else f"ranks {start}-{i - 1}", start))
            start = i
    names = list(dict.fromkeys(n for c in columns for n in c))
    header = ["predicted / measured (error)"] + [label for label, _ in groups]
    rows = [[n] + [cell(*columns[r].get(n, (None, None))) for _, r in groups] for n in names]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    )


def render_run(run: Path) -> str:
    budget = json.loads((run / "memory_budget.json").read_text())
    shards = json.loads((run / "shard_report.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    p, (batch, seq) = budget.get("predicted"), budget["activation_shape"]
    rate = steady_tokens_per_s(steps)
    said = f"{rate:,.0f} tokens/s (all ranks, steps 2-{len(steps)})" if rate else "tokens/s n/a"
    if p is None:
        predicted = "none (the budget could not predict this model)"
    else:
        predicted = (
            f"`qlaunch budget` for the run's config ({p['strategy']}, {p['world_size']} ranks, {p['seq_len']} tokens)"
        )
        if [p["micro_batch"], p["seq_len"]] != [batch, seq]:
            predicted += f", activations for the longest micro batch run, {batch} x {seq}"
    return "\n".join(
        [
            f"{run}: {shards[0]['strategy']} on {len(shards)} rank(s), micro batch {batch} x {seq} tokens, "
            f"{len(steps)} steps; loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}; {said}",
            f"predicted: {predicted}",
            "measured: each component counted on the rank during step 1; torch.cuda's peaks (+ = over-predicted)",
            memory_table(budget, shards),
        ]
    )


def packed_checks(runs: list[Path]) -> list[tuple[str, dict | None]]:
    """(run, one rank's `train.check_4bit_weights` result), for every rank of every run."""
    found = []
    for run in runs:
        for rank in json.loads((run / "shard_report.json").read_text()):
            found.append((f"{run.name} rank {rank['rank']}", rank.get("packed_weights_in_first_forward")))
    return found


def bytes_verdict(checks: list[tuple[str, dict | None]]) -> tuple[bool, list[str]]:
    """Whether every rank's 4-bit weights reached their first forward as rank 0's bytes, and the lines saying so."""
    bad = [
        f"  {where}: "
        + ("not checked" if c is None else f"{len(c['differing'])} of {c['of']} differ: {c['differing'][:3]}")
        for where, c in checks
        if c is None or c["differing"] or c["checked"] != c["of"]
    ]
    if not checks or bad:
        return False, ["  byte for byte: FAILED", *bad] if checks else ["  byte for byte: no run finished"]
    n = checks[0][1]["of"]
    return True, [
        f"  byte for byte: OK, on {len(checks)} rank runs all {n} 4-bit weights were rank 0's bytes in the first forward"
    ]


def issue_1945(
    world: int, steps: int, checked: tuple[float | None, bool, str] | None, tolerance: float, bytes_lines=()
) -> str:
    """What the runs say about bitsandbytes #1945: the launcher's own byte check (`train.check_4bit_weights`: a
    digest of each 4-bit weight as its linear receives it in the first forward, against rank 0's before sharding),
    then `qlaunch verify` (the logits the sharded model computed after training against one process reloading
    the untouched checkpoint and adapter), end to end."""
    lines = [
        "bitsandbytes #1945 (do every rank's 4-bit weights still equal rank 0's after a forward pass?):",
        *bytes_lines,
    ]
    if world == 1:
        lines.append("  1 rank: nothing was sharded, so #1945 cannot arise here; it needs 2 or more GPUs.")
    if checked is None:
        lines.append("  `qlaunch verify` skipped (--no-verify or no finished run).")
    elif checked[0] is None:
        lines.append(f"  `qlaunch verify` gave no answer: {checked[2]}")
    else:
        lines += [
            f"  Closest check from the run's outputs, `qlaunch verify`: the sharded model's logits after {steps} "
            f"steps vs one process reloading the checkpoint and adapter: max |difference| {checked[0]:.3e}, "
            f"{'OK' if checked[1] else 'FAILED'} at tolerance {tolerance:g}.",
            # Measured on CPU: rewriting every bf16 NaN pattern as 0x7FFF in one layer of this shape (0.08% of its
            # packed elements, the issue's mechanism) moved the logits by up to 1.1, a hundred times the tolerance.
            "  #1945's rewrite of NaN patterns moves the logits of even one layer of this shape by ~1 (CPU); a "
            "difference near the tolerance is more likely bf16 rounding: compare with --strategy ddp.",
        ]
    return "\n".join(lines)


def record(text: str, argv: list[str], nproc: int) -> None:
    import torch

    machine = f"{nproc} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(f"\n### GPU run: {machine} ({time.strftime('%Y-%m-%d %H:%M')})\n\n")
        f.write(f"`python bench/gpu.py {' '.join(argv)}`\n\n```\n{text}\n```\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.build:
        build_model(Path(args.build), args.layers)
        return 0
    if args.report:
        print("\n\n".join(render_run(Path(run)) for run in args.report))
        return 0
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        print("bench/gpu.py: no CUDA device is visible; it needs a GPU. Nothing was built or run.", file=sys.stderr)
        return NO_CUDA
    nproc = args.nproc or gpus
    if nproc > gpus:
        print(f"bench/gpu.py: --nproc {nproc} but only {gpus} CUDA device(s) are visible.", file=sys.stderr)
        return NO_CUDA
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prepare(workdir, args.layers, max(args.seq_lens), args.steps, nproc)
    print(f"Model and data ready in {time.time() - started:.0f} s.", flush=True)
    sections, finished, ok = [], [], True
    for seq in args.seq_lens:
        run, seconds, done = launch(workdir, args.strategy, nproc, seq)
        ok &= done
        if done:
            finished.append(run)
            sections.append(f"{render_run(run)}\n(launch to exit: {seconds:.0f} s)")
            print(sections[-1], flush=True)
    checked = None
    if finished and not args.no_verify:
        print(f"qlaunch verify {finished[0]} (quantizes the base again, in one process) ...", flush=True)
        checked = verify(finished[0], args.verify_tolerance)
        ok &= checked[1]
    same_bytes, bytes_lines = bytes_verdict(packed_checks(finished))
    ok &= same_bytes
    sections.append(issue_1945(nproc, args.steps, checked, args.verify_tolerance, bytes_lines))
    print(sections[-1])
    print(f"\nbench/gpu.py: {time.time() - started:.0f} s in all.")
    if not args.no_record and finished:
        record("\n\n".join(sections), argv, nproc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
