"""The job: one backup of one source into one target, and its state.

Owns the point in time, which clusters the sync mode selects, the job's state
(`running → (paused) → completing → complete | failed | cancelled`), what the
error policies make of a failed copy, and its status. The copying itself, the
done map and one copy per cluster are block copy's (blockcopy.py); the guarantee
is theirs together: no write reaches the source before its clusters are done, and
only a job whose every selected cluster is done and durable says complete. Knows
nothing of FUSE, of the CLI or of record files.
"""

import enum
import errno
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio
from bitarray import bitarray
from bitarray.util import zeros

from .blockcopy import BlockCopy
from .extents import DataScan, data_clusters
from .options import JobOptions, SyncMode
from .policy import Action, CbwPolicy, copier_action
from .target import Target

log = logging.getLogger(__name__)


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
        self.copy = BlockCopy(
            source_fd, target, options.cluster_size, options.speed, not options.cbw_timeout
        )
        self.state = JobState.CREATED
        self.paused_reason: str | None = None
        self.last_error: str | None = None
        self._resumed = trio.Event()
        self.errors: list[str] = []
        self.selected = bitarray()
        self.zeroes = bitarray()
        """Needed clusters that were holes at the point in time, not yet told the target."""
        self.point_in_time: datetime | None = None
        self.started_mono = 0.0
        self.finished_mono: float | None = None
        self.copier_scope = trio.CancelScope()
        self.copier_done = trio.Event()
        self.copier_done_mono: float | None = None
        self.end_requested = trio.Event()
        """`cowfs end`: a job that collects until it is ended (sync none, a view) ends."""
        self.released = bitarray()
        """Clusters a view's reader released: no longer protected, no longer readable."""
        self.ended = trio.Event()
        self.sums_sha256: str | None = None
        """The SHA-256 of the checksum file, once it is durable beside the target."""

    @property
    def size(self) -> int:
        """The source's size at the point in time."""
        return self.copy.size

    # -- the point in time -------------------------------------------------

    def start(
        self, at: datetime | None = None, scan: DataScan | None = None, zeroes_now: bool = True
    ) -> None:
        """Fix the point in time. Must run before the first request is served.

        Which clusters the target needs follows from the sync mode; of those, the
        ones in holes of the source are done from the start (their old content is
        zero: the target is told so, which a fresh raw file already is). The copier
        copies the selected ones; copy-before-write saves the rest of the needed
        ones before they change (in `none` mode: all of them). `at`: the instant the
        barrier fixed for the whole group (now, by default); `scan`: the data clusters
        scanned before it (by default, scanned now); `zeroes_now`: tell the target about
        the zero clusters here, or leave it to the copier (under a barrier: on a huge or
        fragmented sparse source that takes milliseconds to seconds, and the zero
        clusters are done already, so no guest write waits for them). Over a backing file
        `top` needs the holes too, as zero clusters: a hole must not read through
        to whatever the backing held there.
        """
        size = os.fstat(self.source_fd).st_size
        if scan is None:
            data = data_clusters(self.source_fd, size, self.cluster_size)
        else:
            data = scan.at(size)
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
        if self.options.view:  # every cluster must stay readable at the point in time
            needed = everything
        self.point_in_time = at or datetime.now(UTC)
        self.target.begin(size, needed, self.point_in_time)
        self.copy.reset(size, ~(needed & data))
        self.released = zeros(len(data))
        self.zeroes = needed & ~data
        if zeroes_now:
            self.write_zeroes()
        self.started_mono = time.monotonic()
        self.state = JobState.RUNNING
        log.info(
            "point in time fixed: %s, %d bytes, %d clusters of %d, sync %s",
            self.source,
            self.size,
            len(self.copy.done),
            self.cluster_size,
            self.options.sync,
        )

    def write_zeroes(self) -> None:
        """Blocking: the target learns which needed clusters were holes at the point in
        time (a fresh raw file knows; qcow2 over a backing file flags them)."""
        for first, count in _runs(self.zeroes):
            self.copy.writer.write_zeroes(*self.copy.extent(first, count))
        self.zeroes = bitarray()

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
        self.copy.limiter.speed = speed
        log.info("copier speed set to %d bytes/s", speed)

    # -- copy-before-write ---------------------------------------------------

    async def copy_before_write(self, offset: int, length: int) -> None:
        """Return once every cluster of [offset, offset+length) below the point-in-time
        size holds its old content in the target (or the job has ended)."""
        end = min(offset + length, self.size)
        if offset >= end or not self.protecting:
            return
        first, last = offset // self.cluster_size, (end - 1) // self.cluster_size
        if self.copy.done.find(0, first, last + 1) < 0:
            return  # the common case once the copier is through: nothing to copy
        if not self.options.cbw_timeout:
            await self._protect(first, last)
            return
        with trio.move_on_after(self.options.cbw_timeout) as scope:
            await self._protect(first, last)
        if scope.cancelled_caught:
            limit = self.options.cbw_timeout
            self.fail(f"copy-before-write at offset {offset} took over {limit} s")

    async def _protect(self, first: int, last: int) -> None:
        try:
            await self.copy.protect(first, last, lambda: self.protecting)
        except OSError as e:
            reason = f"copy-before-write: {e.strerror}"
            if self.options.on_cbw_error is CbwPolicy.BREAK_GUEST_WRITE:
                log.error("%s; the guest write fails", reason)
                self.last_error = reason
                raise OSError(errno.EIO, reason) from e
            self.fail(reason)  # break-snapshot: the guest write proceeds

    # -- the copier's side ---------------------------------------------------

    async def copy_claimed(self, runs: list[tuple[int, int]], buf: bytearray) -> int | None:
        """Copy the runs of clusters the copier claimed; returns bytes read, or None if
        a copy failed and the error policy wants the clusters tried again."""
        try:
            return await self.copy.copy_claimed(runs, buf)
        except OSError as e:
            self._copier_failed(e)
            return None

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

    def copier_finished(self) -> None:
        """The copier has stopped (all copied, or the job ended); rates stop counting."""
        self.copier_done_mono = time.monotonic()
        self.copier_done.set()

    def release(self, offset: int, length: int) -> int:
        """A view's reader will not read [offset, offset+length) again (sync none only):
        its whole clusters need no more copy-before-write and are no longer readable.
        Returns the bytes of those clusters; the caller frees their space."""
        cs = self.cluster_size
        first = -(-offset // cs)
        end = min(offset + length, self.size)
        last = (end // cs - 1) if end < self.size else (self.size - 1) // cs
        if last < first:
            return 0
        self.released[first : last + 1] = 1
        self.copy.done[first : last + 1] = 1  # copy-before-write passes them by
        self.copy.sums.release(first, last + 1 - first)
        return self.copy.extent(first, last + 1 - first)[1]

    # -- ending --------------------------------------------------------------

    def unmounted(self) -> None:
        """The mount is gone and the source quiet: nobody can resume a paused job now, so
        it goes on, and a stop policy fails it instead of pausing."""
        if self.state in (JobState.RUNNING, JobState.PAUSED):
            self.state = JobState.COMPLETING
            self._resumed.set()
            self.target.guest_gone()

    async def flush(self) -> bool:
        """Once the copier is through: check that every selected cluster is in the target
        and make the target durable. False if the job failed or had ended."""
        await self.copier_done.wait()
        if self.ended.is_set():
            return False
        missing = self.selected.count() - (self.selected & self.copy.done).count()
        if missing:
            self.fail(f"{missing} clusters were never copied")
            return False
        try:  # durable, and the checksums (or a repository's index) beside it
            self.sums_sha256 = await trio.to_thread.run_sync(self.target.seal, self.copy.sums)
        except OSError as e:  # the target's reason: fsync, checksums, an upload
            self.fail(e.strerror or str(e))
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

    def status(self) -> "JobStatus":
        """A snapshot of the job for `cowfs status` and the record."""
        copy = self.copy
        total = copy.bytes_of(self.selected)
        done = copy.bytes_of(self.selected & copy.done)
        end = self.finished_mono or time.monotonic()
        elapsed = max(end - self.started_mono, 1e-6) if self.started_mono else 0.0
        copying = min(end, self.copier_done_mono or end) - self.started_mono
        rate = (copy.bytes_copier + copy.bytes_cbw) / copying if copying > 0 else 0.0
        return JobStatus(
            state=str(self.state),
            source=self.source,
            target=self.target.name,
            format=self.target.format,
            sync=str(self.options.sync),
            cluster_size=self.cluster_size,
            speed=copy.limiter.speed,
            paused_reason=self.paused_reason,
            last_error=self.last_error,
            size=self.size,
            point_in_time=self.point_in_time.isoformat() if self.point_in_time else None,
            bytes_total=total,
            bytes_done=done,
            bytes_copier=copy.bytes_copier,
            bytes_cbw=copy.bytes_cbw,
            bytes_written=copy.bytes_written,
            elapsed_s=round(elapsed, 3),
            rate=round(rate),
            eta_s=round((total - done) / rate, 1) if rate and self.state not in FINAL else None,
            errors=list(self.errors),
            barrier_s=self.barrier_s,
        )


@dataclass(frozen=True)
class JobStatus:
    """What `cowfs status --json` shows of a job (with its id and image) and what the
    record is made of."""

    state: str
    source: str
    target: str
    format: str
    sync: str
    cluster_size: int
    speed: int
    paused_reason: str | None
    last_error: str | None
    size: int
    point_in_time: str | None
    bytes_total: int
    bytes_done: int
    bytes_copier: int
    bytes_cbw: int
    bytes_written: int
    elapsed_s: float
    rate: int
    eta_s: float | None
    errors: list[str] = field(default_factory=list)
    barrier_s: float | None = None


def _runs(bits: bitarray):
    """(first, count) of each run of set bits."""
    pos = bits.find(1)
    while pos >= 0:
        end = bits.find(0, pos)
        if end < 0:
            end = len(bits)
        yield pos, end - pos
        pos = bits.find(1, end)
