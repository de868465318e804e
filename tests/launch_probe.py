"""`qlaunch train`'s own launch path (launcher.launch.launch) with tests/dist_probe.py as each rank's program.

    python tests/launch_probe.py PROBE_DIR NPROC -- <train args>
"""

import sys
from pathlib import Path

from launcher import cli, launch, strategies
from launcher.config import load_config, parse_overrides

probe_dir, nproc, separator, *train_args = sys.argv[1:]
args, extra = cli.build_parser().parse_known_args(["train", *train_args])
cfg = load_config(args.config, parse_overrides(extra) + ([("strategy", args.strategy)] if args.strategy else []))
entry = [str(Path(__file__).with_name("dist_probe.py")), probe_dir, "--"]
sys.exit(launch.launch(strategies.resolve(cfg), int(nproc), train_args, cfg.dist, entry=entry))
