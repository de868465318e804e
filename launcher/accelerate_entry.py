"""`accelerate launch` as `qlaunch train` runs it: Accelerate's own command, with torchrun's report of a
failed rank kept off the terminal.

The failed rank's one line reaches the terminal through the wrapper (launcher/run/failures.py); torchrun
would add a ChildFailedError traceback and error log lines that say only that a rank failed. A failure
before any rank ran (a port in use, a rendezvous that timed out) is one line too, and the wrapper says
what it means. `--debug` (QLAUNCH_DEBUG=1) keeps the tracebacks.
"""

from __future__ import annotations

import logging
import sys

from . import quiet
from .run.failures import debugging


def main(argv: list[str] | None = None) -> int:
    import torch.distributed.run  # noqa: F401  (creates torchrun's loggers, quieted below)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    if debugging():
        launch_command(args)
        return 0
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError:
        return 1
    except Exception as error:  # before any rank ran: a taken port, a rendezvous that timed out
        text = str(error).strip().splitlines()
        print(f"qlaunch: accelerate launch failed: {type(error).__name__}: {text[0] if text else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    quiet.install()  # torchrun's banner, and what accelerate's imports announce
    sys.exit(main())
