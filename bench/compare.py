"""This launcher vs the peer recipe (transformers Trainer + peft), the same QLoRA job, side by side.

    python bench/compare.py [--strategies ddp,fsdp2,zero2,zero3,fsdp1] [--repeats 3] [--steps 30]

Both run the embedded demo model and data with the same run config (sequence length, micro batch,
LoRA shape, seed, steps) under the same shipped accelerate config, 2 ranks, alternating several
times. Per run and rank it records throughput, time from launch to the first optimizer step, peak
host RSS, peak CUDA memory, gradient and optimizer-state bytes and the final loss, and for this launcher
the memory budget's worst prediction error per rank (memory_budget.json); it prints median and
spread, and appends the table with a machine description to bench/RESULTS.md. The cost of
`qlaunch budget` itself for 70B and 405B configs is measured by bench/budget_speed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher import strategies  # noqa: E402
from launcher.config import DistConfig  # noqa: E402
from launcher.demo import prepare_demo  # noqa: E402
from launcher.launch import ENTRY, Machines, accelerate_command  # noqa: E402

WORLD = 2
MIB = 1024 * 1024


def accelerate(strategy: str, entry: tuple[str, ...], args: list[str]) -> list[str]:
    """The `accelerate launch` command `qlaunch train` runs for `strategy` on 2 local ranks, running `entry`."""
    return accelerate_command(strategies.get(strategy), Machines.local(WORLD), args, DistConfig(), entry)


def run_logged(cmd: list[str], log: Path) -> float:
    """Runs `cmd` from the repo root; returns the launch time (unix) for time-to-first-step."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    started = time.time()
    with log.open("w") as f:
        code = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        errors = [
            line.strip() for line in log.read_text().splitlines() if "Error:" in line and "ChildFailedError" not in line
        ]
        raise RunFailed(f"exit status {code}: {errors[-1] if errors else 'no error line'} (log: {log})")
    return started


class RunFailed(RuntimeError):
    pass


def run_launcher(strategy: str, run_yaml: Path, out: Path, train_args: list[str]) -> dict:
    started = run_logged(
        accelerate(strategy, ENTRY, ["--config", str(run_yaml), "--output_dir", str(out), *train_args]),
        out.with_suffix(".log"),
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "shard_report.json").read_text())
    budget = json.loads((out / "memory_budget.json").read_text())
    measured = {r["rank"]: r["components"] for r in budget["measured"]["ranks"]}
    steady_tokens = sum(r["tokens"] for r in records[1:])
    return {
        "tokens_per_s": steady_tokens / (records[-1]["unix_time"] - records[0]["unix_time"]),
        "first_step_s": records[0]["unix_time"] - started,
        "final_loss": records[-1]["loss"],
        "ranks": [
            {
                "peak_host_rss_mib": r["peak_host_rss_bytes"] / MIB,
                "peak_device_mib": r["peak_device_bytes"] / MIB if r["peak_device_bytes"] is not None else None,
                "optimizer_state_mib": measured[r["rank"]]["optimizer_states"] / MIB,
                "grad_mib": measured[r["rank"]]["gradients"] / MIB,
                "budget_error_pct": max(
                    abs(row["error_pct"]) for row in budget["comparison"] if row["rank"] == r["rank"]
                ),
            }
            for r in report
        ],
    }


def run_peer(strategy: str, run_yaml: Path, out: Path, train_args: list[str]) -> dict:
    started = run_logged(
        accelerate(strategy, ("bench/peer_train.py",), [str(out), "--config", str(run_yaml), *train_args]),
        out.with_suffix(".log"),
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    times = ranks[0]["step_unix_times"]
    steady_tokens = sum(sum(r["step_tokens"][1:]) for r in ranks)
    return {
        "tokens_per_s": steady_tokens / (times[-1] - times[0]),
        "first_step_s": times[0] - started,
        "final_loss": ranks[0]["final_loss"],
        "distributed_type": ranks[0]["distributed_type"],
        "ranks": [
            {
                "peak_host_rss_mib": r["peak_host_rss_bytes"] / MIB,
                "peak_device_mib": r["peak_device_bytes"] / MIB if r["peak_device_bytes"] is not None else None,
                "optimizer_state_mib": r["optimizer_state_bytes"] / MIB,
                "grad_mib": r["grad_bytes"] / MIB,
                "budget_error_pct": None,
            }
            for r in ranks
        ],
    }


def summarize(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    median = statistics.median(values)
    spread = (max(values) - min(values)) / 2
    return f"{median:.4g} ±{spread:.2g}" if len(values) > 1 else f"{median:.4g}"


def table(results: dict) -> str:
    lines = [
        "| strategy | tool | rank | tokens/s (all ranks) | launch → first step (s) | peak RSS (MiB) | peak CUDA (MiB) | grads (MiB) | optimizer state (MiB) | final loss | budget error, worst component (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (strategy, tool), runs in results.items():
        if not runs:
            continue
        for rank in range(WORLD):
            per_rank = [run["ranks"][rank] for run in runs]
            lines.append(
                "| "
                + " | ".join(
                    [
                        strategy,
                        tool,
                        str(rank),
                        summarize([r["tokens_per_s"] for r in runs]) if rank == 0 else "",
                        summarize([r["first_step_s"] for r in runs]) if rank == 0 else "",
                        summarize([r["peak_host_rss_mib"] for r in per_rank]),
                        summarize([r["peak_device_mib"] for r in per_rank]),
                        summarize([r["grad_mib"] for r in per_rank]),
                        summarize([r["optimizer_state_mib"] for r in per_rank]),
                        summarize([r["final_loss"] for r in runs]) if rank == 0 else "",
                        summarize([r["budget_error_pct"] for r in per_rank]),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--strategies", default="ddp,fsdp2,zero2,zero3,fsdp1", help="comma-separated (default: all five)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qlaunch-bench-"))
    run_yaml = prepare_demo(work / "assets")
    train_args = [
        "--train.max_steps",
        str(args.steps),
        "--train.micro_batch_size",
        str(args.micro_batch),
        "--train.log_interval",
        "1",
        "--lora.dropout",
        "0.05",
    ]
    results: dict[tuple[str, str], list[dict]] = {}
    tools = {"qlaunch": run_launcher, "peer (Trainer+peft)": run_peer}
    failed: dict[tuple[str, str], str] = {}
    for repeat in range(args.repeats):
        order = list(tools) if repeat % 2 == 0 else list(reversed(tools))
        for strategy in args.strategies.split(","):
            for tool in order:
                if (strategy, tool) in failed:
                    continue
                out = work / f"{strategy}-{tool.split()[0]}-{repeat}"
                print(f"[{repeat + 1}/{args.repeats}] {strategy} {tool} ...", flush=True)
                try:
                    results.setdefault((strategy, tool), []).append(tools[tool](strategy, run_yaml, out, train_args))
                except RunFailed as error:
                    failed[strategy, tool] = str(error)
                    print(f"  failed: {error}", flush=True)

    notes = [
        f"peer under {strategy}: Accelerate ran it as {runs[0]['distributed_type']}"
        for (strategy, tool), runs in results.items()
        if runs and "distributed_type" in runs[0]
    ] + [f"{tool} under {strategy} failed, {error}" for (strategy, tool), error in failed.items()]
    report = (
        f"### {time.strftime('%Y-%m-%d %H:%M')} — {args.repeats} repeats, {args.steps} steps, micro batch "
        f"{args.micro_batch}, {WORLD} ranks\n\nMachine: {machine()}\n\n"
        f"Command: `python bench/compare.py --strategies {args.strategies} --repeats {args.repeats} --steps {args.steps} "
        f"--micro-batch {args.micro_batch}`\n\n{table(results)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    )
    print("\n" + report)
    if not args.no_append:
        with (REPO / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
