"""The demo's training speed in each compute dtype, on this machine.

    python bench/demo_speed.py [--dtypes float32,bfloat16] [--repeats 2] [--steps 200]

Runs `qlaunch demo`'s job (its model, data and run config, fsdp2 on 2 CPU ranks) with each
`quant.compute_dtype` in turn, alternating so that the machine's drift falls on every dtype alike,
and prints, per dtype, the training time and tokens/s of the "Done:" line (median [min-max]) and the
final loss, with the CPU and whether it has native bf16. On a CPU without AVX512-BF16 or AMX the demo
computes in fp32 (`quant.compute_dtype: auto`); bf16 there is what it cost before.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare import machine  # noqa: E402
from launcher.demo import prepare_demo  # noqa: E402
from launcher.dtypes import cpu_has_native_bf16  # noqa: E402

DONE = re.compile(r"Done: (\d+) steps in ([\d.]+) s .*; loss ([\d.]+) -> ([\d.]+); ([\d,]+) tokens/s")


def train(run_yaml: Path, dtype: str, out: Path) -> tuple[float, float, float]:
    """One demo run; returns (training seconds, tokens/s, final loss) as its summary line says."""
    cmd = [sys.executable, "-m", "launcher", "train", "--config", str(run_yaml), "--nproc", "2"]
    cmd += ["--quant.compute_dtype", dtype, "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    found = DONE.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        sys.exit(f"{dtype} run failed (exit status {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return float(found[2]), float(found[5].replace(",", "")), float(found[4])


def summary(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qlaunch-demo-speed-"))
    run_yaml = prepare_demo(work / "assets", **({"steps": args.steps} if args.steps else {}))
    dtypes = args.dtypes.split(",")
    runs: dict[str, list[tuple[float, float, float]]] = {dtype: [] for dtype in dtypes}
    for repeat in range(args.repeats):
        for dtype in dtypes:
            runs[dtype].append(train(run_yaml, dtype, work / f"{dtype}-{repeat}"))
            seconds, tokens_per_s, loss = runs[dtype][-1]
            print(f"  {dtype} run {repeat + 1}: {seconds:.1f} s, {tokens_per_s:,.0f} tokens/s, final loss {loss:.4f}")
    print(f"\n{machine()}; native bf16: {cpu_has_native_bf16()}; {args.repeats} alternating runs per dtype")
    print("| compute dtype | training time (s) | tokens/s | final loss |\n|---|---|---|---|")
    for dtype, results in runs.items():
        seconds, tokens_per_s, losses = zip(*results, strict=True)
        print(f"| {dtype} | {summary(seconds, 1)} | {summary(tokens_per_s, 0)} | {summary(losses, 4)} |")


if __name__ == "__main__":
    main()
