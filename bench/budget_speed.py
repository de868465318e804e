"""Speed and memory of `qlaunch budget` itself: a 70B and a 405B config, no weights, no download.

    python bench/budget_speed.py

Each budget runs in a fresh process (`python -m launcher budget ... --json`), so the figures include
the interpreter start and every import, as a user sees them; the process reports its own peak RSS.
The configs are the published config.json values of Llama-2-70B and Llama-3.1-405B.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}
CONFIGS = {
    "Llama-2-70B": {
        **LLAMA,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    },
    "Llama-3.1-405B": {
        **LLAMA,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_attention_heads": 128,
        "num_hidden_layers": 126,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
}
RUNS = [
    ("Llama-2-70B", "fsdp2", 2),
    ("Llama-2-70B", "zero3", 2),
    ("Llama-3.1-405B", "fsdp2", 8),
    ("Llama-3.1-405B", "zero3", 16),
]


def measure(config: Path, strategy: str, world: int) -> dict:
    """Wall time and peak RSS of one `qlaunch budget` process."""
    child = (
        "import resource, runpy, sys;"
        f"sys.argv = ['qlaunch', 'budget', '--model', {str(config)!r}, '--strategy', {strategy!r},"
        f" '--world-size', '{world}', '--seq-len', '2048', '--json'];"
        "from launcher import cli; code = cli.main();"
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rss_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")))
    report = json.loads(proc.stdout)
    return {
        "wall_s": wall,
        "peak_rss_mib": rss_kb / 1024,
        "total_gib": report["ranks"][0]["total_bytes"] / 2**30,
        "params_b": report["model_parameters"] / 1e9,
    }


def imports_alone() -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "from launcher import cli; from launcher.memory import commands"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - start


def main() -> None:
    print(f"python {sys.version.split()[0]}, one process per budget (interpreter start and imports included)")
    print(f"starting python and importing the launcher alone takes {imports_alone():.1f} s\n")
    print(
        f"{'model':<16}{'params':>9}{'strategy':>10}{'ranks':>7}{'wall s':>9}{'peak RSS MiB':>14}{'rank 0 needs':>14}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, strategy, world in RUNS:
            config = Path(tmp) / name / "config.json"
            config.parent.mkdir(exist_ok=True)
            config.write_text(json.dumps(CONFIGS[name]))
            m = measure(config, strategy, world)
            print(
                f"{name:<16}{m['params_b']:>8.1f}B{strategy:>10}{world:>7}{m['wall_s']:>9.1f}{m['peak_rss_mib']:>14.0f}{m['total_gib']:>10.1f} GiB"
            )


if __name__ == "__main__":
    main()
