"""Parsing and printing sizes and rates the way QEMU and coreutils users write them."""

import re

from .errors import CowfsError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'64K', '1M', '4096', '2GiB' -> bytes (binary units). Whole numbers only."""
    m = _SIZE_RE.match(text)
    if not m:
        raise CowfsError(f"bad {what} {text!r}: expected a whole number with an optional K/M/G/T")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def parse_seconds(text: str, what: str) -> float:
    """'2', '0.5' -> seconds; negative, infinite or non-numeric input is refused."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise CowfsError(f"bad {what} {text!r}: expected a number of seconds, 0 or more")
    return value


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
