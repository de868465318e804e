"""Byte counts for people: parsing `24GiB` and printing `1.50 GiB`."""

from __future__ import annotations

import re

from ..config import ConfigError

GiB = 1 << 30
BINARY_UNITS = (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10))
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


def parse_bytes(text: str, what: str, minimum: int = 0) -> int:
    """'24GiB', '80GB', '1.5 GiB' or '512MiB'; a number without a unit is refused (is 24 bytes or
    24 GiB meant?), except 0. A size under `minimum` bytes is refused too."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS:
        raise ConfigError(
            f"{what} `{text}` is not a size. Write a number with a unit, e.g. 24GiB, 80GB or 40960MiB "
            "(GiB = 2^30 bytes, GB = 10^9 bytes)."
        )
    number = float(match.group(1))
    if not unit and number != 0:
        raise ConfigError(
            f"{what} `{text}` has no unit: write {match.group(1)}GiB (or GB, MiB, B). A bare number is refused "
            "rather than read as bytes."
        )
    size = int(number * SIZE_UNITS[unit])
    if size < minimum:
        raise ConfigError(f"{what} `{text}` is {format_bytes(size)}; it must be at least {format_bytes(minimum)}.")
    return size


def format_bytes(n: int) -> str:
    for unit, size in BINARY_UNITS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
