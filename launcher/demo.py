"""The embedded default: a small Llama built from a config, its own tokenizer, and data it can learn.

Nothing is downloaded. The base has random weights (saved with `save_pretrained`, loaded back
through `from_pretrained` in 4-bit like any checkpoint); the data is a token-to-next-token mapping
(each token is followed by token + 7), which LoRA adapters on a frozen random base learn within a
few dozen steps (see docs/cpu-distributed.md).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import yaml

from . import launch, strategies
from .config import ConfigError, DistConfig

NUM_WORDS = 250
STRIDE = 7
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
DEMO_STEPS = 200


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [f"t{i}" for i in range(NUM_WORDS)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_base_model(
    path: Path, layers: int = 4, hidden: int = 256, seed: int = 0, heads: int = 4, kv_heads: int = 4
) -> Path:
    """A random-weight Llama and its tokenizer, written with `save_pretrained` (kv_heads < heads: grouped-query attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for writing one small file says nothing
    try:
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    return path


def write_dataset(path: Path, records: int = 512, words: int = 62, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(records):
            start = rng.randrange(NUM_WORDS)
            text = " ".join(f"t{(start + STRIDE * i) % NUM_WORDS}" for i in range(words))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def demo_config(workdir: Path, steps: int) -> dict:
    return {
        "model": {"path": str(workdir / "base")},
        "data": {"path": str(workdir / "data.jsonl"), "max_seq_len": 64},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "train": {
            "micro_batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 5,
            "max_steps": steps,
            "lr_schedule": "cosine",
        },
        "output_dir": str(workdir / "run"),
    }


def prepare_demo(workdir: Path, steps: int = DEMO_STEPS) -> Path:
    """Writes base model, data and run config under `workdir`; returns the run config's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    build_base_model(workdir / "base")
    write_dataset(workdir / "data.jsonl")
    run_yaml = workdir / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(demo_config(workdir, steps), sort_keys=False))
    return run_yaml


def run_demo(output_dir: str | None, strategy: str = "fsdp2", nproc: int = 2, steps: int | None = None) -> int:
    workdir = Path(output_dir or f"outputs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"`{workdir}` already exists and is not empty; pick another --output-dir.")
    chosen = strategies.get(strategy)  # before anything is written
    if nproc < 1:
        raise ConfigError(f"`--nproc` must be at least 1, got {nproc}.")
    print(f"Building the demo model and data in {workdir} ...", flush=True)
    run_yaml = prepare_demo(workdir, steps or DEMO_STEPS)
    print(f"Training with {strategy} on {nproc} rank(s): {run_yaml}", flush=True)
    machines = launch.Machines.local(nproc)
    return launch.launch(chosen, machines, ["--config", str(run_yaml), "--strategy", strategy], DistConfig())
