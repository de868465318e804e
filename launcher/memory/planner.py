"""The planner: which configurations fit the GPUs, fastest first, and the one to launch (`qlaunch plan`).

Every strategy x micro batch x checkpointing x offload mode it offers x activation offload (with
checkpointing) x the sequence-parallel splits it runs and the model's heads allow is budgeted
(launcher.memory.predict);
those whose fullest rank stays under the GPU memory minus a safety margin are ranked by an estimate
of training tokens per second. The estimate is a simple roofline, not a benchmark: a step takes the
longer of its passes (forward, the input-gradient backward through the frozen 4-bit base, and the
recomputed forward with checkpointing; each bound by matmul work at GPU_FLOPS or by reading the
weights at HBM_BYTES_PER_S) and the all-gathers of the base that FSDP and ZeRO-3 do in forward and
backward (at the link's bandwidth, overlapped with compute), plus the LoRA gradient all-reduce and
what offloading copies between host RAM and the GPU: the optimizer's round trip, with offloaded
parameters this rank's weights once per pass, and offloaded activations down and up once per micro batch;
a sequence split N ways computes 1/N of each row's tokens per rank and exchanges q, k, v and the attention
output twice per layer and pass (all-to-alls at the link's bandwidth, not overlapped: a bound).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from .. import objectives, strategies
from ..config import RunConfig
from ..run import sequence_parallel
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
"""GPU <-> host copies (PCIe 4 x16) for offloaded optimizer state, parameters and activations."""


@dataclass
class Candidate:
    strategy: str
    micro_batch: int
    checkpointing: bool
    offload: str
    """train.offload: none, optimizer or params."""
    activation_offload: bool
    budget: Budget
    peak_bytes: int
    tokens_per_s: float
    sequence_parallel: int = 1

    @property
    def host_bytes(self) -> int:
        """Host RAM of the fullest rank."""
        return max(sum(r.host_components.values()) for r in self.budget.ranks)

    def host_bytes_per_node(self) -> int:
        hardware = self.budget.hardware
        return self.host_bytes * (hardware.world_size // hardware.nodes)

    def fits(self, limit: int, host_limit: int | None = None) -> bool:
        return self.peak_bytes <= limit and (host_limit is None or self.host_bytes_per_node() <= host_limit)

    def launch_command(self, run_args: list[str]) -> str:
        """The command that trains this configuration; `run_args` name the model, data and LoRA settings."""
        hardware = self.budget.hardware
        choice = [f"--train.micro_batch_size {self.micro_batch}"]
        if not self.checkpointing:
            choice.append("--train.gradient_checkpointing false")
        if self.offload != "none":
            choice.append(f"--train.offload {self.offload}")
        if self.activation_offload:
            choice.append("--train.activation_offload true")
        if self.sequence_parallel > 1:
            choice.append(f"--train.sequence_parallel {self.sequence_parallel}")
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
    split = cfg.train.sequence_parallel
    objective = objectives.get(cfg)
    sequences = objective.sequences_per_sample * cfg.train.micro_batch_size
    tokens = sequences * sequence_parallel.local_tokens(cfg.data.max_seq_len, split)
    # Matmul work of one forward on this rank's tokens: 2 flops per weight per token, and causal attention's
    # scores and mix (1/split of the heads over the whole sequence is as much as all heads over this rank's).
    forward = 2 * result.model_params * tokens + 2 * c.num_hidden_layers * tokens * cfg.data.max_seq_len * c.hidden_size
    weights = sum(t.numel * t.itemsize for t in model.tensors)
    one_pass = max(forward / GPU_FLOPS, weights / HBM_BYTES_PER_S)
    passes = (3 if cfg.train.gradient_checkpointing else 2) + objective.forwards_without_grad
    compute = passes * one_pass
    bandwidth = INTER_NODE_BYTES_PER_S if hardware.nodes > 1 else INTRA_NODE_BYTES_PER_S
    lora = sum(t.numel * t.itemsize for t in model.trainable)
    share = (world - 1) / world
    shards_base = strategies.get(result.strategy).spec.shards_base
    gathers = 2 * weights * share / bandwidth if shards_base and world > 1 else 0.0
    reduce = 2 * lora * share / bandwidth
    passes = 3 if cfg.train.gradient_checkpointing else 2
    heads_dim = c.hidden_size // c.num_attention_heads * (c.num_attention_heads + 2 * _kv_heads(c))
    exchanges = (
        2 * passes * c.num_hidden_layers * tokens * (heads_dim + c.hidden_size) * (split - 1) / split / bandwidth
    )
    mode = cfg.train.offload
    offload = 2 * lora / HOST_BYTES_PER_S if mode != "none" else 0.0
    if mode == "params":
        # This rank's weights go up to the GPU for every pass's all-gather (not overlapped: a bound).
        held = max(
            r.host_components.get("base_4bit", 0) + r.host_components.get("frozen_dense", 0) for r in result.ranks
        )
        offload += passes * held / HOST_BYTES_PER_S
    if cfg.train.activation_offload:
        # What forward saves goes down to host RAM and comes back up in backward, per micro batch.
        offload += 2 * max(r.host_components.get("activations", 0) for r in result.ranks) / HOST_BYTES_PER_S
    return world * tokens / (max(compute, gathers) + reduce + offload + exchanges)


def _kv_heads(config) -> int:
    config = config.get_text_config()
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def splits(hardware: Hardware, strategy: str, cache: ModelCache) -> tuple[int, ...]:
    """The sequence-parallel sizes worth budgeting: 1, and where the strategy splits sequences, every power
    of two up to the world size that divides it and the model's heads."""
    if not strategies.get(strategy).spec.sequence_parallel:
        return (1,)
    config = cache.config
    sizes = [2**k for k in range(1, hardware.world_size.bit_length())]
    return (1,) + tuple(
        n
        for n in sizes
        if not sequence_parallel.world_refusal(n, hardware.world_size) and not sequence_parallel.refusal(config, n)
    )


def refused(cfg: RunConfig, strategy: str) -> bool:
    """The strategy cannot run `cfg` whatever offload mode the plan picks for it."""
    base = dataclasses.replace(cfg, strategy=strategy, train=dataclasses.replace(cfg.train, offload="none"))
    return strategies.refusal(strategies.get(strategy), base) is not None


def candidates(
    cfg: RunConfig,
    hardware: Hardware,
    cache: ModelCache | None = None,
    only: tuple[str, ...] = strategies.NAMES,
    search_splits: bool = True,
    fits: Callable[[Candidate], bool] | None = None,
) -> list[Candidate]:
    """Every configuration of `only` budgeted (`search_splits`: over the sequence-parallel sizes, else at
    `cfg`'s). With `fits`, larger micro batches are not tried once one does not fit (memory grows with them)."""
    cache = cache or ModelCache(cfg.model)
    found = []
    for strategy in only:
        if refused(cfg, strategy):
            continue
        spec = strategies.get(strategy).spec
        sizes = splits(hardware, strategy, cache) if search_splits else (cfg.train.sequence_parallel,)
        for split, offload, activations, checkpointing in itertools.product(
            sizes, spec.offload_modes, (False, True), (True, False)
        ):
            if activations and not checkpointing:
                continue  # every layer's saved tensors through PCIe, and as much host RAM: checkpointing wins
            for micro in MICRO_BATCHES:
                train = dataclasses.replace(
                    cfg.train,
                    micro_batch_size=micro,
                    gradient_checkpointing=checkpointing,
                    offload=offload,
                    activation_offload=activations,
                    sequence_parallel=split,
                )
                result = predict(dataclasses.replace(cfg, strategy=strategy, train=train), hardware, cache=cache)
                peak = max(r.total_bytes for r in result.ranks)
                speed = estimated_tokens_per_s(result)
                found.append(
                    Candidate(strategy, micro, checkpointing, offload, activations, result, peak, speed, split)
                )
                if fits and not fits(found[-1]):
                    break
    return found


def longest_context(
    cfg: RunConfig,
    hardware: Hardware,
    limit: int,
    host_limit: int | None,
    step: int = 1024,
    ceiling: int = 2**21,
    search_splits: bool = True,
    progress: Callable[[str, tuple[int, Candidate] | None], None] = lambda strategy, result: None,
) -> dict[str, tuple[int, Candidate] | None]:
    """Per strategy, the longest sequence (a multiple of `step`, at most `ceiling`) at which a configuration
    fits, with the fastest that does; memory only grows with the sequence, so doubling then bisecting finds it.
    `progress` hears of each strategy as it is done (a 70B on 8 ranks takes minutes)."""
    cache = ModelCache(cfg.model)

    def fastest_at(strategy: str, seq: int) -> Candidate | None:
        run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=seq))
        found = candidates(run, hardware, cache, (strategy,), search_splits, lambda c: c.fits(limit, host_limit))
        fitting = [c for c in found if c.fits(limit, host_limit)]
        return min(fitting, key=ranking_key, default=None)

    found = {}
    for strategy in strategies.NAMES:
        if refused(cfg, strategy):
            continue
        best = fastest_at(strategy, step)
        if best is None:
            found[strategy] = None
            progress(strategy, None)
            continue
        low, high = step, None
        while high is None and low < ceiling:
            doubled = min(2 * low, ceiling)
            trial = fastest_at(strategy, doubled)
            if trial is None:
                high = doubled
            else:
                low, best = doubled, trial
        while high is not None and high - low > step:
            middle = (low + high) // 2 // step * step
            trial = fastest_at(strategy, middle)
            if trial is None:
                high = middle
            else:
                low, best = middle, trial
        found[strategy] = (low, best)
        progress(strategy, found[strategy])
    return found
