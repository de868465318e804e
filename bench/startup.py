"""Start-up cost: launch -> first optimizer step, first start (cold quantized-base cache) vs a cached start.

    python bench/startup.py [--workdir /tmp/qlaunch-startup] [--strategy fsdp2] [--layers 16] [--no-record]
    python bench/startup.py --load-only   # the source rank's load stage alone: cold, then cached

Every process runs with CUDA_VISIBLE_DEVICES="": the source rank quantizes on the CPU (with a GPU it
quantizes weight by weight on it, launcher/model/quantize.py), and the cache entries are keyed "cpu".

Builds a random Llama of about 0.85B parameters (hidden 2048, MLP 5632, 16 layers, GQA 16/4 heads, vocab
32000; from a `LlamaConfig`, saved with `save_pretrained` in bf16) once in the work directory, then
trains it for one optimizer step on 2 CPU ranks twice with the same empty quantized-base cache: the
first start quantizes and writes the cache, the second reads it. The runs mark their stages on the
source rank ($QLAUNCH_TIMING, see launcher/train.py) and log the quantize / cache-write / cache-read
seconds on stderr; rank 0's peak host RSS comes from shard_report.json. Prints the table and, unless
--no-record, appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.demo import build_tokenizer, demo_config, write_dataset  # noqa: E402

GIB = 1024**3
MIB = 1024**2


def build_model(path: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def prepare(workdir: Path, layers: int) -> Path:
    base = workdir / "base"
    if not (base / "model.safetensors").is_file():
        print(f"Building the {layers}-layer random Llama in {base} ...", flush=True)
        subprocess.check_call([sys.executable, __file__, "--build", str(base), "--layers", str(layers)])
    write_dataset(workdir / "data.jsonl", records=64)
    cfg = demo_config(workdir, steps=1)
    cfg["train"].update(micro_batch_size=1, warmup_steps=0)
    (workdir / "run.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    return base


def launch(workdir: Path, name: str, strategy: str) -> dict:
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    timing = out / "timing.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        "--nproc",
        "2",
        "--config",
        str(workdir / "run.yaml"),
        "--strategy",
        strategy,
        "--output_dir",
        str(out / "run"),
        "--model.quant_cache_dir",
        str(workdir / "quant-cache"),
    ]
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        QLAUNCH_TIMING=str(timing),
        QLAUNCH_DATA_CACHE=str(workdir / "data-cache"),
    )
    log = out / "log.txt"
    started = time.time()
    with log.open("w") as f:
        code = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"{name}: exit status {code}; see {log}")
    marks = {r["stage"]: r["unix_time"] for r in map(json.loads, timing.read_text().splitlines())}
    step = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
    report = json.loads((out / "run" / "shard_report.json").read_text())
    text = log.read_text()

    def seconds(pattern: str) -> float | None:
        found = re.search(pattern, text)
        return float(found.group(1)) if found else None

    return {
        "imports": marks["load_start"] - started,
        "load": marks["load_end"] - marks["load_start"],
        "quantize": seconds(r"quantized in ([\d.]+) s and written"),
        "write": seconds(r"written to the cache \S+ in ([\d.]+) s"),
        "read_cache": seconds(r"read from the cache \S+ in ([\d.]+) s"),
        "prepare": marks["shard_start"] - marks["load_end"],
        "shard": marks["shard_end"] - marks["shard_start"],
        "first_step": step["unix_time"] - marks["shard_end"],
        "total": step["unix_time"] - started,
        "loss": step["loss"],
        "rss0": report[0]["peak_host_rss_bytes"],
        "rss1": report[1]["peak_host_rss_bytes"],
    }


LOAD_ONLY = """
import json, resource, sys, time
from launcher.config import ModelConfig, QuantConfig
from launcher.dtypes import DtypePolicy
import torch
from launcher.model.build import load_base
started = time.perf_counter()
load_base(ModelConfig(path=sys.argv[1], quant_cache_dir=sys.argv[2]), QuantConfig(), DtypePolicy.uniform(torch.bfloat16))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"load": time.perf_counter() - started, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}))
"""


def load_only(workdir: Path, base: Path) -> None:
    """The source rank's load stage alone, cold then cached, each in a fresh process (no launch, no step)."""
    checkpoint_bytes = (base / "model.safetensors").stat().st_size
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    for name in ("cold", "cached"):
        out = subprocess.run(
            [sys.executable, "-c", LOAD_ONLY, str(base), str(workdir / "quant-cache")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        note = [line for line in out.stderr.splitlines() if line.startswith("qlaunch:")]
        print(
            f"{name}: load {got['load']:.1f} s ({got['cpu']:.1f} CPU s in the process), peak RSS {got['rss'] / GIB:.2f} GiB "
            f"({got['rss'] / checkpoint_bytes:.2f}x the {checkpoint_bytes / GIB:.2f} GiB bf16 checkpoint); {note}",
            flush=True,
        )


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def table(cold: dict, warm: dict, checkpoint_bytes: int, params: float, strategy: str) -> str:
    quant_time = cold["quantize"]
    saved = (cold["load"] - cold["write"] - warm["load"]) / quant_time
    rows = [
        ("process start, imports, tokenized data", "imports"),
        ("load the base (rank 0): whole stage", "load"),
        ("  read + quantize the checkpoint", "quantize"),
        ("  write the cache", "write"),
        ("  read the cache", "read_cache"),
        ("k-bit preparation, LoRA, accelerator", "prepare"),
        ("sharding", "shard"),
        ("first optimizer step", "first_step"),
        ("**launch → first step**", "total"),
    ]
    lines = [
        f"| stage ({strategy}, 2 CPU ranks), seconds | first start (cold cache) | cached start |",
        "|---|---|---|",
        *(f"| {label} | {fmt(cold[key])} | {fmt(warm[key])} |" for label, key in rows),
        f"| rank 0 peak host RSS (GiB) | {cold['rss0'] / GIB:.2f} | {warm['rss0'] / GIB:.2f} |",
        f"| rank 0 peak RSS / bf16 checkpoint ({checkpoint_bytes / GIB:.2f} GiB) | "
        f"{cold['rss0'] / checkpoint_bytes:.2f}x | {warm['rss0'] / checkpoint_bytes:.2f}x |",
        f"| rank 1 peak host RSS (GiB) | {cold['rss1'] / GIB:.2f} | {warm['rss1'] / GIB:.2f} |",
        f"| loss at step 1 | {cold['loss']:.6f} | {warm['loss']:.6f} |",
    ]
    summary = (
        f"{params / 1e9:.2f}B-parameter random Llama. The cached start's load stage is {warm['load']:.1f} s against "
        f"{cold['load'] - cold['write']:.1f} s of reading and quantizing (cache write excluded): it saves "
        f"{saved:.0%} of the first start's quantization time (target >= 70%). Rank 0 peaks at "
        f"{cold['rss0'] / checkpoint_bytes:.2f}x (cold) / {warm['rss0'] / checkpoint_bytes:.2f}x (cached) "
        "the bf16 checkpoint (target <= 1.5x)."
    )
    return "\n".join(lines) + "\n\n" + summary + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/qlaunch-startup")
    parser.add_argument("--strategy", default="fsdp2")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--load-only", action="store_true", help="time the source rank's load stage alone")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_model(Path(args.build), args.layers)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = prepare(workdir, args.layers)
    shutil.rmtree(workdir / "quant-cache", ignore_errors=True)
    if args.load_only:
        load_only(workdir, base)
        return
    checkpoint_bytes = (base / "model.safetensors").stat().st_size
    params = checkpoint_bytes / 2
    print("First start (cold quantized-base cache) ...", flush=True)
    cold = launch(workdir, "cold", args.strategy)
    print("Cached start ...", flush=True)
    warm = launch(workdir, "warm", args.strategy)
    result = table(cold, warm, checkpoint_bytes, params, args.strategy)
    print(result)
    if not args.no_record:
        machine = f"{os.cpu_count()}-core CPU, {platform.python_version()}, no GPU"
        with (REPO / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n## Start-up: quantized-base cache ({machine}, {time.strftime('%Y-%m-%d %H:%M')})\n\n")
            f.write("`python bench/startup.py`: launch → first optimizer step, first start vs cached start.\n\n")
            f.write(result)


if __name__ == "__main__":
    main()
