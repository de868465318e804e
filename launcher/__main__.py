"""`python -m launcher` and the `qlaunch` command."""

import sys

from . import signals
from .cli import main as cli_main


def main() -> int:
    if sys.argv[1:2] == ["train"]:
        # From the first moment to exit, in the wrapper and in every rank: a stop signal is recorded,
        # never fatal, and acted on where the run can stop cleanly (see signals.py).
        signals.listen()
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
