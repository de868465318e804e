"""The planner: which configurations fit the GPUs, fastest first, and the one to launch (`qlaunch plan`).

Every strategy x micro batch x checkpointing x offload mode it offers is budgeted (launcher.memory.predict);
those whose fullest rank stays under the GPU memory minus a safety margin are ranked by an estimate
of training tokens per second. The estimate is a simple roofline, not a benchmark: a step takes the
longer of its passes (forward, the input-gradient backward through the frozen 4-bit base, and the
recomputed forward with checkpointing; each bound by matmul work at GPU_FLOPS or by reading the
weights at HBM_BYTES_PER_S) and the all-gathers of the base that FSDP and ZeRO-3 do in forward and
backward (at the link's bandwidth, overlapped with compute), plus the LoRA gradient all-reduce and
what offloading copies between host RAM and the GPU: the optimizer's round trip, and with offloaded
parameters this rank's weights once per pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import strategies
from ..config import RunConfig
from .predict import Budget, Hardware, predict
from .skeleton import ModelCache

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
"""GPU <-> host copies (PCIe 4 x16) for offloaded optimizer state and parameters."""


@dataclass
class Candidate:
    strategy: str
    micro_batch: int
    checkpointing: bool
    offload: str
    """train.offload: none, optimizer or params."""
    budget: Budget
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
        if self.offload != "none":
            choice.append(f"--train.offload {self.offload}")
        if hardware.nodes > 1:
            line = (
                f"accelerate launch --config_file accelerate_configs/multinode/{strategies.get(self.strategy).spec.accelerate_config} --num_machines "
                f"{hardware.nodes} --num_processes {hardware.world_size} --machine_rank RANK --main_process_ip HOST "
                f"-m launcher train {' '.join(run_args + choice)}"
            )
        else:
            line = (
                f"qlaunch train {' '.join(run_args + choice)} --strategy {self.strategy} --nproc {hardware.world_size}"
            )
        return line


def ranking_key(candidate: Candidate) -> tuple[float, int]:
    """Fastest first; estimates equal to 3 significant digits tie, and the one with more headroom wins."""
    return (-float(f"{candidate.tokens_per_s:.3g}"), candidate.peak_bytes)


def estimated_tokens_per_s(result: Budget) -> float:
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
    shards_base = strategies.get(result.strategy).spec.shards_base
    gathers = 2 * weights * share / bandwidth if shards_base and world > 1 else 0.0
    reduce = 2 * lora * share / bandwidth
    passes = 3 if cfg.train.gradient_checkpointing else 2
    mode = cfg.train.offload
    offload = 2 * lora / HOST_BYTES_PER_S if mode != "none" else 0.0
    if mode == "params":
        # This rank's weights go up to the GPU for every pass's all-gather (not overlapped: a bound).
        held = max(
            r.host_components.get("base_4bit", 0) + r.host_components.get("frozen_dense", 0) for r in result.ranks
        )
        offload += passes * held / HOST_BYTES_PER_S
    return world * tokens / (max(compute, gathers) + reduce + offload)


def candidates(cfg: RunConfig, hardware: Hardware) -> list[Candidate]:
    cache = ModelCache(cfg)
    found = []
    for strategy in strategies.NAMES:
        spec = strategies.get(strategy).spec
        base = dataclasses.replace(cfg, strategy=strategy, train=dataclasses.replace(cfg.train, offload="none"))
        if strategies.refusal(strategies.get(strategy), base):
            continue
        for offload in spec.offload_modes:
            for checkpointing in (True, False):
                for micro in MICRO_BATCHES:
                    train = dataclasses.replace(
                        cfg.train, micro_batch_size=micro, gradient_checkpointing=checkpointing, offload=offload
                    )
                    run = dataclasses.replace(cfg, strategy=strategy, train=train)
                    result = predict(run, hardware, cache=cache)
                    peak = max(r.total_bytes for r in result.ranks)
                    found.append(
                        Candidate(strategy, micro, checkpointing, offload, result, peak, estimated_tokens_per_s(result))
                    )
    return found
