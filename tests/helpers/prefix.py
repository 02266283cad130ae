"""Writers whose blocks carry sequence numbers: what a prefix of their log leaves."""

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Write:
    """One logged write of `count` blocks from `block` on, numbered `seq` across images."""

    image: int
    seq: int
    block: int
    count: int
    issued: int  # time.monotonic_ns() just before pwrite
    returned: int  # time.monotonic_ns() just after it


def last_writes(log: Iterable[Write], cut: int, nblocks: int) -> list[int]:
    """Per block, the sequence number of the last write up to `cut` (the log is in its one
    writer's order) that covers it; -1 where none did."""
    last = [-1] * nblocks
    for w in log:
        if w.seq > cut:
            break
        for k in range(w.block, w.block + w.count):
            last[k] = w.seq
    return last
