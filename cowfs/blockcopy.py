"""Block copy: the done map, one copy per cluster, and copying clusters into the target.

Shared by copy-before-write and the copier, as QEMU's block-copy is: whoever claims
a cluster first copies it, anyone else who needs it waits for that copy; a cluster
is marked done only after its old content is in the target, and then never copied
again. Knows nothing of job states, sync modes or error policies: a failed copy
raises OSError after giving its claims back, and the job decides what it means.
"""

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from bitarray import bitarray

from .locks import ClusterClaims
from .ratelimit import RateLimiter
from .sums import Checksums, Recording, Writer
from .target import Target
from .transfer import copy_range

T = TypeVar("T")

BATCH_BYTES = 1 << 20
"""Largest single copy: big enough to amortise a thread hop, small enough that a guest
write waiting on a cluster in it waits about a millisecond."""


class BlockCopy:
    def __init__(
        self, source_fd: int, target: Target, cluster_size: int, speed: int, inline: bool
    ) -> None:
        """`inline`: copy-before-write may copy in the loop when the old data is cached
        (not with --cbw-timeout: only a copy in a thread can be given up on)."""
        self.source_fd = source_fd
        self.target = target
        self.cluster_size = cluster_size
        self.inline = inline
        self.batch_clusters = max(1, BATCH_BYTES // cluster_size)
        self.batch_bytes = self.batch_clusters * cluster_size
        self.size = 0
        """The source's size at the point in time."""
        self.done = bitarray()
        self.sums = Checksums(0, cluster_size)
        """What each cluster put in the target reads as (sums.py), recorded as it is written
        (for targets that keep a checksum file: a repository names chunks by their hash)."""
        self.writer: Writer = target
        self.claims = ClusterClaims()
        self.limiter = RateLimiter(speed)
        self.bytes_copier = 0
        self.bytes_cbw = 0
        self.bytes_written = 0
        """Bytes that reached the target (all-zero clusters are skipped)."""
        self._cbw_buf = bytearray(self.batch_bytes)
        self._io_limiter = trio.CapacityLimiter(2)
        self._threads = 0
        """Worker threads using the target that have not returned."""
        self._when_quiet: list[Callable[[], object]] = []

    def reset(self, size: int, done: bitarray) -> None:
        """At the point in time: `done` holds the clusters that need no copy."""
        self.size = size
        self.done = done
        self.sums = Checksums(size, self.cluster_size)
        if self.target.checksummed:
            self.writer = Recording(self.target, self.sums)

    def extent(self, first: int, count: int) -> tuple[int, int]:
        """Byte offset and length of clusters first..first+count-1 (the last may be partial)."""
        offset = first * self.cluster_size
        return offset, min(count * self.cluster_size, self.size - offset)

    def bytes_of(self, clusters: bitarray) -> int:
        """Bytes of the set clusters, counting the last partial cluster as partial."""
        total = clusters.count() * self.cluster_size
        if clusters and clusters[-1]:
            total -= len(clusters) * self.cluster_size - self.size
        return total

    # -- copy-before-write ---------------------------------------------------

    async def protect(self, first: int, last: int, active: Callable[[], bool]) -> None:
        """Make clusters first..last done, window by window, while `active()`."""
        cluster = self.done.find(0, first, last + 1)
        while cluster >= 0 and active():
            window_end = min(last + 1, cluster + self.batch_clusters)
            await self._protect_window(cluster, window_end, active)
            cluster = self.done.find(0, window_end, last + 1)
            if cluster >= 0:
                await trio.lowlevel.checkpoint()  # a huge truncate must not hog the loop

    async def _protect_window(self, first: int, end: int, active: Callable[[], bool]) -> None:
        """Copy the clusters of first..end-1 nobody copies, wait for the rest."""
        while active():
            busy = None
            run_start = None
            for cluster in range(first, end + 1):
                if cluster < end and not self.done[cluster] and self.claims.claim(cluster):
                    if run_start is None:
                        run_start = cluster
                    continue
                if cluster < end and not self.done[cluster]:
                    busy = cluster
                if run_start is not None:
                    await self._cbw_copy(run_start, cluster - run_start)
                    run_start = None
                    if not active():
                        return
            if busy is None:
                return
            await self.claims.wait(busy)
            if self.done.find(0, first, end) < 0:
                return

    async def _cbw_copy(self, first: int, count: int) -> None:
        """Copy claimed clusters: inline when the source's old data is in the page cache
        (tens of microseconds, less than a thread hop), in a worker thread when it must
        come from disk, so that a cold read never stalls every other request."""
        offset, length = self.extent(first, count)
        written = None
        try:
            if self.inline:
                with contextlib.suppress(BlockingIOError):
                    written = copy_range(
                        self.source_fd,
                        self.writer,
                        offset,
                        length,
                        self.cluster_size,
                        self._cbw_buf,
                        nowait=True,
                    )
            if written is None:
                written = await self._copy_in_thread(
                    offset, length, bytearray(length), abandon_on_cancel=True
                )
        except BaseException:
            self.claims.release(first, count)
            raise
        self._done(first, count)
        self.bytes_cbw += length
        self.bytes_written += written

    # -- the copier's side ---------------------------------------------------

    async def copy_claimed(self, runs: list[tuple[int, int]], buf: bytearray) -> int:
        """Copy the runs of clusters the copier claimed, in one worker thread (`buf` holds
        the largest); returns bytes read. A run that fails ends the batch: the runs
        before it are done, it and the rest are given back, and its error raised."""
        try:
            copied, written, error = await self.in_thread(
                self._copy_runs, runs, buf, limiter=self._io_limiter
            )
        except BaseException:
            for first, count in runs:
                self.claims.release(first, count)
            raise
        length = 0
        for first, count in runs[:copied]:
            self._done(first, count)
            length += self.extent(first, count)[1]
        for first, count in runs[copied:]:
            self.claims.release(first, count)
        self.bytes_copier += length
        self.bytes_written += written
        if error is not None:
            raise error
        return length

    def _copy_runs(
        self, runs: list[tuple[int, int]], buf: bytearray
    ) -> tuple[int, int, OSError | None]:
        """Blocking: (runs copied, bytes written, the error that stopped it or None)."""
        written = 0
        for i, (first, count) in enumerate(runs):
            offset, length = self.extent(first, count)
            self.target.admit(length)  # a repository's spool: uploads that lag slow us
            try:
                written += copy_range(
                    self.source_fd, self.writer, offset, length, self.cluster_size, buf
                )
            except OSError as e:
                return i, written, e
        return len(runs), written, None

    def _done(self, first: int, count: int) -> None:
        """Marked done before the claims go: a waiter woken by the release sees it done."""
        self.done[first : first + count] = 1
        self.claims.release(first, count)

    async def _copy_in_thread(
        self, offset: int, length: int, buf: bytearray, **to_thread: Any
    ) -> int:
        return await self.in_thread(
            copy_range,
            self.source_fd,
            self.writer,
            offset,
            length,
            self.cluster_size,
            buf,
            **to_thread,
        )

    async def in_thread(self, fn: Callable[..., T], *args: Any, **to_thread: Any) -> T:
        """Every worker thread that uses the target (copies, a view's reads and frees)
        runs through here, so that `quiet` and `when_quiet` know when the last has
        returned: the thread itself says so, even one its caller gave up on
        (`abandon_on_cancel`, --cbw-timeout), which may still be writing. A call
        cancelled before its thread began (waiting for the limiter, or given up on
        before the thread was scheduled) never runs `fn`."""
        token = trio.lowlevel.current_trio_token()
        lock = threading.Lock()
        state = ["waiting"]  # -> "running" in the thread, or "dropped" by the caller

        def run() -> T:
            with lock:
                if state[0] == "dropped":
                    raise RuntimeError("given up on before its thread began")  # unread
                state[0] = "running"
            try:
                return fn(*args)
            finally:
                with contextlib.suppress(trio.RunFinishedError):  # the daemon is exiting:
                    token.run_sync_soon(self._returned)  # nobody is left to wait

        self._threads += 1
        try:
            return await trio.to_thread.run_sync(run, **to_thread)
        except BaseException:
            with lock:
                dropped = state[0] == "waiting"
                state[0] = "dropped" if dropped else state[0]
            if dropped:
                self._returned()
            raise

    def _returned(self) -> None:
        self._threads -= 1
        if not self._threads:
            actions, self._when_quiet = self._when_quiet, []
            for action in actions:
                action()

    async def quiet(self) -> None:
        """Return once no worker thread of this copy uses the target."""
        quiet = trio.Event()
        self.when_quiet(quiet.set)
        await quiet.wait()

    def when_quiet(self, action: Callable[[], object]) -> None:
        """Call `action` in the loop once no worker thread uses the target: now, or when
        the last returns (never, if one hangs for good: then the daemon's exit ends it)."""
        if self._threads:
            self._when_quiet.append(action)
        else:
            action()
