"""Views: an image at a job's point in time, as a read-only file, while the guest writes.

A read takes each cluster from the target when the job has it there (copied, or
saved by copy-before-write: its old content, final), and every other cluster from
the source — while holding that cluster's claim, the very claim a guest write's
copy-before-write must take first. So a write to a cluster being read waits until
the read has it (one read of at most a FUSE request, 128 KiB by default, never
more than BATCH_BYTES), then copies the old content and proceeds: a view never
returns data written after the point in time. A view job protects every cluster
(whatever its sync mode selects to copy), so each one is either in the target or
still old in the source.

A failed or cancelled job's view fails every read with EIO, as does a range the
reader released (its old content may be gone): never stale or new data.
"""

import errno
import json
import os

from bitarray import bitarray
from bitarray.util import zeros

from .blockcopy import BATCH_BYTES
from .job import Job, JobState
from .options import SyncMode
from .target.raw import punch_hole, read_exactly

DIRTY_SUFFIX = ".dirty"
"""`<name>.dirty` beside an incremental's view: its dirty extents as JSON."""
READABLE = (JobState.RUNNING, JobState.PAUSED)
"""While copy-before-write protects the image: once a job ends (or its mount goes), no
write waits for a view's reads any more."""


class View:
    """One image's view in a job: the file `.views/<job>/<name>`."""

    def __init__(self, job: Job, name: str) -> None:
        self.job = job
        self.name = name
        self._dirty: bytes | None = None
        self._freed = bitarray()
        # Its own open file of the source: the kernel's readahead follows a reader's
        # sequential reads here, undisturbed by the guest's and the copier's.
        self._fd = os.open(f"/proc/self/fd/{job.source_fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._reads = 0
        self._closing = False

    def close(self) -> None:
        """The job has ended: the source's file goes once no read uses it any more."""
        self._closing = True
        if not self._reads and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def free(self) -> int:
        """Blocking: give back the target space of released clusters (a raw fleecing
        store gets holes; a qcow2 one keeps its clusters). Returns the bytes freed."""
        job = self.job
        fresh = job.released.copy()
        if len(self._freed) < len(fresh):
            self._freed.extend(zeros(len(fresh) - len(self._freed)))
        fresh &= ~self._freed
        self._freed |= fresh
        if job.target.format != "raw":
            return 0
        before = os.fstat(job.target.fd).st_blocks
        for first, count in _runs(fresh):
            punch_hole(job.target.fd, *job.copy.extent(first, count))
        return max(0, before - os.fstat(job.target.fd).st_blocks) * 512

    @property
    def open(self) -> bool:
        """Shown while the job can still be read from (not yet ended)."""
        return not self.job.ended.is_set()

    def dirty_extents(self) -> bytes | None:
        """For an incremental: its dirty clusters as JSON extents (offset, length), since
        no reader can find them with SEEK_DATA through FUSE. None for other modes."""
        if self.job.options.sync is not SyncMode.INCREMENTAL:
            return None
        if self._dirty is None:
            extents = []
            for first, count in _runs(self.job.selected):
                offset, length = self.job.copy.extent(first, count)
                extents.append({"offset": offset, "length": length})
            self._dirty = json.dumps(extents, indent=1).encode() + b"\n"
        return self._dirty

    async def read(self, offset: int, size: int) -> bytes:
        job, copy = self.job, self.job.copy
        _check(job)
        end = min(offset + min(size, BATCH_BYTES), job.size)
        if offset >= end:
            return b""
        cs = copy.cluster_size
        first, last = offset // cs, (end - 1) // cs
        if job.released.find(1, first, last + 1) >= 0:
            raise OSError(errno.EIO, "this range of the view was released")
        claimed = await _claim_missing(job, first, last)
        self._reads += 1
        try:
            _check(job)
            done = copy.done[first : last + 1]
            data = await copy.in_thread(_read_clusters, job, self._fd, first, done)
        finally:
            for cluster in claimed:
                copy.claims.release(cluster, 1)
            self._reads -= 1
            if self._closing:
                self.close()
        _check(job)  # failed meanwhile: what was read may be fine, but say what the job says
        if job.released.find(1, first, last + 1) >= 0:  # released while read: maybe freed
            raise OSError(errno.EIO, "this range of the view was released")
        start = offset - first * cs
        return data[start : start + end - offset]


async def _claim_missing(job: Job, first: int, last: int) -> list[int]:
    """Claim every cluster of first..last not yet in the target; if someone else holds
    one, give ours back, wait for theirs, and start over (claims never wait while
    holding claims: no deadlock with copy-before-write or the copier)."""
    copy = job.copy
    while True:
        claimed, busy = [], None
        for cluster in range(first, last + 1):
            if copy.done[cluster]:
                continue
            if not copy.claims.claim(cluster):
                busy = cluster
                break
            claimed.append(cluster)
        if busy is None:
            return claimed
        for cluster in claimed:
            copy.claims.release(cluster, 1)
        await copy.claims.wait(busy)
        _check(job)


def _read_clusters(job: Job, source_fd: int, first: int, done: bitarray) -> bytes:
    """Blocking: clusters first.. from the target where `done`, else from the source."""
    copy = job.copy
    out = bytearray()
    for run_first, count, in_target in _spans(done):
        offset, length = copy.extent(first + run_first, count)
        if in_target:
            out += job.target.read(offset, length)
        else:
            out += read_exactly(source_fd, offset, length)
    return bytes(out)


def _check(job: Job) -> None:
    if job.state not in READABLE:
        why = job.errors[-1] if job.errors else str(job.state)
        raise OSError(errno.EIO, f"the job's view is gone ({why})")


def _spans(bits: bitarray):
    """(start, count, value) of each run of equal bits."""
    pos = 0
    while pos < len(bits):
        value = bits[pos]
        end = bits.find(not value, pos)
        if end < 0:
            end = len(bits)
        yield pos, end - pos, bool(value)
        pos = end


def _runs(bits: bitarray):
    return ((start, count) for start, count, value in _spans(bits) if value)


def view_path(mountpoint: os.PathLike, group: int, name: str) -> str:
    return os.path.join(mountpoint, ".views", str(group), name)
