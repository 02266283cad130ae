"""The barrier: what fixes one point in time for several images under running writers.

Every mutating request (write, truncate) passes the gate; `hold()` closes it,
waits for the requests in flight to finish, and then lets its caller fix the
point in time of every image of a job at once before the gate opens again. So a
write that returned before the hold began is before the point in time, one that
arrives during it waits and lands after, and none straddles it. Across the
images of a group: if write A returned before write B was issued and B is in the
backup, A is in it too.
Guests wait only as long as the writes in flight take. The gate's hot path costs
two integer updates and no checkpoint. Writes the kernel still caches for the
mount (stores through a shared mmap) are flushed first, while the gate is still
open: they returned before the hold, so they belong before the point in time.
"""

import ctypes
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

_libc = ctypes.CDLL(None, use_errno=True)


class Barrier:
    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.held_s = 0.0
        """How long the last hold kept new writes waiting (what guests felt)."""
        self._open = trio.Event()
        self._open.set()
        self._in_flight = 0
        self._drained = trio.Event()
        self._holding = trio.Lock()

    async def enter(self) -> None:
        """Before a mutating request (waits while a hold is on); `leave()` after it, always.
        Not a context manager: this is every guest write's path, and a generator-based
        one costs microseconds."""
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1

    def leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._drained.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """No mutating request runs inside: fix the point in time here, without awaiting."""
        async with self._holding:
            await trio.to_thread.run_sync(_flush_kernel_cache, self.mountpoint)
            self._open = trio.Event()
            start = time.perf_counter()
            try:
                while self._in_flight:
                    self._drained = trio.Event()
                    await self._drained.wait()
                yield
            finally:
                self._open.set()
                self.held_s = time.perf_counter() - start


def _flush_kernel_cache(mountpoint: Path) -> None:
    """syncfs(2) on the mount: the kernel sends what it caches as writes, served by the
    loop (the gate is open) while this thread waits."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd):
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of {mountpoint}: {os.strerror(err)}")
    finally:
        os.close(fd)
