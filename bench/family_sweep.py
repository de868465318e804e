"""Every family the coverage walk trains, trained for real in 4 bits on 2 CPU ranks per strategy, budget checked.

    python bench/family_sweep.py [--strategies fsdp2,zero3] [--families llama,gemma4_text] [--steps 3] [--out DIR]

The coverage walk (tests/unit/test_family_coverage.py) runs each family's tiny model in one process,
unquantized. This goes the rest of the way for the families it marks "ok" (or those named): each family's
shrunk config (tests/support/tiny_configs.py) is saved with a byte-level BPE tokenizer, and `qlaunch train`
runs it with the default run config (`all-linear`, NF4, checkpointing) on 2 ranks under the strategy's shipped
accelerate config. The runs of a strategy share one launch (tests/support/dist_probe.py --runs); a run that
fails ends its launch, is recorded with the end of its log, and the next launch starts at the family after it.
Per family and strategy it prints: trained (the losses of its steps), the budget's worst static row (must be
exact) and its activation error (predicted vs measured, per rank), or the failure. The table goes to
DIR/sweep.md and DIR/sweep.json; about 10 s per family and strategy on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.families import Family, build_family  # noqa: E402
from support.launches import CPU_ENV, probe_runs_command  # noqa: E402
from support.tiny_configs import TinyConfigError, tiny_config  # noqa: E402

COVERAGE = REPO / "tests" / "support" / "family_coverage.json"
LAUNCH_TIMEOUT_S = 3600


def walk_ok_families() -> list[str]:
    return [name for name, outcome in json.loads(COVERAGE.read_text()).items() if outcome["status"] == "ok"]


def build_assets(family: str, root: Path) -> Path:
    """The family's shrunk model (bf16, as a hub checkpoint) with a tokenizer and data under `root`."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    spec = Family(family, "", lambda tokens: tiny_config(family))
    build_family(spec, root)
    saved = AutoConfig.from_pretrained(root / "base")
    if type(saved) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        # A multimodal family's causal LM is its text part, saved with the text config only.
        raise RuntimeError(f"its causal LM saves a {type(saved).__name__}, which AutoModelForCausalLM does not load")
    return root


def train_args(assets: Path, out: Path, strategy: str, steps: int) -> list[str]:
    # Sequences within the tiny configs' 256 positions; the run config is otherwise the default one.
    return [
        *("--model.path", str(assets / "base"), "--data.path", str(assets / "data.jsonl")),
        *("--data.max_seq_len", "64", "--strategy", strategy, "--output_dir", str(out)),
        *("--train.max_steps", str(steps), "--train.micro_batch_size", "2", "--train.log_interval", "1"),
    ]


def budget_errors(out: Path) -> dict:
    """The budget's worst static row (bytes off) and the activation errors of each rank, from memory_budget.json."""
    from launcher.memory.components import STATIC_COMPONENTS

    report = json.loads((out / "memory_budget.json").read_text())
    if report["predicted"] is None:
        return {"predicted": False}
    rows = report["comparison"]
    static_off = max(abs(r["predicted"] - r["measured"]) for r in rows if r["component"] in STATIC_COMPONENTS)
    activations = [r["error_pct"] for r in rows if r["component"] == "activations"]
    return {"predicted": True, "static_bytes_off": static_off, "activations_pct": activations}


def losses(out: Path) -> list[float]:
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [round(r["loss"], 4) for r in records if "loss" in r]


def sweep_strategy(strategy: str, families: list[str], assets: dict[str, Path], work: Path, steps: int) -> dict:
    """Every family's run on `strategy`, relaunching after a failed one."""
    results: dict[str, dict] = {}
    pending = [f for f in families if f in assets]
    launch = 0
    while pending:
        launch += 1
        runs = [
            {
                "probe_dir": str(work / strategy / f / "probe"),
                "args": train_args(assets[f], work / strategy / f / "out", strategy, steps),
            }
            for f in pending
        ]
        runs_file = work / strategy / f"runs{launch}.json"
        runs_file.parent.mkdir(parents=True, exist_ok=True)
        runs_file.write_text(json.dumps(runs))
        log = work / strategy / f"launch{launch}.log"
        with log.open("w") as f:
            proc = subprocess.run(
                probe_runs_command(strategy, runs_file),
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **CPU_ENV),
                timeout=LAUNCH_TIMEOUT_S,
            )
        started = [f for f in pending if (work / strategy / f / "probe" / "started-rank0").exists()]
        for family in started:
            out = work / strategy / family / "out"
            if (out / "memory_budget.json").is_file():
                results[family] = {"status": "trained", "losses": losses(out), **budget_errors(out)}
                print(f"{strategy:6} {family:28} {_describe(results[family])}", flush=True)
        failed = started[-1] if proc.returncode != 0 and started else None
        if failed is not None:
            error = _failure(log, failed)
            status = "refused" if f"{strategy} cannot" in error else "fails"  # before its process group started
            results[failed] = {"status": status, "error": error}
            print(f"{strategy:6} {failed:28} {status.upper()} {error}", flush=True)
        elif proc.returncode != 0:
            raise RuntimeError(f"the launch failed before any run began: {log}")
        pending = pending[len(started) :]
    return results


def _failure(log: Path, family: str) -> str:
    """The last error line of the failed run's part of the launch log."""
    text = log.read_text(errors="replace")
    part = text[text.rfind("dist_probe: run ") :]
    lines = [ln.strip() for ln in part.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or ln.startswith("Refused")]
    return (errors or lines or ["(no output)"])[-1][:240]


def _describe(result: dict) -> str:
    if not result.get("predicted"):
        return f"trained, losses {result['losses']}, NO PREDICTION"
    acts = ", ".join(f"{e:+.2f}%" for e in result["activations_pct"])
    return f"trained, losses {result['losses']}, static off by {result['static_bytes_off']} B, activations {acts}"


def summary(results: dict[str, dict[str, dict]], not_built: dict[str, str]) -> str:
    strategies = list(results)
    lines = ["| family | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for family in sorted({f for r in results.values() for f in r} | set(not_built)):
        cells = []
        for strategy in strategies:
            result = results[strategy].get(family)
            if family in not_built:
                cells.append(f"not built: {not_built[family][:80]}")
            elif result is None:
                cells.append("not run")
            elif result["status"] != "trained":
                cells.append(f"{result['status']}: {result['error'][:120]}")
            elif not result["predicted"]:
                cells.append("trained, no budget")
            else:
                worst = max(result["activations_pct"], key=abs)
                cells.append(
                    f"trained; static {'exact' if result['static_bytes_off'] == 0 else 'OFF'}; act {worst:+.2f}%"
                )
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="fsdp2,zero3")
    parser.add_argument("--families", default="", help="comma-separated model types (default: the walk's ok ones)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    args = parser.parse_args()
    families = args.families.split(",") if args.families else walk_ok_families()
    work = args.out or Path(tempfile.mkdtemp(prefix="family_sweep-"))
    start = time.time()
    assets, not_built = {}, {}
    for family in families:
        try:
            assets[family] = build_assets(family, work / "assets" / family)
        except (TinyConfigError, RuntimeError) as error:
            not_built[family] = str(error)
            print(f"{'':6} {family:28} NOT BUILT {error}", flush=True)
    print(f"built {len(assets)} of {len(families)} families in {time.time() - start:.0f} s under {work}", flush=True)
    results = {s: sweep_strategy(s, families, assets, work, args.steps) for s in args.strategies.split(",")}
    table = summary(results, not_built)
    (work / "sweep.md").write_text(table + "\n")
    (work / "sweep.json").write_text(json.dumps({"results": results, "not_built": not_built}, indent=1))
    print(table)
    for strategy, result in results.items():
        ok = [f for f, r in result.items() if r["status"] == "trained" and r["predicted"]]
        within = [
            f
            for f in ok
            if results[strategy][f]["static_bytes_off"] == 0
            and max(map(abs, results[strategy][f]["activations_pct"])) <= 10
        ]
        refused = sum(r["status"] == "refused" for r in result.values())
        print(
            f"{strategy}: {len(result)} run, {refused} refused before training, {len(ok)} trained with a budget, "
            f"{len(within)} within it (static exact, activations within 10%)"
        )
    print(f"{time.time() - start:.0f} s in all; tables in {work}/sweep.md")


if __name__ == "__main__":
    main()
