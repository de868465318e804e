"""The training run, top to bottom: config -> validate -> load & prepare -> shard -> train -> export & report."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from peft import PeftConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import preflight, quiet, signals
from .checkpoint import export, store
from .collectives import is_source_rank
from .config import CheckpointConfig, RunConfig, TrainConfig, dump_config
from .data.batches import GlobalBatches, Rows
from .data.loading import load_training_data
from .memory.components import parameter_components
from .memory.measure import MemoryMeter
from .model.build import build_model, coverage_notes, load_base
from .model.loss import own_loss_note
from .objectives import ModelCalls, Objective
from .objectives import get as get_objective
from .run import failures, sequence_parallel, tracking
from .run.accelerator import create_accelerator, world_size_from_env
from .run.activation_offload import ActivationOffload
from .run.evaluate import add_sums, evaluate, reduce_sums
from .run.metrics import MetricsLog
from .run.packed_check import PackedWeightCheck
from .run.preemption import StopSignal
from .run.sequence_parallel import SequenceGroups, local_tokens
from .run.summary import RunSummary, print_summary, rank_report
from .strategies.param_groups import parameter_groups

CHECK_TOKENS = 32


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


def startup_mark(stage: str) -> None:
    """With $QLAUNCH_TIMING set (bench/startup.py), the source rank appends when each start-up stage ended."""
    path = os.environ.get("QLAUNCH_TIMING")
    if path and is_source_rank():
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "unix_time": time.time()}) + "\n")


@dataclass
class Training:
    """What the loop works on: built once by `setup`, read by every step and by `finish`."""

    cfg: RunConfig
    """The run's resolved config (setup.cfg)."""
    setup: preflight.RunSetup
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    """What the strategy steps (DeepSpeed's wrapper under ZeRO); base_optimizer is the torch AdamW inside."""
    base_optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: PreTrainedTokenizerBase
    rows: Rows
    eval_rows: Rows | None
    batches: GlobalBatches
    groups: SequenceGroups
    total_steps: int
    start_step: int
    meter: MemoryMeter
    packed_check: PackedWeightCheck | None
    adapter_total: int
    peft_config: PeftConfig
    objective: Objective
    calls: ModelCalls

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass(frozen=True)
class StepActions:
    """What the loop does once optimizer step `done` (1-based) is complete."""

    log: bool
    evaluate: bool
    checkpoint: bool
    """Due by the schedule or the end; a stop every rank agreed on saves too."""
    poll_stop: bool
    """Ask whether every rank got a stop signal (not after the last step: it saves and ends anyway)."""


def after_step(done: int, total: int, train: TrainConfig, checkpoint: CheckpointConfig, has_eval: bool) -> StepActions:
    last = done == total
    evaluate = has_eval and (last or (train.eval_every_steps > 0 and done % train.eval_every_steps == 0))
    return StepActions(
        log=last or evaluate or done % train.log_interval == 0,
        evaluate=evaluate,
        checkpoint=last or (checkpoint.every_steps > 0 and done % checkpoint.every_steps == 0),
        poll_stop=not last,
    )


@dataclass
class LoopResult:
    losses: list[float]
    tokens: int
    seconds: float
    eval_loss: float | None
    packed: dict | None
    """The packed-weight digests of the first forward (train.check_4bit_weights)."""


def run(cfg: RunConfig) -> RunSummary:
    # SIGUSR2 and SIGTERM only set a flag: the run stops where every rank agrees (run/preemption.py).
    with StopSignal(cfg.dist.preempt_exit_code) as stop:
        training = setup(cfg, stop)
        result = train_loop(training, stop)
        return finish(training, result)


def setup(user_cfg: RunConfig, stop: StopSignal) -> Training:
    """Validate, tokenize, load, prepare, shard and resume: everything before the first step."""
    # Validate and resolve everything, and tokenize, before any process group exists.
    resolved = preflight.resolve_run(user_cfg, world_size_from_env())
    cfg, policy, split = resolved.cfg, resolved.policy, resolved.cfg.train.sequence_parallel
    data_world = resolved.world // split  # the ranks of a sequence group train on the same rows
    objective = get_objective(cfg)
    tokenizer, rows, eval_rows = load_training_data(cfg.model, cfg.data, cfg.train, resolved.world)
    t = cfg.train
    batches = GlobalBatches(len(rows), t.micro_batch_size, t.grad_accum_steps, data_world, t.seed)
    total_steps = t.max_steps or t.epochs * batches.steps_per_epoch

    # Load: only the source rank reads the quantized base (from the cache, or quantizing the checkpoint).
    startup_mark("load_start")
    base = load_base(cfg.model, cfg.quant, policy, cfg.lora)
    startup_mark("load_end")

    output_dir = Path(cfg.output_dir)
    accelerator = create_accelerator(resolved.strategy, t, cfg.dist, output_dir)
    stop.stop_before_training(accelerator.device)  # a signal during start-up: every rank ends here, nothing to save
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "run_config.yaml")
    quiet.to_rank_log(failures.rank_log(output_dir, accelerator.process_index))  # past the checks on output_dir
    tracking.start(accelerator, cfg)
    groups = sequence_parallel.new_groups(split)

    # Prepare: k-bit preparation and LoRA (the other ranks build a meta skeleton first).
    notes = [preflight.compute_note(user_cfg, cfg), own_loss_note(base, t)]
    model = build_model(base, cfg.quant, cfg.lora, t, policy, local_tokens(cfg.data.max_seq_len, split))
    if split > 1:
        sequence_parallel.install(model, groups)
    if accelerator.is_main_process:
        for note in [*notes, *coverage_notes(model, cfg.lora)]:
            if note:
                print(f"qlaunch: {note}", flush=True)

    # Shard: every rank ends with its own shard of the source rank's weights.
    def make_optimizer(m):
        return torch.optim.AdamW(parameter_groups(m, t.lr, t.loraplus_lr_ratio), lr=t.lr, weight_decay=t.weight_decay)

    adapter_total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    components = parameter_components(model)
    packed_check = PackedWeightCheck(model) if t.check_4bit_weights else None
    startup_mark("shard_start")
    model, optimizer, base_optimizer = resolved.sharder.shard(model, make_optimizer, accelerator)
    startup_mark("shard_end")
    if packed_check:
        packed_check.watch(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_lambda(t, total_steps))
    offload = ActivationOffload(accelerator.device) if t.activation_offload else None
    if offload:
        offload.install(model)
    meter = MemoryMeter(
        cfg, model, base_optimizer, resolved.sharder, output_dir, accelerator.device, components, offload
    )

    # What the objective computes once (DPO's precomputed reference) sees the adapter as it starts: before a resume.
    peft_model = accelerator.unwrap_model(model)
    calls = ModelCalls(model, peft_model)
    splits = [r for r in (rows, eval_rows) if r is not None]
    objective.prepare(calls, accelerator, splits, tokenizer.pad_token_id, groups)
    torch.manual_seed(t.seed + accelerator.process_index)  # dropout masks differ across ranks, reproducibly
    start_step = 0
    if resolved.resume_from is not None:
        start_step = store.load(resolved.resume_from, resolved.sharder, model, optimizer, scheduler)
        if accelerator.is_main_process:
            print(f"Resuming from step {start_step}: {resolved.resume_from}", flush=True)
    return Training(
        cfg=cfg,
        setup=resolved,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        base_optimizer=base_optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        rows=rows,
        eval_rows=eval_rows,
        batches=batches,
        groups=groups,
        total_steps=total_steps,
        start_step=start_step,
        meter=meter,
        packed_check=packed_check,
        adapter_total=adapter_total,
        peft_config=peft_model.peft_config[export.ADAPTER_NAME],
        objective=objective,
        calls=calls,
    )


def train_loop(t: Training, stop: StopSignal) -> LoopResult:
    """The optimizer steps from `t.start_step` on; logs, evaluates and checkpoints as `after_step` says."""
    device, cfg = t.accelerator.device, t.cfg
    stop.stop_before_training(device)
    if t.main:  # a start-up longer than Slurm's warning lead never trains: the log shows it coming
        print(
            f"qlaunch: start-up took {signals.seconds_since_start():.0f} s (this rank's start to training)", flush=True
        )
    t.model.train()
    metrics = MetricsLog(
        t.output_dir,
        t.total_steps,
        enabled=t.main,
        first_step=t.start_step,
        on_record=lambda r: tracking.log_step(t.accelerator, r),
    )
    result = LoopResult(losses=[], tokens=0, seconds=0.0, eval_loss=None, packed=None)
    started = window_start = time.perf_counter()
    window_tokens = 0
    for step in range(t.start_step, t.total_steps):
        loss_sum, sums, totals, step_tokens, grad_norm = train_step(t, step)
        t.scheduler.step()
        if t.packed_check and step == t.start_step:
            result.packed = t.packed_check.result()
        window_tokens += step_tokens
        result.tokens += step_tokens
        metrics.advance()
        actions = after_step(step + 1, t.total_steps, cfg.train, cfg.checkpoint, t.eval_rows is not None)
        if actions.log:
            # Each micro batch's loss is its share of the step's (see train_step): their sum over ranks and micro
            # batches, over the parts, is the step's loss.
            loss_total, step_sums = reduce_sums(t.accelerator, loss_sum, sums)
            loss = loss_total / step_parts(t)
            result.losses.append(loss)
            extra = t.objective.metrics(step_sums, totals)
            if actions.evaluate:
                evaluated = evaluate(
                    t.objective,
                    t.calls,
                    t.accelerator,
                    t.eval_rows,
                    cfg.train.micro_batch_size,
                    t.tokenizer.pad_token_id,
                    t.groups,
                )
                result.eval_loss = evaluated["eval_loss"]
                extra.update(evaluated)
            now = time.perf_counter()
            metrics.log(
                step=step + 1,
                loss=loss,
                lr=t.scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                tokens=window_tokens,
                tokens_per_s=window_tokens / (now - window_start),
                **extra,
            )
            window_tokens, window_start = 0, now
        preempted = actions.poll_stop and stop.agreed(device)  # one all-reduce: all ranks stop here
        if actions.checkpoint or preempted:
            store.save(cfg, step + 1, t.setup.world, t.setup.sharder, t.model, t.optimizer, t.scheduler, t.peft_config)
        if preempted:
            stop.exit(step + 1)  # exits with cfg.dist.preempt_exit_code
    result.seconds = time.perf_counter() - started
    metrics.close()
    return result


def finish(t: Training, result: LoopResult) -> RunSummary:
    """The memory report of every rank, the adapter and its reload check, the summary."""
    t.meter.finish()
    world = t.setup.world
    report = [
        rank_report(
            t.model,
            t.optimizer,
            t.setup.sharder,
            t.setup.strategy.name,
            t.adapter_total,
            t.meter.peak_device_bytes(),
            result.packed,
        )
    ]
    if dist.is_initialized():
        mine, report = report[0], [None] * world
        dist.all_gather_object(report, mine)
    if t.main:
        (t.output_dir / "shard_report.json").write_text(json.dumps(report, indent=2))
        tracking.log_memory(t.accelerator, report, t.total_steps)
    unwrapped = t.accelerator.unwrap_model(t.model)
    full_trainable = t.setup.sharder.gather_trainable(unwrapped)
    check = {k: v.to(t.accelerator.device) for k, v in check_inputs(t.rows).items()}
    t.model.eval()
    with torch.no_grad():
        check_logits = t.model(**check).logits
    if t.main:
        export.save_adapter(unwrapped, full_trainable, t.output_dir)
        export.save_check(t.output_dir, check, check_logits)
    t.accelerator.wait_for_everyone()
    summary = RunSummary(
        steps=t.total_steps,
        first_loss=result.losses[0] if result.losses else float("nan"),
        last_loss=result.losses[-1] if result.losses else float("nan"),
        tokens_per_s=result.tokens / result.seconds,
        seconds=result.seconds,
        adapter_dir=str(t.output_dir / export.ADAPTER_DIR),
        world_size=world,
        strategy=t.setup.strategy.name,
        eval_loss=result.eval_loss,
    )
    if t.main:
        print_summary(summary, t.output_dir)
    t.accelerator.end_training()
    return summary


def check_inputs(rows: Rows) -> dict[str, torch.Tensor]:
    """What the end-of-run check feeds the model: the first sample's first CHECK_TOKENS ids, or, where it has
    images, the whole sample with its images (the reload must agree on the vision path too)."""
    ids = rows.data.sample(0)[0]
    images = rows.data.images(0) if rows.pixels is not None else []
    input_ids = torch.tensor([ids if images else ids[:CHECK_TOKENS]])
    return {"input_ids": input_ids, **(rows.pixels(images, input_ids) if images else {})}


def step_parts(t: Training) -> int:
    """What DP averaging (the world size) and accumulation (its step count) divide each micro batch's gradient by."""
    return t.groups.world * t.batches.accum


def train_step(t: Training, step: int):
    """One optimizer step over this rank's micro batches; returns the sum of their losses, their metric sums, the
    global batch's totals, the step's real tokens and the gradient norm. Each micro batch's loss is its sums divided by the totals of the whole
    global batch (target tokens, pairs) over `step_parts`, so the summed gradient equals a single process's on the
    same batch."""
    step_samples = t.batches.step_samples(step)
    step_tokens = t.rows.tokens(step_samples)
    # The ranks of a sequence group hold disjoint tokens of the same rows, so every target is still counted once.
    totals = t.objective.totals(t.rows, step_samples)
    share = {name: total / step_parts(t) for name, total in totals.items()}
    device, pad_id = t.accelerator.device, t.tokenizer.pad_token_id
    loss_sum, sums, grad_norm = torch.zeros((), device=device), {}, None
    micro_batches = t.batches.rank_micro_batches(step, t.groups.data_rank)
    t.objective.begin(t.calls, t.accelerator, t.rows, micro_batches, pad_id)  # KTO's KL term over the whole step
    for indices in micro_batches:
        rows_batch = {k: v.to(device) for k, v in t.objective.collate(t.rows, indices, pad_id).items()}
        with t.accelerator.accumulate(t.model), t.groups.splitting(rows_batch, pad_id) as batch:
            loss, micro_sums = t.objective.loss(t.calls, batch, share)
            t.accelerator.backward(loss)
            norm = t.setup.sharder.optimizer_step(t.accelerator, t.model, t.optimizer, t.cfg.train.max_grad_norm)
            grad_norm = norm if norm is not None else grad_norm
            t.optimizer.zero_grad()
        loss_sum += loss.detach().float()
        add_sums(sums, micro_sums)
    return loss_sum, sums, totals, step_tokens, grad_norm
