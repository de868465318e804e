"""`python -m launcher` and the `qlaunch` command."""

import sys

from . import signals

TRAINING = sys.argv[1:2] == ["train"]
if TRAINING:
    # From the first moment to exit, in the wrapper and in every rank: a stop signal is recorded, never
    # fatal, and acted on where the run can stop cleanly (see signals.py). Installed before the heavy imports.
    signals.listen()

from . import quiet  # noqa: E402

# Before the heavy imports too: bitsandbytes and DeepSpeed announce themselves as they are imported.
quiet.install()

from .cli import main as cli_main  # noqa: E402


def main() -> int:
    try:
        code = cli_main()
    finally:
        if TRAINING:
            signals.ignore_until_exit()
    if TRAINING:
        from .launch.machines import inside_launcher
        from .run.failures import exit_rank

        if inside_launcher():
            exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
