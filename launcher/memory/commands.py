"""`qlaunch budget` and `qlaunch plan`: their flags onto the run config and the hardware, and their output."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config
from .planner import Candidate, candidates, longest_context, ranking_key
from .predict import DEFAULT_RUNTIME_OVERHEAD, Hardware, predict
from .report import plot, render, render_table, require_matplotlib
from .sizes import GiB, format_bytes, parse_bytes
from .skeleton import ModelCache

MIN_GPU_MEMORY = GiB
"""Smaller GPU memory is a typo (a unit missing or wrong), not a GPU a 4-bit LLM trains on."""


def request_from_args(args) -> tuple[RunConfig, Hardware]:
    """`qlaunch budget` / `qlaunch plan` flags onto the run config (flags override --config) and the hardware."""
    overrides = [
        (key, value)
        for key, value in (
            ("model.path", args.model),
            ("strategy", getattr(args, "strategy", None)),
            ("data.max_seq_len", args.seq_len),
            ("data.images_per_sample", args.images),
            ("data.image_size", args.image_size),
            ("train.micro_batch_size", getattr(args, "micro_batch", None)),
            ("train.objective", args.objective),
            ("lora.r", args.lora_r),
            ("lora.target_modules", _targets(args.lora_targets)),
            ("quant.experts", args.experts),
            ("train.loss_chunk_tokens", args.loss_chunk),
            ("train.sequence_parallel", args.sequence_parallel),
            ("train.activation_offload", args.activation_offload),
            ("train.gradient_checkpointing", False if getattr(args, "no_checkpointing", False) else None),
            ("train.offload", getattr(args, "offload", None)),
        )
        if value is not None
    ]
    cfg = load_config(args.config, overrides)
    nodes = args.nodes or 1
    if args.world_size is not None and args.gpus_per_node is not None and args.world_size != nodes * args.gpus_per_node:
        raise ConfigError(
            f"--world-size {args.world_size} disagrees with --nodes {nodes} x --gpus-per-node {args.gpus_per_node}. "
            "Give one of the two."
        )
    world = args.world_size if args.world_size is not None else nodes * (args.gpus_per_node or 1)
    hardware = Hardware(
        world_size=world,
        nodes=nodes,
        gpu_memory=parse_bytes(args.gpu_memory, "--gpu-memory", MIN_GPU_MEMORY) if args.gpu_memory else None,
        runtime_overhead=parse_bytes(args.runtime_overhead, "--runtime-overhead")
        if args.runtime_overhead
        else DEFAULT_RUNTIME_OVERHEAD,
        optimizer=getattr(args, "optimizer", "adamw"),
    )
    return cfg, hardware


def _targets(text: str | None) -> list[str] | str | None:
    if text is None or text == "all-linear":
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def budget_command(args) -> int:
    """`qlaunch budget`: the table (or JSON), and the plot if asked."""
    cfg, hardware = request_from_args(args)
    if args.plot:
        require_matplotlib()  # fail before the work, not after
    result = predict(cfg, hardware)
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
    if args.plot:
        plot(result, Path(args.plot))
        if not args.json:
            print(f"\nPlot: {args.plot}")
    return 0


def run_arguments(args) -> list[str]:
    """`qlaunch train` arguments for what `qlaunch plan` was told about the run."""
    model = args.model[: -len("/config.json")] if args.model and args.model.endswith("/config.json") else args.model
    given = [
        ("--config", args.config),
        ("--model.path", model),
        ("--data.max_seq_len", args.seq_len),
        ("--train.objective", args.objective),
        ("--lora.r", args.lora_r),
        ("--lora.target_modules", f"[{args.lora_targets}]" if args.lora_targets else None),
        ("--quant.experts", args.experts),
    ]
    found = [f"{flag} {value}" for flag, value in given if value is not None]
    return found if args.config else found + ["--data.path DATA"]


def plan_command(args) -> int:
    """`qlaunch plan`: the configurations that fit, fastest first, and the command for the best."""
    cfg, hardware = request_from_args(args)
    if hardware.gpu_memory is None:
        raise ConfigError("`qlaunch plan` needs --gpu-memory (memory per GPU, e.g. 24GiB or 80GB) to decide what fits.")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin is the fraction of GPU memory kept free, between 0 and 1; got {args.margin}.")
    limit = int(hardware.gpu_memory * (1 - args.margin))
    host_limit = parse_bytes(args.host_memory, "--host-memory") if args.host_memory else None
    if args.longest_context:
        return print_longest_context(args, cfg, hardware, limit, host_limit)
    found = candidates(cfg, hardware, search_splits=args.sequence_parallel is None)
    fitting = sorted((c for c in found if c.fits(limit, host_limit)), key=ranking_key)
    if args.json:
        print(json.dumps(plan_json(args, hardware, found, fitting, limit, host_limit), indent=2))
    else:
        print_plan(args, cfg, hardware, found, fitting, limit, host_limit)
    return 0


def _settings(c: Candidate) -> dict:
    return {
        "strategy": c.strategy,
        "micro_batch": c.micro_batch,
        "gradient_checkpointing": c.checkpointing,
        "offload": c.offload,
        "activation_offload": c.activation_offload,
        "sequence_parallel": c.sequence_parallel,
    }


def plan_json(args, hardware, found: list[Candidate], fitting: list[Candidate], limit: int, host_limit) -> dict:
    """Every candidate, fitting first, and the recommended one with its launch command."""
    listed = sorted(found, key=lambda c: (not c.fits(limit, host_limit), -c.tokens_per_s))
    return {
        "gpu_memory_bytes": hardware.gpu_memory,
        "limit_bytes": limit,
        "world_size": hardware.world_size,
        "nodes": hardware.nodes,
        "candidates": [
            _settings(c)
            | {
                "peak_bytes": c.peak_bytes,
                "host_bytes": c.host_bytes,
                "fits": c.fits(limit, host_limit),
                "estimated_tokens_per_s": round(c.tokens_per_s, 1),
            }
            for c in listed
        ],
        "recommended": None
        if not fitting
        else _settings(fitting[0]) | {"command": fitting[0].launch_command(run_arguments(args))},
    }


def print_plan(args, cfg, hardware, found: list[Candidate], fitting: list[Candidate], limit: int, host_limit) -> None:
    """The plan as text: what fits, the 15 fastest in a table, and the command for the best."""
    print(
        f"Plan for {cfg.model.path} on {hardware.world_size} GPU(s) of {format_bytes(hardware.gpu_memory)} "
        f"({hardware.nodes} node(s)), {cfg.data.max_seq_len} tokens per sequence, LoRA r={cfg.lora.r}; a configuration "
        f"fits when its fullest rank needs at most {format_bytes(limit)} ({args.margin:.0%} kept free)"
        + (f" and a node's host RAM at most {format_bytes(host_limit)}." if host_limit else ".")
    )
    if not fitting and host_limit and any(c.fits(limit) for c in found):
        print(
            f"\nNothing fits: the configurations that fit the GPUs need more than {format_bytes(host_limit)} of host "
            "RAM per node. Raise --host-memory if the nodes have it, or use more GPUs."
        )
        return
    if not fitting:
        smallest = min(found, key=lambda c: c.peak_bytes)
        print(
            f"\nNothing fits. The smallest configuration ({smallest.strategy}, micro batch {smallest.micro_batch}, "
            f"checkpointing {'on' if smallest.checkpointing else 'off'}{'' if smallest.offload == 'none' else f', offload {smallest.offload}'}{', activation offload' if smallest.activation_offload else ''}{f', sequence parallel {smallest.sequence_parallel}' if smallest.sequence_parallel > 1 else ''}) needs {format_bytes(smallest.peak_bytes)} per rank: "
            "use more GPUs, larger GPUs, or a shorter sequence length."
        )
        return
    rows = [
        [
            str(i + 1),
            c.strategy,
            str(c.micro_batch),
            "on" if c.checkpointing else "off",
            c.offload,
            "on" if c.activation_offload else "off",
            str(c.sequence_parallel),
            format_bytes(c.peak_bytes),
            format_bytes(hardware.gpu_memory - c.peak_bytes),
            format_bytes(c.host_bytes),
            f"{c.tokens_per_s:,.0f}",
        ]
        for i, c in enumerate(fitting[:15])
    ]
    header = [
        "#",
        "strategy",
        "micro batch",
        "checkpointing",
        "offload",
        "activation offload",
        "seq. parallel",
        "fullest rank",
        "headroom",
        "host RAM/rank",
        "est. tokens/s",
    ]
    print("\n" + render_table(header, rows))
    print(
        f"\n{len(fitting)} of {len(found)} configurations fit" + (" (15 fastest shown)." if len(fitting) > 15 else ".")
    )
    best = fitting[0]
    print(f"\nLaunch: {best.launch_command(run_arguments(args))}")


def print_longest_context(args, cfg, hardware, limit: int, host_limit: int | None) -> int:
    """`qlaunch plan --longest-context`: per strategy, the longest sequence that fits and how to launch it."""
    started = time.perf_counter()

    def progress(strategy: str, result) -> None:
        longest = "nothing fits" if result is None else f"{result[0]:,} tokens"
        print(f"qlaunch: {strategy}: {longest} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    found = longest_context(
        cfg, hardware, limit, host_limit, search_splits=args.sequence_parallel is None, progress=progress
    )
    if args.json:
        report = {
            strategy: None
            if result is None
            else {
                "max_seq_len": result[0],
                "sequence_parallel": result[1].sequence_parallel,
                "peak_bytes": result[1].peak_bytes,
                "command": launch_line(args, *result),
            }
            for strategy, result in found.items()
        }
        print(
            json.dumps({"gpu_memory_bytes": hardware.gpu_memory, "limit_bytes": limit, "strategies": report}, indent=2)
        )
        return 0
    rows = [
        [strategy, "-", "nothing fits even at 1,024 tokens", "", "", "", "", ""]
        if result is None
        else [
            strategy,
            f"{result[0]:,}",
            str(result[1].micro_batch),
            result[1].offload,
            "on" if result[1].activation_offload else "off",
            str(result[1].sequence_parallel),
            format_bytes(result[1].peak_bytes),
            format_bytes(result[1].host_bytes),
        ]
        for strategy, result in found.items()
    ]
    header = [
        "strategy",
        "longest context",
        "micro batch",
        "offload",
        "activation offload",
        "seq. parallel",
        "fullest rank",
        "host RAM/rank",
    ]
    print(
        f"Longest context for {cfg.model.path} on {hardware.world_size} GPU(s) of {format_bytes(hardware.gpu_memory)}, "
        f"LoRA r={cfg.lora.r} (a multiple of 1,024 tokens; fullest rank at most {format_bytes(limit)})\n"
    )
    print(render_table(header, rows))
    positions = getattr(ModelCache(cfg.model).config, "max_position_embeddings", None)
    if positions and any(result and result[0] > positions for result in found.values()):
        print(
            f"\nMemory is not the only limit: the model was trained on at most {positions:,} positions "
            "(max_position_embeddings); beyond them it needs a rope_scaling it was fine-tuned with."
        )
    for strategy, result in found.items():
        if result is not None:
            print(f"\n{strategy}: {launch_line(args, *result)}")
    return 0


def launch_line(args, seq: int, candidate) -> str:
    run_args = [a for a in run_arguments(args) if not a.startswith("--data.max_seq_len")]
    return candidate.launch_command([*run_args, f"--data.max_seq_len {seq}"])
