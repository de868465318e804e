"""Command line: `qlaunch train | demo | verify` (also `python -m launcher ...`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .config import ConfigError, describe_keys, load_config, parse_overrides

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
        "--nproc", type=int,
        help="processes (GPUs) to start; default: all GPUs, 1 without CUDA. Inside a Slurm allocation: per node, default its GPUs",
    )

    demo = commands.add_parser(
        "demo",
        help="train the embedded default: a small Llama built locally, 2 CPU ranks, FSDP2, no downloads",
    )
    demo.add_argument("--output-dir", help="where to write (default: a new outputs/demo-<time> folder)")
    demo.add_argument("--strategy", default="fsdp2", help="sharding strategy (default fsdp2)")
    demo.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")

    export = commands.add_parser("export", help="turn a training checkpoint into a PEFT adapter directory")
    export.add_argument("checkpoint", help="a checkpoints/step-NNNNNN directory, or a run's output directory (its latest checkpoint)")
    export.add_argument("--output", help="adapter directory to write (default: <run>/export-step-NNNNNN)")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    merge = commands.add_parser("merge", help="merge an adapter into a 16-bit copy of its base model")
    merge.add_argument("adapter", help="a PEFT adapter directory (e.g. <run>/adapter)")
    merge.add_argument("--output", required=True, help="where to save the merged model (must not exist)")
    merge.add_argument("--base", help="base model directory (default: the one recorded in the adapter)")
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])

    verify = commands.add_parser("verify", help="reload a run's adapter in one process and compare its logits with training's")
    verify.add_argument("output_dir")
    verify.add_argument("--tolerance", type=float, default=1e-2, help="max |logit difference| accepted (default 1e-2)")
    return parser


def cmd_train(args, extra: list[str]) -> int:
    from . import launch, preflight, strategies, train

    overrides = parse_overrides(extra)
    if args.strategy:
        overrides.append(("strategy", args.strategy))
    cfg = load_config(args.config, overrides)
    # Inside a Slurm allocation the machines come from it (launcher/slurm.py), else this machine alone.
    machines = None if launch.inside_launcher() else launch.plan(args.nproc)
    if machines is None or machines.num_processes == 1:
        train.run(cfg)
        return 0
    preflight.check_all(cfg)
    strategy = strategies.resolve(cfg)
    forwarded = (["--config", args.config] if args.config else []) + extra + ["--strategy", strategy.name]
    return launch.launch(strategy, machines, forwarded, cfg.dist)


def cmd_demo(args) -> int:
    from . import demo

    return demo.run_demo(args.output_dir, strategy=args.strategy, nproc=args.nproc, steps=args.steps)


def cmd_export(args) -> int:
    from .checkpoint import CHECKPOINTS, latest_complete, step_name
    from .export import export_checkpoint

    path = Path(args.checkpoint)
    if (path / CHECKPOINTS).is_dir():
        path = latest_complete(path / CHECKPOINTS)
        if path is None:
            raise ConfigError(f"`{args.checkpoint}` has no complete checkpoint to export.")
    if not (path / "meta.json").is_file():
        raise ConfigError(f"`{path}` is not a complete training checkpoint (no meta.json).")
    step = json.loads((path / "meta.json").read_text())["step"]
    output = Path(args.output) if args.output else path.parent.parent / f"export-{step_name(step)}"
    print(f"Exported step {step} to {export_checkpoint(path, output, overwrite=args.overwrite)}")
    return 0


def cmd_merge(args) -> int:
    from .export import merge_adapter

    print(f"Merged model saved to {merge_adapter(Path(args.adapter), Path(args.output), args.base, args.dtype)}")
    return 0


def cmd_verify(args) -> int:
    from .export import verify_adapter

    diff = verify_adapter(args.output_dir)
    ok = diff <= args.tolerance
    print(f"max |logit difference| = {diff:.3e} ({'OK' if ok else 'FAILED'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        handler = {"demo": cmd_demo, "export": cmd_export, "merge": cmd_merge, "verify": cmd_verify}[args.command]
        return handler(args)
    except ConfigError as error:
        # In a launched run every rank validates; each says so, since an error may be one rank's alone.
        where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ and "LOCAL_RANK" in os.environ else ""
        print(f"qlaunch: error{where}: {error}", file=sys.stderr)
        return 2
    except Exception:
        dist = sys.modules.get("torch.distributed")
        if "LOCAL_RANK" in os.environ and dist is not None and dist.is_available() and dist.is_initialized():
            # A launched rank failed (a timed-out collective, say): its peers wait for it to be gone, and
            # the libraries' exit handlers take seconds. End now, once the error is printed.
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise


if __name__ == "__main__":
    sys.exit(main())
