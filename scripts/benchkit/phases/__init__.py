"""The phases (a)-(m) of a repetition, as a table of functions, and the order they run in.

Each phase is one function `(bench, repetition, item) -> result` in `TABLE`, where item
is the block size (`--bs`) or dirty percentage (`--dirty`) of one step for the phases
in `OVER`, and None for the others, which run once per repetition. `repetition()` runs
the chosen phases in table order and files each result under its letter (and the
step's block size or "N%"): the keys of the JSON result and of the report's table.
Adding a phase is one function and one table entry here, and its rows in `report`.
"""

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from ..workspace import Bench
from . import backups, barrier, chain, repo, tracking, views, wall, writes

Phase = Callable[[Bench, int, Any], dict[str, Any]]

TABLE: dict[str, Phase] = {
    "a": writes.during_backup,
    "b": writes.idle,
    "c": backups.no_writer,
    "d": backups.memory,
    "e": backups.incremental,
    "f": backups.compressed,
    "g": barrier.barrier,
    "h": backups.incremental_on_mount,
    "i": views.view_read,
    "j": chain.checksummed_chain,
    "k": tracking.tracking_and_crash,
    "l": repo.repo_vs_qcow2,
    "m": wall.fuse_wall,
}
PHASES = "".join(TABLE)

OVER = {"a": "bs", "b": "bs", "e": "dirty", "g": "bs", "h": "dirty", "m": "bs"}
"""The phases that run one step per block size or per dirty percentage."""
TOGETHER = "ab"
"""Phases that run block size by block size, one after the other ((a) 64K, (b) 64K,
(a) 4K, ...): (b) compares its idle mount with (a)'s QEMU export of the same block size,
so the two are measured close together."""


def steps(a: argparse.Namespace) -> list[tuple[str, Any]]:
    """(phase, item) of one repetition, in the order they run."""
    chosen = [p for p in TABLE if p in a.phases]
    items = {"bs": a.bs, "dirty": a.dirty}
    out = [(p, bs) for bs in a.bs for p in TOGETHER if p in chosen]
    for p in chosen:
        if p in TOGETHER:
            continue
        out += [(p, x) for x in items[OVER[p]]] if p in OVER else [(p, None)]
    return out


def repetition(bench: Bench, rep: int) -> dict[str, Any]:
    """Every chosen phase of both sides once; each phase's wall time in r["phase_s"]."""
    r: dict[str, Any] = {}
    timed = phase_timer(r)
    for phase, item in steps(bench.a):
        with timed(phase):
            result = TABLE[phase](bench, rep, item)
            if item is None:
                r[phase] = result
            else:
                key = item if OVER[phase] == "bs" else f"{item:g}%"
                r.setdefault(phase, {})[key] = result
    return r


def phase_timer(r: dict[str, Any]) -> Callable[[str], AbstractContextManager[None]]:
    """`with timed(phase):` adds the block's wall time to r["phase_s"][phase]."""

    @contextmanager
    def timed(phase: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            spent = r.setdefault("phase_s", {})
            spent[phase] = round(spent.get(phase, 0) + time.monotonic() - t0, 1)

    return timed
