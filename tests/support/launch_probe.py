"""`qlaunch train` itself (launcher.cli), with tests/support/dist_probe.py as each rank's program.

python tests/support/launch_probe.py PROBE_DIR NPROC -- <train args>
"""

import functools
import sys
from pathlib import Path

from launcher import cli, launch

probe_dir, nproc, separator, *train_args = sys.argv[1:]
entry = (str(Path(__file__).with_name("dist_probe.py")), probe_dir, "--")
launch.launch = functools.partial(launch.launch, entry=entry)
sys.exit(cli.main(["train", "--nproc", nproc, *train_args]))
