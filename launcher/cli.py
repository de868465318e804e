"""Command line: `qlaunch train | data | demo | export | merge | verify | budget | plan` (also `python -m launcher ...`).

Each command imports what it needs when it runs, so that `qlaunch --help` and a wrong flag answer
without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, describe_keys, load_config, parse_overrides
from .objective_config import OBJECTIVES
from .quiet import VERBOSE_ENV

TRAIN_EPILOG = """\
Any run-config key can be set or overridden on the command line as --section.key VALUE
(VALUE is read as YAML), e.g. --train.lr 1e-4 --lora.r 8 --data.max_seq_len 1024.
Keys and defaults:
{keys}

Examples:
  qlaunch train --config run.yaml --strategy fsdp2 --nproc 2
  accelerate launch --config_file accelerate_configs/zero3.yaml -m launcher train --config run.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlaunch",
        description="Multi-GPU QLoRA: 4-bit base on every rank, LoRA adapters, sharded with FSDP2, FSDP1, ZeRO-2, ZeRO-3 or DDP.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_data, _add_demo, _add_export, _add_merge, _add_verify, _add_budget, _add_plan):
        add(commands)
    for command in commands.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help=f"also show other libraries' notices and deprecation warnings (or {VERBOSE_ENV}=1); the ranks "
            "write them to <output_dir>/logs/rank-NNNNN.log either way",
        )
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a LoRA adapter on a 4-bit base",
        description="Train a LoRA adapter. Outside `accelerate launch` this starts it for you with the shipped config "
        "for the strategy; inside, it is one rank of the run.",
        epilog=TRAIN_EPILOG.format(keys=describe_keys()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="run config YAML (see README); flags override it")
    train.add_argument("--strategy", help="fsdp2 (default), fsdp1, zero2, zero3 or ddp")
    train.add_argument(
        "--nproc",
        type=int,
        help="processes (GPUs) to start; default: all GPUs, 1 without CUDA. Inside a Slurm allocation: per node, default its GPUs",
    )
    train.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of a failure (always written to <output_dir>/logs/rank-NNNNN.log)",
    )


def _add_data(commands) -> None:
    data = commands.add_parser(
        "data",
        help="show what the data pipeline feeds the run: records, tokens, masking, padding, samples",
        description="Read and tokenize the run's dataset as training does, without training: records kept and "
        "dropped, tokens and target tokens, padding, and samples with the part the loss ignores in [[...]].",
    )
    data.add_argument("--config", help="run config YAML; --section.key VALUE flags override it, as for train")
    data.add_argument("--samples", type=int, default=3, help="samples to show (default 3)")
    data.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="train the embedded default: a small Llama built locally, 2 CPU ranks, FSDP2, no downloads",
    )
    demo.add_argument("--output-dir", help="where to write (default: a new outputs/demo-<time> folder)")
    demo.add_argument("--strategy", default="fsdp2", help="sharding strategy (default fsdp2)")
    demo.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="turn a training checkpoint into a PEFT adapter directory")
    export.add_argument(
        "checkpoint", help="a checkpoints/step-NNNNNN directory, or a run's output directory (its latest checkpoint)"
    )
    export.add_argument("--output", help="adapter directory to write (default: <run>/export-step-NNNNNN)")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _add_merge(commands) -> None:
    merge = commands.add_parser("merge", help="merge an adapter into a 16-bit copy of its base model")
    merge.add_argument("adapter", help="a PEFT adapter directory (e.g. <run>/adapter)")
    merge.add_argument("--output", required=True, help="where to save the merged model (must not exist)")
    merge.add_argument("--base", help="base model directory (default: the one recorded in the adapter)")
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def _add_verify(commands) -> None:
    verify = commands.add_parser(
        "verify", help="reload a run's adapter in one process and compare its logits with training's"
    )
    verify.add_argument("output_dir")
    verify.add_argument("--tolerance", type=float, default=1e-2, help="max |logit difference| accepted (default 1e-2)")


def _add_budget(commands) -> None:
    budget = commands.add_parser(
        "budget",
        help="predict each rank's memory from the config alone (no weights, no GPU)",
        description="Predict the memory each rank needs, per component, from the model's config alone: the model is "
        "built on the meta device with the same 4-bit replacement and LoRA as training, and split as the strategy splits it.",
        epilog=BUDGET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_budget_arguments(budget)
    budget.add_argument("--strategy", help="fsdp2 (default), fsdp1, zero2, zero3 or ddp")
    budget.add_argument("--micro-batch", type=int, help="sequences per micro batch (train.micro_batch_size)")
    budget.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    budget.add_argument(
        "--optimizer", default="adamw", help="the optimizer training runs: adamw (default, the only one)"
    )
    budget.add_argument(
        "--offload",
        nargs="?",
        const="optimizer",
        choices=["none", "optimizer", "params"],
        help="train.offload: what lives in host RAM. optimizer (alone: the same) = gradients, master copies and "
        "optimizer states (zero2, zero3); params = the 4-bit base and adapters too (fsdp2, zero3)",
    )
    budget.add_argument("--json", action="store_true", help="print JSON instead of the table")
    budget.add_argument("--plot", metavar="FILE.png", help="also draw stacked bars per rank (needs matplotlib)")


def _add_plan(commands) -> None:
    plan = commands.add_parser(
        "plan",
        help="list the configurations that fit your GPUs, fastest first, and the one to launch",
        description="Try every strategy x micro batch x checkpointing x offload mode it offers, keep those whose predicted memory fits "
        "with a safety margin, and rank them by an estimate of tokens per second.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_budget_arguments(plan)
    plan.add_argument("--margin", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    plan.add_argument(
        "--host-memory",
        help="host RAM per node with its unit, e.g. 256GiB: configurations whose offloaded state needs more do not fit",
    )
    plan.add_argument(
        "--longest-context",
        action="store_true",
        help="per strategy, the longest sequence (a multiple of 1,024 tokens) that fits, and its launch command",
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of the table")


BUDGET_EPILOG = """\
Examples:
  qlaunch budget --model /models/Llama-2-70b-hf --strategy fsdp2 --world-size 2 --seq-len 2048 --gpu-memory 80GiB
  qlaunch budget --config run.yaml --nodes 2 --gpus-per-node 8 --json
  qlaunch budget --model path/to/config.json --strategy zero3 --world-size 4 --plot budget.png
"""

PLAN_EPILOG = """\
Examples:
  qlaunch plan --model /models/Llama-2-70b-hf --gpu-memory 24GiB --world-size 2 --seq-len 2048
  qlaunch plan --config run.yaml --gpu-memory 80GiB --nodes 2 --gpus-per-node 8
"""


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `budget` and `plan`; each overrides the same key of the run config."""
    parser.add_argument("--config", help="run config YAML; the flags below override it")
    parser.add_argument(
        "--model", help="local model directory, its config.json, or a hub id already in the local cache"
    )
    parser.add_argument("--world-size", type=int, help="total number of GPUs (ranks)")
    parser.add_argument("--nodes", type=int, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (with --nodes, instead of --world-size)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (data.max_seq_len)")
    parser.add_argument(
        "--images",
        type=int,
        help="vision-language models: images in each sample (data.images_per_sample; their tokens count in --seq-len)",
    )
    parser.add_argument(
        "--image-size", type=int, help="with --images: the side of each square image in pixels (data.image_size)"
    )
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="train.objective: sft (default); dpo and orpo run two sequences (chosen, rejected) per sample; kto one, "
        "and forwards without gradient for the reference and the KL term",
    )
    parser.add_argument("--lora-r", type=int, help="LoRA rank (lora.r)")
    parser.add_argument("--lora-targets", help="comma-separated module names, or all-linear (lora.target_modules)")
    parser.add_argument(
        "--experts", choices=["4bit", "16bit"], help="MoE expert weights in 4-bit (default) or 16-bit (quant.experts)"
    )
    parser.add_argument(
        "--activation-offload",
        action="store_true",
        default=None,
        help="what forward saves for backward kept in host RAM (train.activation_offload)",
    )
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        help="ranks each sequence is split across (train.sequence_parallel); plan searches 1, 2, 4, ... without it",
    )
    parser.add_argument(
        "--loss-chunk",
        type=int,
        help="tokens per chunk of the loss (train.loss_chunk_tokens, default 1024); 0: all logits at once",
    )
    parser.add_argument(
        "--gpu-memory",
        help="memory per GPU with its unit, e.g. 24GiB or 80GB (a bare number is refused; at least 1GiB); "
        "says whether the run fits",
    )
    parser.add_argument(
        "--runtime-overhead",
        help="allowance for the CUDA context, NCCL and allocator slack, with its unit (default 1GiB; 0 for none)",
    )


def cmd_train(args, extra: list[str]) -> int:
    from . import launch, preflight, train
    from .data.loading import load_training_data
    from .launch import starts
    from .run import failures
    from .run.metrics import bars_only_on_a_terminal
    from .run.preemption import PreemptionExit

    bars_only_on_a_terminal()
    if args.debug:
        os.environ[failures.DEBUG_ENV] = "1"  # the ranks and torchrun inherit it
    overrides = parse_overrides(extra)
    if args.strategy:
        overrides.append(("strategy", args.strategy))
    cfg = load_config(args.config, overrides)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"`--nproc` must be at least 1, got {args.nproc}.")
    # Inside a Slurm allocation the machines come from it (launcher/launch/slurm.py), else this machine alone.
    machines = None if launch.inside_launcher() else launch.machines_for(args.nproc)
    if machines is None or machines.num_processes == 1:
        try:
            with failures.reported(cfg.output_dir, cfg.dist.timeout_s):
                train.run(cfg)
        except PreemptionExit as stopped:
            if machines is None:  # a rank under accelerate launch: its qlaunch, if any, counts the starts
                return stopped.code
            return starts.status_after_stop(cfg.output_dir, 0, stopped.step is not None, stopped.code)
        if machines is not None:
            starts.progressed(cfg.output_dir, 0)
        return 0
    strategy = preflight.check_all(cfg, machines.num_processes)
    # Tokenized here, into the cache the ranks read: too little data is refused before any rank starts.
    load_training_data(cfg.model, cfg.data, cfg.train, machines.num_processes)
    forwarded = (["--config", args.config] if args.config else []) + extra + ["--strategy", strategy.name]
    return launch.launch(strategy, machines, forwarded, cfg.dist, output_dir=cfg.output_dir)


def cmd_data(args, extra: list[str]) -> int:
    from . import preflight
    from .data import report

    cfg = load_config(args.config, parse_overrides(extra))
    preflight.check_dataset(cfg.data, cfg.train.objective)
    report.run(cfg, args.samples, args.json)
    return 0


def cmd_demo(args) -> int:
    from . import demo

    return demo.run_demo(args.output_dir, strategy=args.strategy, nproc=args.nproc, steps=args.steps)


def cmd_export(args) -> int:
    from .checkpoint.export import export_checkpoint
    from .checkpoint.store import META, find_checkpoint, is_complete, read_meta, step_name

    path = find_checkpoint(Path(args.checkpoint))
    if path is None:
        raise ConfigError(f"`{args.checkpoint}` has no complete checkpoint to export.")
    if not is_complete(path):
        raise ConfigError(f"`{path}` is not a complete training checkpoint (no {META}).")
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"`{path}` has no adapter_config.json: it is damaged, or was not written by qlaunch.")
    step = read_meta(path)["step"]
    output = Path(args.output) if args.output else path.parent.parent / f"export-{step_name(step)}"
    print(f"Exported step {step} to {export_checkpoint(path, output, overwrite=args.overwrite)}")
    return 0


def cmd_merge(args) -> int:
    import json

    from .checkpoint.export import merge_adapter
    from .model.build import read_model_config

    config = Path(args.adapter) / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(
            f"`{args.adapter}` is not an adapter directory (no adapter_config.json). Pass a run's `adapter/` "
            "folder or a `qlaunch export` output."
        )
    read_model_config(args.base or json.loads(config.read_text())["base_model_name_or_path"], False)
    print(f"Merged model saved to {merge_adapter(Path(args.adapter), Path(args.output), args.base, args.dtype)}")
    return 0


def cmd_budget(args) -> int:
    from .memory.commands import budget_command

    return budget_command(args)


def cmd_plan(args) -> int:
    from .memory.commands import plan_command

    return plan_command(args)


def cmd_verify(args) -> int:
    from .checkpoint.export import ADAPTER_DIR, CHECK_FILE, verify_adapter

    missing = [n for n in ("run_config.yaml", ADAPTER_DIR, CHECK_FILE) if not (Path(args.output_dir) / n).exists()]
    if missing:
        raise ConfigError(
            f"`{args.output_dir}` is not the output directory of a finished run (it has no {', '.join(missing)}). "
            "Pass the output_dir a `qlaunch train` run completed in."
        )
    diff = verify_adapter(args.output_dir)
    ok = diff <= args.tolerance
    print(f"max |logit difference| = {diff:.3e} ({'OK' if ok else 'FAILED'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "data"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the ranks inherit it
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "data":
            return cmd_data(args, extra)
        handler = {
            "demo": cmd_demo,
            "export": cmd_export,
            "merge": cmd_merge,
            "verify": cmd_verify,
            "budget": cmd_budget,
            "plan": cmd_plan,
        }[args.command]
        return handler(args)
    except ConfigError as error:
        if "LOCAL_RANK" in os.environ:
            from .run.failures import report

            # Every rank validates; each says so (through the wrapper, once), since an error may be one rank's alone.
            report(str(error))
        else:
            print(f"qlaunch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
