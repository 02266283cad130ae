"""A target's backing chain, link by link, and why a link cannot be trusted.

A chain restores correctly only if every link does: a link whose record is not
`complete`, or that is missing, makes every link above it wrong. The walk
follows the qcow2 headers (what QEMU reads), not the records, and stops at a
missing link or a loop. Used before a job builds on a chain (preflight) and by
`cowfs info`, so that both judge a chain by the same rules.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import CowfsError
from .record import Record, read_record, verdict
from .target.qcow2 import backing_name


@dataclass(frozen=True)
class Link:
    path: Path
    record: Record | None
    problem: str | None
    """Why this link cannot be trusted (None: its record says complete)."""


def links(top: Path) -> Iterator[Link]:
    """`top`, then each backing file below it."""
    seen: set[tuple[int, int]] = set()
    path: Path | None = top
    while path is not None:
        try:
            st = os.stat(path)
        except OSError as e:
            yield Link(path, None, f"it is missing ({e.strerror})")
            return
        if (st.st_dev, st.st_ino) in seen:
            yield Link(path, None, "the chain loops there")
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            record: Record | None = read_record(path)
        except CowfsError:
            record = None
        yield Link(path, record, _problem(record))
        name = backing_name(path)
        path = None if name is None else path.parent / name


def _problem(record: Record | None) -> str | None:
    if record is None:
        return "it has no cowfs record"
    word = verdict(record)
    return None if word == "complete" else f"its record says {word}"
