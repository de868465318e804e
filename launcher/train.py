"""The training run, top to bottom: config -> validate -> load & prepare -> shard -> train -> export & report."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import preflight, signals, strategies
from .checkpoint import export, store
from .collectives import is_source_rank
from .config import RunConfig, dump_config
from .data.batches import GlobalBatches, Rows
from .data.loading import load_training_data
from .memory.components import parameter_components
from .memory.measure import MemoryMeter
from .model.build import build_model, coverage_notes, load_base
from .run import sequence_parallel, tracking
from .run.accelerator import create_accelerator, world_size_from_env
from .run.activation_offload import ActivationOffload
from .run.evaluate import eval_loss
from .run.metrics import MetricsLog
from .run.packed_check import PackedWeightCheck
from .run.preemption import StopSignal
from .run.sequence_parallel import SequenceGroups, local_tokens

CHECK_TOKENS = 32


@dataclass
class RunSummary:
    steps: int
    first_loss: float
    last_loss: float
    tokens_per_s: float
    seconds: float
    adapter_dir: str
    world_size: int
    strategy: str
    eval_loss: float | None = None


def lr_lambda(train_cfg, total_steps: int):
    warmup, schedule = train_cfg.warmup_steps, train_cfg.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def rank_report(
    model, optimizer, setup: preflight.RunSetup, adapter_total: int, peak_device_bytes: int | None, packed: dict | None
) -> dict:
    """What this rank holds after sharding: adapter and optimizer-state elements, for the report."""
    shards = [s for s in setup.sharder.local_shards(model) if s.trainable]
    trainable_local = sum(min(s.local.numel(), s.full_numel - s.start) for s in shards)
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "strategy": setup.strategy.name,
        "adapter_elements_total": adapter_total,
        "adapter_elements_local": trainable_local,
        "optimizer_state_elements_local": strategies.optimizer_state_numel(optimizer),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # torch.cuda's own peak would cover only the time since the meter's last per-step reset.
        "peak_device_bytes": peak_device_bytes,
        "packed_weights_in_first_forward": packed,
    }


def startup_mark(stage: str) -> None:
    """With $QLAUNCH_TIMING set (bench/startup.py), the source rank appends when each start-up stage ended."""
    path = os.environ.get("QLAUNCH_TIMING")
    if path and is_source_rank():
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "unix_time": time.time()}) + "\n")


def run(cfg: RunConfig) -> RunSummary:
    # SIGUSR2 and SIGTERM only set a flag: the run stops where every rank agrees (run/preemption.py).
    with StopSignal(cfg.dist.preempt_exit_code) as stop:
        return _run(cfg, stop)


def _run(user_cfg: RunConfig, stop: StopSignal) -> RunSummary:
    # Validate and resolve everything, and tokenize, before any process group exists.
    setup = preflight.resolve_run(user_cfg, world_size_from_env())
    cfg, world, policy, sharder = setup.cfg, setup.world, setup.policy, setup.sharder
    split = cfg.train.sequence_parallel
    data_world = world // split  # the ranks of a sequence group train on the same rows
    tokenizer, rows, eval_rows = load_training_data(cfg, data_world)
    batches = GlobalBatches(
        len(rows), cfg.train.micro_batch_size, cfg.train.grad_accum_steps, data_world, cfg.train.seed
    )
    total_steps = cfg.train.max_steps or cfg.train.epochs * batches.steps_per_epoch

    # Load: only the source rank reads the quantized base (from the cache, or quantizing the checkpoint).
    startup_mark("load_start")
    base = load_base(cfg.model, cfg.quant, policy)
    startup_mark("load_end")

    accelerator = create_accelerator(setup.strategy, cfg.train, cfg.dist, Path(cfg.output_dir))
    stop.stop_before_training(accelerator.device)  # a signal during start-up: every rank ends here, nothing to save
    rank, main = accelerator.process_index, accelerator.is_main_process
    output_dir = Path(cfg.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "run_config.yaml")
    tracking.start(accelerator, cfg)
    groups = sequence_parallel.new_groups(split)

    # Prepare: k-bit preparation and LoRA (the other ranks build a meta skeleton first).
    model = build_model(base, cfg.quant, cfg.lora, cfg.train, policy, local_tokens(cfg.data.max_seq_len, split))
    if split > 1:
        sequence_parallel.install(model, groups)
    if main:
        for note in [preflight.compute_note(user_cfg, cfg), *coverage_notes(model, cfg.lora)]:
            if note:
                print(f"qlaunch: {note}", flush=True)

    # Shard: every rank ends with its own shard of the source rank's weights.
    def make_optimizer(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    adapter_total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    components = parameter_components(model)
    packed_check = PackedWeightCheck(model) if cfg.train.check_4bit_weights else None
    startup_mark("shard_start")
    model, optimizer, base_optimizer = sharder.shard(model, make_optimizer, accelerator)
    startup_mark("shard_end")
    if packed_check:
        packed_check.watch(model)
    packed = None
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_lambda(cfg.train, total_steps))
    offload = ActivationOffload(accelerator.device) if cfg.train.activation_offload else None
    if offload:
        offload.install(model)
    meter = MemoryMeter(cfg, model, base_optimizer, sharder, output_dir, accelerator.device, components, offload)

    torch.manual_seed(cfg.train.seed + rank)  # dropout masks differ across ranks, reproducibly
    peft_config = accelerator.unwrap_model(model).peft_config[export.ADAPTER_NAME]
    start_step = 0
    if setup.resume_from is not None:
        start_step = store.load(setup.resume_from, sharder, model, optimizer, scheduler)
        if main:
            print(f"Resuming from step {start_step}: {setup.resume_from}", flush=True)

    # Train.
    stop.stop_before_training(accelerator.device)
    if main:  # a start-up longer than Slurm's warning lead never trains: the log shows it coming
        print(
            f"qlaunch: start-up took {signals.seconds_since_start():.0f} s (this rank's start to training)", flush=True
        )
    model.train()
    metrics = MetricsLog(
        output_dir,
        total_steps,
        enabled=main,
        first_step=start_step,
        on_record=lambda r: tracking.log_step(accelerator, r),
    )
    losses, started = [], time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    total_tokens, last_eval = 0, None
    for step in range(start_step, total_steps):
        loss_sum, step_targets, step_tokens, grad_norm = train_step(
            model, optimizer, accelerator, sharder, batches, rows, tokenizer, step, groups, cfg.train.max_grad_norm
        )
        scheduler.step()
        if packed_check and step == start_step:
            packed = packed_check.result()
        window_tokens += step_tokens
        total_tokens += step_tokens
        metrics.advance()
        last = step + 1 == total_steps
        every_eval = cfg.train.eval_every_steps
        evaluate = eval_rows is not None and (last or (every_eval > 0 and (step + 1) % every_eval == 0))
        if (step + 1) % cfg.train.log_interval == 0 or last or evaluate:
            loss = accelerator.reduce(loss_sum, "sum").item() / step_targets
            losses.append(loss)
            extra = {}
            if evaluate:
                last_eval = eval_loss(
                    model, accelerator, eval_rows, cfg.train.micro_batch_size, tokenizer.pad_token_id, groups
                )
                extra["eval_loss"] = last_eval
            now = time.perf_counter()
            metrics.log(
                step=step + 1,
                loss=loss,
                lr=scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                tokens=window_tokens,
                tokens_per_s=window_tokens / (now - window_start),
                **extra,
            )
            window_tokens, window_start = 0, now
        every = cfg.checkpoint.every_steps
        preempted = step + 1 < total_steps and stop.agreed(accelerator.device)  # one all-reduce: all ranks stop here
        if (every and (step + 1) % every == 0) or step + 1 == total_steps or preempted:
            store.save(cfg, step + 1, world, sharder, model, optimizer, scheduler, peft_config)
        if preempted:
            stop.exit(step + 1)  # exits with cfg.dist.preempt_exit_code
    seconds = time.perf_counter() - started
    metrics.close()

    # Export & report.
    meter.finish()
    report = [rank_report(model, optimizer, setup, adapter_total, meter.peak_device_bytes(), packed)]
    if dist.is_initialized():
        mine, report = report[0], [None] * world
        dist.all_gather_object(report, mine)
    if main:
        (output_dir / "shard_report.json").write_text(json.dumps(report, indent=2))
        tracking.log_memory(accelerator, report, total_steps)
    unwrapped = accelerator.unwrap_model(model)
    full_trainable = sharder.gather_trainable(unwrapped)
    check_ids = torch.tensor([rows.data.sample(0)[0][:CHECK_TOKENS]], device=accelerator.device)
    model.eval()
    with torch.no_grad():
        check_logits = model(input_ids=check_ids).logits
    adapter_dir = output_dir / export.ADAPTER_DIR
    if main:
        export.save_adapter(unwrapped, full_trainable, output_dir)
        export.save_check(output_dir, check_ids, check_logits)
    accelerator.wait_for_everyone()
    summary = RunSummary(
        steps=total_steps,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        tokens_per_s=total_tokens / seconds,
        seconds=seconds,
        adapter_dir=str(adapter_dir),
        world_size=world,
        strategy=setup.strategy.name,
        eval_loss=last_eval,
    )
    if main:
        print_summary(summary, output_dir)
    accelerator.end_training()
    return summary


def train_step(
    model,
    optimizer,
    accelerator,
    sharder: strategies.Strategy,
    batches: GlobalBatches,
    rows: Rows,
    tokenizer,
    step: int,
    groups: SequenceGroups,
    max_grad_norm: float,
):
    """One optimizer step over this rank's micro batches; returns the loss summed over target tokens,
    the step's target and real tokens, and the gradient norm. The loss is normalized by the target
    tokens of the whole global batch, so the summed gradient equals a single process's on the same batch."""
    step_samples = batches.step_samples(step)
    step_targets = rows.targets(step_samples)
    step_tokens = rows.tokens(step_samples)
    # DP averaging divides by the world size and accumulation by its step count: undo both here (the ranks of
    # a sequence group hold disjoint tokens of the same rows, so every target is still counted once).
    num_items = step_targets / (groups.world * batches.accum)
    loss_sum, grad_norm = torch.zeros((), device=accelerator.device), None
    for indices in batches.rank_micro_batches(step, groups.data_rank):
        rows_batch = {k: v.to(accelerator.device) for k, v in rows.collate(indices, tokenizer.pad_token_id).items()}
        with accelerator.accumulate(model), groups.splitting(rows_batch, tokenizer.pad_token_id) as batch:
            loss = model(**batch, num_items_in_batch=num_items, use_cache=False).loss
            accelerator.backward(loss)
            norm = sharder.optimizer_step(accelerator, model, optimizer, max_grad_norm)
            grad_norm = norm if norm is not None else grad_norm
            optimizer.zero_grad()
        loss_sum += loss.detach().float() * num_items
    return loss_sum, step_targets, step_tokens, grad_norm


def print_summary(s: RunSummary, output_dir: Path) -> None:
    print(
        f"\nDone: {s.steps} steps in {s.seconds:.1f} s on {s.world_size} rank(s) with {s.strategy}; "
        f"loss {s.first_loss:.4f} -> {s.last_loss:.4f}"
        + (f", eval loss {s.eval_loss:.4f}" if s.eval_loss is not None else "")
        + f"; {s.tokens_per_s:,.0f} tokens/s.\n"
        f"Adapter (PEFT format): {s.adapter_dir}\n"
        f"Metrics: {output_dir / 'metrics.jsonl'}   Check it reloads: qlaunch verify {output_dir}",
        flush=True,
    )
