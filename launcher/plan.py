"""Plan: which configurations fit the GPUs, fastest first, and the one to launch (`qlaunch plan`).

Every strategy x micro batch x checkpointing x offload (ZeRO only) is budgeted (launcher.budget);
those whose fullest rank stays under the GPU memory minus a safety margin are ranked by an estimate
of training tokens per second. The estimate is a simple roofline, not a benchmark: a step takes the
longer of its passes (forward, the input-gradient backward through the frozen 4-bit base, and the
recomputed forward with checkpointing; each bound by matmul work at GPU_FLOPS or by reading the
weights at HBM_BYTES_PER_S) and the all-gathers of the base that FSDP and ZeRO-3 do in forward and
backward (at the link's bandwidth, overlapped with compute), plus the LoRA gradient all-reduce and,
when offloaded, the optimizer's round trip to host RAM.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from . import budget, strategies
from .config import STRATEGIES, ConfigError, RunConfig

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
GPU_FLOPS = 400e12
"""Effective bf16 matmul throughput of one GPU on dequantized 4-bit weights (H100-class)."""
INTRA_NODE_BYTES_PER_S = 150e9
"""Per-GPU collective bandwidth inside a node (NVLink-class)."""
INTER_NODE_BYTES_PER_S = 12.5e9
"""Per-GPU collective bandwidth across nodes (100 Gbit/s): rings across nodes run at this speed."""
HBM_BYTES_PER_S = 3e12
"""GPU memory bandwidth: every pass reads all 4-bit weights, which bounds small micro batches."""
HOST_BYTES_PER_S = 25e9
"""GPU <-> host copies (PCIe 4 x16) for an offloaded optimizer."""


@dataclass
class Candidate:
    strategy: str
    micro_batch: int
    checkpointing: bool
    offload: bool
    budget: budget.Budget
    peak_bytes: int
    tokens_per_s: float

    def fits(self, limit: int) -> bool:
        return self.peak_bytes <= limit

    def launch_command(self, run_args: list[str]) -> str:
        """The command that trains this configuration; `run_args` name the model, data and LoRA settings."""
        hardware = self.budget.hardware
        choice = [f"--train.micro_batch_size {self.micro_batch}"]
        if not self.checkpointing:
            choice.append("--train.gradient_checkpointing false")
        if hardware.nodes > 1:
            line = (
                f"accelerate launch --config_file accelerate_configs/multinode/{self.strategy}.yaml --num_machines "
                f"{hardware.nodes} --num_processes {hardware.world_size} --machine_rank RANK --main_process_ip HOST "
                f"-m launcher train {' '.join(run_args + choice)}"
            )
        else:
            line = f"qlaunch train {' '.join(run_args + choice)} --strategy {self.strategy} --nproc {hardware.world_size}"
        if self.offload:
            line += f"   (with offload_optimizer set in ds_configs/{self.strategy}.json)"
        return line


def run_arguments(args) -> list[str]:
    """`qlaunch train` arguments for what `qlaunch plan` was told about the run."""
    model = args.model[: -len("/config.json")] if args.model and args.model.endswith("/config.json") else args.model
    given = [("--config", args.config), ("--model.path", model), ("--data.max_seq_len", args.seq_len),
             ("--lora.r", args.lora_r), ("--lora.target_modules", f"[{args.lora_targets}]" if args.lora_targets else None)]
    found = [f"{flag} {value}" for flag, value in given if value is not None]
    return found if args.config else found + ["--data.path DATA"]


def ranking_key(candidate: Candidate) -> tuple[float, int]:
    """Fastest first; estimates equal to 3 significant digits tie, and the one with more headroom wins."""
    return (-float(f"{candidate.tokens_per_s:.3g}"), candidate.peak_bytes)


def estimated_tokens_per_s(result: budget.Budget) -> float:
    cfg, hardware, model = result.cfg, result.hardware, result.model
    world, c = hardware.world_size, model.config
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
    # Matmul work of one forward: 2 flops per weight per token, and causal attention's scores and mix.
    forward = 2 * result.model_params * tokens + 2 * c.num_hidden_layers * tokens * cfg.data.max_seq_len * c.hidden_size
    weights = sum(t.numel * t.itemsize for t in model.tensors)
    one_pass = max(forward / GPU_FLOPS, weights / HBM_BYTES_PER_S)
    compute = (3 if cfg.train.gradient_checkpointing else 2) * one_pass
    bandwidth = INTER_NODE_BYTES_PER_S if hardware.nodes > 1 else INTRA_NODE_BYTES_PER_S
    lora = sum(t.numel * t.itemsize for t in model.trainable)
    share = (world - 1) / world
    gathers = 2 * weights * share / bandwidth if result.strategy in ("fsdp1", "fsdp2", "zero3") and world > 1 else 0.0
    reduce = 2 * lora * share / bandwidth
    offload = 2 * lora / HOST_BYTES_PER_S if hardware.offload else 0.0
    return world * tokens / (max(compute, gathers) + reduce + offload)


def candidates(cfg: RunConfig, hardware: budget.Hardware) -> list[Candidate]:
    cache = budget.ModelCache(cfg)
    found = []
    for strategy in STRATEGIES:
        if strategies.get(strategy).refusal(cfg):
            continue
        for offload in (False, True) if strategy.startswith("zero") else (False,):
            for checkpointing in (True, False):
                for micro in MICRO_BATCHES:
                    run = dataclasses.replace(
                        cfg,
                        strategy=strategy,
                        train=dataclasses.replace(cfg.train, micro_batch_size=micro, gradient_checkpointing=checkpointing),
                    )
                    result = budget.predict(run, dataclasses.replace(hardware, offload=offload), cache=cache)
                    peak = max(r.total_bytes for r in result.ranks)
                    found.append(Candidate(strategy, micro, checkpointing, offload, result, peak, estimated_tokens_per_s(result)))
    return found


def run_command(args) -> int:
    cfg, hardware = budget.request_from_args(args)
    if hardware.gpu_memory is None:
        raise ConfigError("`qlaunch plan` needs --gpu-memory (memory per GPU, e.g. 24GiB or 80GB) to decide what fits.")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin is the fraction of GPU memory kept free, between 0 and 1; got {args.margin}.")
    limit = int(hardware.gpu_memory * (1 - args.margin))
    found = candidates(cfg, hardware)
    fitting = sorted((c for c in found if c.fits(limit)), key=ranking_key)
    if args.json:
        print(json.dumps({
            "gpu_memory_bytes": hardware.gpu_memory,
            "limit_bytes": limit,
            "world_size": hardware.world_size,
            "nodes": hardware.nodes,
            "candidates": [
                {
                    "strategy": c.strategy, "micro_batch": c.micro_batch, "gradient_checkpointing": c.checkpointing,
                    "offload": c.offload, "peak_bytes": c.peak_bytes, "fits": c.fits(limit),
                    "estimated_tokens_per_s": round(c.tokens_per_s, 1),
                }
                for c in sorted(found, key=lambda c: (not c.fits(limit), -c.tokens_per_s))
            ],
            "recommended": None if not fitting else {
                "strategy": fitting[0].strategy, "micro_batch": fitting[0].micro_batch,
                "gradient_checkpointing": fitting[0].checkpointing, "offload": fitting[0].offload,
                "command": fitting[0].launch_command(run_arguments(args)),
            },
        }, indent=2))
        return 0
    print(
        f"Plan for {cfg.model.path} on {hardware.world_size} GPU(s) of {budget.format_bytes(hardware.gpu_memory)} "
        f"({hardware.nodes} node(s)), {cfg.data.max_seq_len} tokens per sequence, LoRA r={cfg.lora.r}; a configuration "
        f"fits when its fullest rank needs at most {budget.format_bytes(limit)} ({args.margin:.0%} kept free)."
    )
    if not fitting:
        smallest = min(found, key=lambda c: c.peak_bytes)
        print(
            f"\nNothing fits. The smallest configuration ({smallest.strategy}, micro batch {smallest.micro_batch}, "
            f"checkpointing {'on' if smallest.checkpointing else 'off'}{', offload' if smallest.offload else ''}) needs {budget.format_bytes(smallest.peak_bytes)} per rank: "
            "use more GPUs, larger GPUs, or a shorter sequence length."
        )
        return 0
    rows = [
        [str(i + 1), c.strategy, str(c.micro_batch), "on" if c.checkpointing else "off", "yes" if c.offload else "no",
         budget.format_bytes(c.peak_bytes), budget.format_bytes(hardware.gpu_memory - c.peak_bytes), f"{c.tokens_per_s:,.0f}"]
        for i, c in enumerate(fitting[:15])
    ]
    header = ["#", "strategy", "micro batch", "checkpointing", "offload", "fullest rank", "headroom", "est. tokens/s"]
    print("\n" + budget.render_table(header, rows))
    print(f"\n{len(fitting)} of {len(found)} configurations fit" + (" (15 fastest shown)." if len(fitting) > 15 else "."))
    best = fitting[0]
    print(f"\nLaunch: {best.launch_command(run_arguments(args))}")
    return 0
