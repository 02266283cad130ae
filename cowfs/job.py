"""The job: one backup of one source into one target.

Owns the point in time, the done bitmap, copy-before-write (CBW), the job's
state and its figures. The guarantee lives here: a cluster is marked done only
after its old content is in the target, no write reaches the source before its
clusters are done, and no cluster is copied twice. Knows nothing of FUSE, of
the CLI or of record files; the copier (copier.py) asks it to copy clusters.
"""

import contextlib
import enum
import errno
import logging
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import trio
from bitarray import bitarray
from bitarray.util import zeros

from .extents import data_clusters
from .locks import ClusterClaims
from .options import JobOptions, SyncMode
from .policy import Action, CbwPolicy, copier_action
from .ratelimit import RateLimiter
from .target import Target
from .transfer import copy_range

log = logging.getLogger(__name__)

BATCH_BYTES = 1 << 20
"""Largest single copy: big enough to amortise a thread hop, small enough that a guest
write waiting on a cluster in it waits about a millisecond."""


class JobState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETING = "completing"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = (JobState.COMPLETE, JobState.FAILED, JobState.CANCELLED)


class Job:
    """Copy-before-write plus the copier's bookkeeping for one source and one target."""

    def __init__(
        self,
        source_fd: int,
        source: str,
        target: Target,
        options: JobOptions,
        incremental: bitarray | None = None,
    ):
        """`incremental`: for sync incremental, the clusters to copy (a dirty bitmap at
        the point in time, one bit per cluster of this job)."""
        self.id = uuid.uuid4().hex
        """Names this job in its record and in the bitmap it anchors: the link a chain's
        next incremental must name as its backing."""
        self.barrier_s: float | None = None
        """How long the barrier that fixed the point in time held guest writes."""
        self.group: int | None = None
        self.peers: list[str] = []
        self.source_fd = source_fd
        self.incremental = incremental
        self.source = source
        self.target = target
        self.options = options
        self.cluster_size = options.cluster_size
        self.batch_clusters = max(1, BATCH_BYTES // self.cluster_size)
        self.batch_bytes = self.batch_clusters * self.cluster_size
        self.state = JobState.CREATED
        self.paused_reason: str | None = None
        self.last_error: str | None = None
        self._resumed = trio.Event()
        self.limiter = RateLimiter(options.speed)
        self.errors: list[str] = []
        self.claims = ClusterClaims()
        self.size = 0
        self.done = bitarray()
        self.selected = bitarray()
        self.point_in_time: datetime | None = None
        self.started_mono = 0.0
        self.finished_mono: float | None = None
        self.bytes_copier = 0
        self.bytes_cbw = 0
        self.bytes_written = 0
        self.copier_scope = trio.CancelScope()
        self.copier_done = trio.Event()
        self.copier_done_mono: float | None = None
        self.ended = trio.Event()
        self._cbw_buf = bytearray(self.batch_bytes)
        self._io_limiter = trio.CapacityLimiter(2)

    # -- the point in time -------------------------------------------------

    def start(self, at: datetime | None = None) -> None:
        """Fix the point in time. Must run before the first request is served.

        Which clusters the target needs follows from the sync mode; of those, the
        ones in holes of the source are done from the start (their old content is
        zero: the target is told so, which a fresh raw file already is). The copier
        copies the selected ones; copy-before-write saves the rest of the needed
        ones before they change (in `none` mode: all of them). `at`: the instant the
        barrier fixed for the whole group (now, by default). Over a backing file
        `top` needs the holes too, as zero clusters: a hole must not read through
        to whatever the backing held there.
        """
        self.size = os.fstat(self.source_fd).st_size
        data = data_clusters(self.source_fd, self.size, self.cluster_size)
        everything = ~zeros(len(data))
        match self.options.sync:
            case SyncMode.FULL:
                needed, self.selected = everything, everything
            case SyncMode.TOP:
                needed = everything if self.target.backing is not None else data
                self.selected = data.copy()
            case SyncMode.INCREMENTAL:
                assert self.incremental is not None, "incremental needs its bitmap"
                needed = self.incremental[: len(data)]
                needed.extend(zeros(len(data) - len(needed)))
                self.selected = needed
            case SyncMode.NONE:
                needed, self.selected = everything, zeros(len(data))
        for first, count in _runs(needed & ~data):
            self.target.write_zeroes(*self._extent(first, count))
        self.done = ~(needed & data)
        self.point_in_time = at or datetime.now(UTC)
        self.started_mono = time.monotonic()
        self.state = JobState.RUNNING
        log.info(
            "point in time fixed: %s, %d bytes, %d clusters of %d, sync %s",
            self.source,
            self.size,
            len(self.done),
            self.cluster_size,
            self.options.sync,
        )

    @property
    def copying(self) -> bool:
        """Whether the copier has work to do or wait for (paused counts: it resumes)."""
        return self.state in (JobState.RUNNING, JobState.PAUSED, JobState.COMPLETING)

    @property
    def protecting(self) -> bool:
        """Whether writes must still copy old data first (False once the job has ended)."""
        return self.state in (JobState.RUNNING, JobState.PAUSED)

    # -- pause and resume ----------------------------------------------------

    def pause(self, reason: str) -> None:
        """Hold the copier at its next batch; copy-before-write goes on ("user" or "error")."""
        if self.state is JobState.RUNNING:
            self.state = JobState.PAUSED
            self.paused_reason = reason
            self._resumed = trio.Event()
            log.warning("backup paused (%s)", reason if reason == "user" else self.last_error)

    def resume(self) -> None:
        if self.state is JobState.PAUSED:
            self.state = JobState.RUNNING
            self.paused_reason = None
            self._resumed.set()
            log.info("backup resumed")

    async def wait_unpaused(self) -> None:
        while self.state is JobState.PAUSED:
            await self._resumed.wait()

    def set_speed(self, speed: int) -> None:
        self.limiter.speed = speed
        log.info("copier speed set to %d bytes/s", speed)

    # -- copy-before-write ---------------------------------------------------

    async def copy_before_write(self, offset: int, length: int) -> None:
        """Return once every cluster of [offset, offset+length) below the point-in-time
        size holds its old content in the target (or the job has ended)."""
        end = min(offset + length, self.size)
        if offset >= end or not self.protecting:
            return
        first, last = offset // self.cluster_size, (end - 1) // self.cluster_size
        if self.done.find(0, first, last + 1) < 0:
            return  # the common case once the copier is through: nothing to copy
        if not self.options.cbw_timeout:
            await self._protect_range(first, last)
            return
        with trio.move_on_after(self.options.cbw_timeout) as scope:
            await self._protect_range(first, last)
        if scope.cancelled_caught:
            limit = self.options.cbw_timeout
            self.fail(f"copy-before-write at offset {offset} took over {limit} s")

    async def _protect_range(self, first: int, last: int) -> None:
        cluster = self.done.find(0, first, last + 1)
        while cluster >= 0 and self.protecting:
            window_end = min(last + 1, cluster + self.batch_clusters)
            await self._protect(cluster, window_end)
            cluster = self.done.find(0, window_end, last + 1)
            if cluster >= 0:
                await trio.lowlevel.checkpoint()  # a huge truncate must not hog the loop

    async def _protect(self, first: int, end: int) -> None:
        """Make clusters first..end-1 done: copy those nobody copies, wait for the rest."""
        while self.protecting:
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
                    if not self.protecting:
                        return
            if busy is None:
                return
            await self.claims.wait(busy)
            if self.done.find(0, first, end) < 0:
                return

    async def _cbw_copy(self, first: int, count: int) -> None:
        """Copy claimed clusters: inline when the source's old data is in the page cache
        (tens of microseconds, less than a thread hop), in a worker thread when it must
        come from disk, so that a cold read never stalls every other request. With
        --cbw-timeout always in a thread, so that a hung target can be given up on."""
        offset, length = self._extent(first, count)
        written = None
        try:
            if not self.options.cbw_timeout:
                with contextlib.suppress(BlockingIOError):
                    written = copy_range(
                        self.source_fd,
                        self.target,
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
        except OSError as e:
            reason = f"copy-before-write: {e.strerror}"
            if self.options.on_cbw_error is CbwPolicy.BREAK_GUEST_WRITE:
                log.error("%s; the guest write fails", reason)
                self.last_error = reason
                raise OSError(errno.EIO, reason) from e
            self.fail(reason)  # break-snapshot: the guest write proceeds
        else:
            self._mark_done(first, count)
            self.bytes_cbw += length
            self.bytes_written += written
        finally:
            self.claims.release(first, count)

    # -- the copier's side ---------------------------------------------------

    async def copy_claimed(self, first: int, count: int, buf: bytearray) -> int | None:
        """Copy clusters the copier claimed, in a worker thread; returns bytes read, or
        None if it failed and the error policy wants the clusters tried again."""
        offset, length = self._extent(first, count)
        try:
            written = await self._copy_in_thread(offset, length, buf, limiter=self._io_limiter)
        except OSError as e:
            self._copier_failed(e)
            return None
        finally:
            self.claims.release(first, count)
        self._mark_done(first, count)
        self.bytes_copier += length
        self.bytes_written += written
        return length

    async def _copy_in_thread(
        self, offset: int, length: int, buf: bytearray, **to_thread: Any
    ) -> int:
        return await trio.to_thread.run_sync(
            copy_range,
            self.source_fd,
            self.target,
            offset,
            length,
            self.cluster_size,
            buf,
            **to_thread,
        )

    def _copier_failed(self, error: OSError) -> None:
        reason = f"copier: {error.strerror}"
        self.last_error = reason
        action = copier_action(error, self.options.on_source_error, self.options.on_target_error)
        if action is Action.STOP and self.state is JobState.COMPLETING:
            self.fail(f"{reason} (after unmount nobody can resume a stopped job)")
        elif action is Action.STOP:
            self.pause("error")
        elif action is Action.RETRY:
            log.error("%s; retrying", reason)
        else:
            self.fail(reason)

    def _mark_done(self, first: int, count: int) -> None:
        self.done[first : first + count] = 1

    def _extent(self, first: int, count: int) -> tuple[int, int]:
        """Byte offset and length of clusters first..first+count-1 (the last may be partial)."""
        offset = first * self.cluster_size
        return offset, min(count * self.cluster_size, self.size - offset)

    def copier_finished(self) -> None:
        """The copier has stopped (all copied, or the job ended); rates stop counting."""
        self.copier_done_mono = time.monotonic()
        self.copier_done.set()

    # -- ending --------------------------------------------------------------

    def unmounted(self) -> None:
        """The mount is gone and the source quiet: nobody can resume a paused job now, so
        it goes on, and a stop policy fails it instead of pausing."""
        if self.state in (JobState.RUNNING, JobState.PAUSED):
            self.state = JobState.COMPLETING
            self._resumed.set()

    async def flush(self) -> bool:
        """Once the copier is through: check that every selected cluster is in the target
        and make the target durable. False if the job failed or had ended."""
        await self.copier_done.wait()
        if self.ended.is_set():
            return False
        missing = self.selected.count() - (self.selected & self.done).count()
        if missing:
            self.fail(f"{missing} clusters were never copied")
            return False
        try:
            await trio.to_thread.run_sync(self.target.fsync)
        except OSError as e:
            self.fail(f"fsync of the target: {e}")
            return False
        return True

    async def complete(self) -> None:
        """End a job of its own (no peers) on a quiet source: copy what is left, make the
        target durable, and only then say complete."""
        self.unmounted()
        if await self.flush():
            self.mark_complete()

    def mark_complete(self) -> None:
        """Only after `flush` (and, grouped, the peers' flushes) returned True."""
        if not self.ended.is_set():
            self._end(JobState.COMPLETE)

    def fail(self, reason: str) -> None:
        """End the job as failed; later writes go straight to the source."""
        log.error("backup failed: %s", reason)
        if self.state is JobState.COMPLETE:
            return  # the record already says complete, and rightly: the target is durable
        self.errors.append(reason)
        self.last_error = reason
        if self.state not in FINAL:
            self._end(JobState.FAILED)

    def cancel(self, reason: str) -> None:
        if self.state not in FINAL:
            log.warning("backup cancelled: %s", reason)
            self.errors.append(f"cancelled: {reason}")
            self._end(JobState.CANCELLED)

    def _end(self, state: JobState) -> None:
        self.state = state
        self.finished_mono = time.monotonic()
        self.copier_scope.cancel()
        self.ended.set()

    # -- figures -------------------------------------------------------------

    def _bytes(self, clusters: bitarray) -> int:
        """Bytes of the set clusters, counting the last partial cluster as partial."""
        total = clusters.count() * self.cluster_size
        if clusters and clusters[-1]:
            total -= len(clusters) * self.cluster_size - self.size
        return total

    def status(self) -> dict[str, object]:
        """A snapshot of the job for `cowfs status` and the record."""
        total = self._bytes(self.selected)
        done = self._bytes(self.selected & self.done)
        end = self.finished_mono or time.monotonic()
        elapsed = max(end - self.started_mono, 1e-6) if self.started_mono else 0.0
        copying = min(end, self.copier_done_mono or end) - self.started_mono
        rate = (self.bytes_copier + self.bytes_cbw) / copying if copying > 0 else 0.0
        remaining = total - done
        return {
            "state": str(self.state),
            "source": self.source,
            "target": str(self.target.path),
            "format": self.target.format,
            "sync": str(self.options.sync),
            "cluster_size": self.cluster_size,
            "speed": self.limiter.speed,
            "paused_reason": self.paused_reason,
            "last_error": self.last_error,
            "size": self.size,
            "point_in_time": self.point_in_time.isoformat() if self.point_in_time else None,
            "bytes_total": total,
            "bytes_done": done,
            "bytes_copier": self.bytes_copier,
            "bytes_cbw": self.bytes_cbw,
            "bytes_written": self.bytes_written,
            "elapsed_s": round(elapsed, 3),
            "rate": round(rate),
            "eta_s": round(remaining / rate, 1) if rate and self.state not in FINAL else None,
            "errors": list(self.errors),
            "barrier_s": self.barrier_s,
        }


def _runs(bits: bitarray):
    """(first, count) of each run of set bits."""
    pos = bits.find(1)
    while pos >= 0:
        end = bits.find(0, pos)
        if end < 0:
            end = len(bits)
        yield pos, end - pos
        pos = bits.find(1, end)
