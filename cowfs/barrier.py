"""The barrier: what fixes one point in time for several images under running writers.

Every mutating request (write, truncate) passes the gate; `hold()` closes it,
waits for the requests in flight to finish, and then lets its caller fix the
point in time of every image of a job at once before the gate opens again. So a
write that returned before the hold began is before the point in time, one that
arrives during it waits and lands after, and none straddles it. Across the
images of a group: if write A returned before write B was issued and B is in the
backup, A is in it too.

Writes the kernel still caches for the mount are sent first, by a syncfs while
the gate is still open. Without the writeback cache those are only stores
through a shared mmap, which no writer waited for. With it (`mount
--writeback-cache`) "returned" means "in the kernel's page cache": a buffered
write returns before the daemon sees it, and the kernel sends the cached pages
later, in any order. So then, before the gate closes, a fence: one fsync of each
image through the mount, from threads. The kernel sends an image's FUSE_FSYNC
only once every write it cached for the image has been served, and holds the
image's inode lock, so no new buffered write, until the reply. The replies wait
until the point in time is fixed; by then every write that returned before the
fence is in, and none that starts after it. The syncfs has sent the bulk of the
cache while writers still ran, so the fence holds them only for what they cached
meanwhile. (The fence costs buffered writers a few milliseconds, which is why a
mount without the cache goes without it.)

Guests wait only as long as that and the writes in flight take. The gate's hot
path costs two integer updates and no checkpoint.
"""

import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path

import trio

from .errors import CowfsError
from .libc import check, libc

FENCE_ATTEMPTS = 3
"""fsyncs of one image before the fence gives up: a failed writeback (a guest write that
copy-before-write refused) fails one fsync, and the next one finds the cache clean."""


class Fence:
    """The fsyncs of one hold: which threads open the images for it, how many have not
    reached the daemon yet, and the event their replies wait for."""

    def __init__(self, images: int) -> None:
        self.threads: set[int] = set()
        self.missing = images
        self.all_in = trio.Event()
        self.released = trio.Event()
        self.errors: list[str] = []

    def arrived(self) -> None:
        self.missing -= 1
        if not self.missing:
            self.all_in.set()

    async def reached(self) -> None:
        """Its fsync of an image reached the daemon: answer once the point in time is fixed."""
        self.arrived()
        await self.released.wait()


class Barrier:
    def __init__(self, mountpoint: Path, fence: bool) -> None:
        self.mountpoint = mountpoint
        self.fence = fence
        """Whether holds fence the kernel's writeback cache (the mount has it on)."""
        self.held_s = 0.0
        """How long the last hold kept new writes waiting (what guests felt)."""
        self._open = trio.Event()
        self._open.set()
        self._in_flight = 0
        self._drained = trio.Event()
        self._holding = trio.Lock()
        self._fence: Fence | None = None

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

    def fence_of(self, tid: int) -> Fence | None:
        """The fence an open through the mount is for, if it comes from a fence thread (by
        its thread id, which the kernel passes as the request's pid)."""
        fence = self._fence
        return fence if fence is not None and tid in fence.threads else None

    @asynccontextmanager
    async def hold(self, images: Sequence[str]) -> AsyncIterator[None]:
        """No mutating request of `images` runs inside, and none the kernel caches: fix
        the point in time here, without awaiting."""
        async with self._holding:
            await trio.to_thread.run_sync(_flush_kernel_cache, self.mountpoint)
            start = time.perf_counter()
            try:
                async with self._fenced(images) if self.fence else nullcontext():
                    self._open = trio.Event()
                    try:
                        while self._in_flight:
                            self._drained = trio.Event()
                            await self._drained.wait()
                        yield
                    finally:
                        self._open.set()
            finally:
                self.held_s = time.perf_counter() - start

    @asynccontextmanager
    async def _fenced(self, images: Sequence[str]) -> AsyncIterator[None]:
        fence = self._fence = Fence(len(images))
        limiter = trio.CapacityLimiter(max(1, len(images)))  # all at once, or they deadlock
        try:
            async with trio.open_nursery() as nursery:
                for name in images:
                    nursery.start_soon(self._fence_one, fence, self.mountpoint / name, limiter)
                try:
                    await fence.all_in.wait()
                    if fence.errors:
                        raise CowfsError("; ".join(fence.errors))
                    yield
                finally:
                    fence.released.set()
        finally:
            self._fence = None

    async def _fence_one(self, fence: Fence, path: Path, limiter: trio.CapacityLimiter) -> None:
        error = await trio.to_thread.run_sync(_fsync_through, fence, path, limiter=limiter)
        if error is not None:  # its fsync never reached the daemon
            fence.errors.append(error)
            fence.arrived()


def _fsync_through(fence: Fence, path: Path) -> str | None:
    """fsync of `path` through the mount (a fence thread); the reason if it never got
    through."""
    fence.threads.add(threading.get_native_id())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {path} to flush the kernel's cache: {e.strerror}"
    try:
        for _ in range(FENCE_ATTEMPTS):
            try:
                os.fsync(fd)
                return None
            except OSError as e:
                if e.errno != errno.EIO:
                    return f"cannot flush the kernel's cache of {path}: {e.strerror}"
        return f"cannot flush the kernel's cache of {path}: writes keep failing"
    finally:
        os.close(fd)
        fence.threads.discard(threading.get_native_id())


def _flush_kernel_cache(mountpoint: Path) -> None:
    """syncfs(2) on the mount: the kernel sends what it caches as writes, served by the
    loop (the gate is open) while this thread waits."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        check(libc.syncfs(fd), f"syncfs of {mountpoint}")
    finally:
        os.close(fd)
