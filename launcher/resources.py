"""The configs shipped beside the code (accelerate_configs/, ds_configs/), in a checkout or an installed wheel."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALLED_SHARE = Path(sys.prefix) / "share" / "qlora-launcher"


def shipped_dir(name: str) -> Path:
    """`accelerate_configs` or `ds_configs`, from the checkout or from an installed wheel."""
    for root in (REPO_ROOT, INSTALLED_SHARE):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"Cannot find the shipped `{name}/` folder (looked in {REPO_ROOT} and {INSTALLED_SHARE}).")
