"""The data pipeline's cost: tokenizing per node on a first and a second start, host RAM per rank, and
useful tokens/s with and without packing.

    python bench/data.py [--records 50000] [--repeats 3] [--steps 8]

Tokenizing: a generated jsonl of `--records` records of 100-400 words, tokenized by the launcher
(`tokenized.load_tokenized`: read, tokenize batched, write the cache) and by the baseline every
`datasets` user writes (`load_dataset("json").map(tokenizer, batched=True)`), each in a fresh process
with its own fresh cache, then again (second start) with the cache it left. A child reports the time of
the call and the resident memory it added (VmRSS after minus before, imports and tokenizer loaded).
Training: `qlaunch train` on one process with the demo model, on records whose token lengths spread
over 50-100% and 10-100% of max_seq_len, packed and not, alternated; tokens/s counts real tokens
(no padding) over the steps after the first two. Figures are median [min-max] over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_SEQ_LEN = 128


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(kind: str, model: str, data: str, cache: str) -> None:
    """One tokenizing process: prints {"seconds", "rss_added", "samples"} as JSON."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model)
    if kind == "launcher":
        from launcher.config import DataConfig
        from launcher.data.tokenized import load_tokenized

        before, started = vm_rss(), time.perf_counter()
        train, _ = load_tokenized(DataConfig(path=data, cache_dir=cache, max_seq_len=512), tokenizer, seed=0)
        samples = len(train)
    else:
        before, started = vm_rss(), time.perf_counter()
        records = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
        table = records.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
        samples = len(table)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss_added": vm_rss() - before, "samples": samples}))


def tokenize_once(kind: str, model: Path, data: Path, cache: Path) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache / "hf"), TOKENIZERS_PARALLELISM="true")
    cmd = [sys.executable, __file__, "--child", kind, str(model), str(data), str(cache)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_records(path: Path, records: int, words: tuple[int, int], seed: int) -> Path:
    from launcher.demo import NUM_WORDS

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(records):
            text = " ".join(f"t{rng.randrange(NUM_WORDS)}" for _ in range(rng.randint(*words)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def ideal_gain(model: Path, data: Path, micro_batch: int) -> float:
    """Packed over unpacked share of real tokens in the micro batches the sampler draws: the most packing
    can gain where a step's time follows the tokens it runs, padding included."""
    from launcher.config import DataConfig, ModelConfig
    from launcher.data.batches import Rows
    from launcher.data.loading import load_tokenizer
    from launcher.data.report import row_efficiency
    from launcher.data.tokenized import load_tokenized

    cfg = DataConfig(path=str(data), max_seq_len=MAX_SEQ_LEN, cache_dir=str(data.parent / "cache-train"))
    train, _ = load_tokenized(cfg, load_tokenizer(ModelConfig(path=str(model))), seed=0)
    packed, unpacked = (Rows(train, packing, MAX_SEQ_LEN) for packing in (True, False))
    return row_efficiency(packed, micro_batch, seed=0) / row_efficiency(unpacked, micro_batch, seed=0)


def train_tokens_per_s(model: Path, data: Path, packing: bool, steps: int, micro_batch: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "launcher", "train", "--nproc", "1", "--model.path", str(model)]
    cmd += ["--data.path", str(data), "--data.max_seq_len", str(MAX_SEQ_LEN), "--data.packing", str(packing).lower()]
    cmd += ["--train.micro_batch_size", str(micro_batch), "--train.max_steps", str(steps), "--output_dir", str(out)]
    cmd += ["--overwrite_output_dir", "true"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env["QLAUNCH_DATA_CACHE"] = str(data.parent / "cache-train")  # the bench's own, as ideal_gain's
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    return sum(r["tokens"] for r in records) / sum(r["tokens"] / r["tokens_per_s"] for r in records)


def summary(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v / scale for v in values]
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000, help="records to tokenize (0: skip tokenizing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (0: no training runs)")
    parser.add_argument("--micro-batch", type=int, default=8, help="micro batch of the training runs")
    parser.add_argument("--spreads", default="0.5,0.1", help="shortest record as a fraction of max_seq_len, per run")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    from launcher.demo import build_base_model

    work = Path(tempfile.mkdtemp(prefix="qlaunch-bench-data-"))
    model = build_base_model(work / "base")
    if args.records:
        data = write_records(work / "records.jsonl", args.records, (100, 400), seed=0)
        figures: dict[str, list[dict]] = {}
        for repeat in range(args.repeats):
            for kind in ("launcher", "baseline"):  # alternated: the machine's drift hits both
                cache = work / f"cache-{kind}-{repeat}"
                figures.setdefault(f"{kind} first", []).append(tokenize_once(kind, model, data, cache))
                figures.setdefault(f"{kind} second", []).append(tokenize_once(kind, model, data, cache))
        samples = figures["launcher first"][0]["samples"]
        print(
            f"Tokenizing {args.records:,} records of 100-400 words ({samples:,} samples), one process, {args.repeats} repeats:"
        )
        print(f"{'':18} {'seconds':>22} {'RSS added (MiB)':>22}")
        for name, runs in figures.items():
            seconds = summary([r["seconds"] for r in runs])
            rss = summary([r["rss_added"] for r in runs], scale=2**20, digits=0)
            print(f"{name:18} {seconds:>22} {rss:>22}")
        ratio = [
            a["seconds"] / b["seconds"]
            for a, b in zip(figures["launcher first"], figures["baseline first"], strict=True)
        ]
        print(f"first start, launcher / baseline: {summary(ratio)} (target <= 1.2)")
        print(f"second start, launcher: {summary([r['seconds'] for r in figures['launcher second']])} s (target < 2)")
        rss_ratio = [
            a["rss_added"] / b["rss_added"]
            for a, b in zip(figures["launcher second"], figures["baseline second"], strict=True)
        ]
        print(f"RSS added per rank on a cached start, launcher / baseline: {summary(rss_ratio)} (target <= 2)")

    if not args.steps:
        return
    print(
        f"\nTraining, demo model, 1 process, micro batch {args.micro_batch}, max_seq_len {MAX_SEQ_LEN}, {args.steps} steps:"
    )
    for low in [float(x) for x in args.spreads.split(",")]:
        words = (int(low * MAX_SEQ_LEN), MAX_SEQ_LEN - 2)  # + <s> and </s>
        spread = write_records(work / f"spread-{low}.jsonl", 2000, words, seed=1)
        ideal = ideal_gain(model, spread, args.micro_batch)
        speeds: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for packing in (False, True):
                speeds[packing].append(
                    train_tokens_per_s(
                        model, spread, packing, args.steps, args.micro_batch, work / f"run-{low}-{packing}"
                    )
                )
        gain = [p / u for p, u in zip(speeds[True], speeds[False], strict=True)]
        print(
            f"  lengths {low:.0%}-100% of max_seq_len: tokens/s unpacked {summary(speeds[False], digits=0)}, "
            f"packed {summary(speeds[True], digits=0)}; packed / unpacked {summary(gain)} (target >= 1.5; "
            f"real-token share of the micro batches, packed / unpacked: {ideal:.2f})"
        )


if __name__ == "__main__":
    main()
