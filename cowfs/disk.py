"""One image served by a mount: its locked fd, its dirty bitmaps and the write path.

Every change to the image goes through here, in one order: the barrier's gate,
copy-before-write for each job that still protects the image's point in time, the
write intent (durable before the change), the dirty bitmaps, and only then the image
itself. Knows nothing of FUSE.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from .barrier import Barrier
from .bitmap import BitmapStore
from .extents import DataScan
from .job import Job
from .tracking import ChangeTracker


class Disk:
    def __init__(self, path: Path, fd: int, tracker: ChangeTracker, barrier: Barrier) -> None:
        self.path = path
        self.name = path.name
        self.fd = fd
        self.tracker = tracker
        self.barrier = barrier
        self.jobs: list[Job] = []
        """Jobs whose point in time writes must still respect (running or paused)."""
        self.scans: list[DataScan] = []
        """Scans under way for a job about to start: each write is noted in them."""

    @property
    def dirty(self) -> BitmapStore:
        return self.tracker.store

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    async def write(self, offset: int, data: bytes) -> int:
        await self.barrier.enter()
        try:
            if self.jobs:
                for job in list(self.jobs):
                    await job.copy_before_write(offset, len(data))
            await self.tracker.ensure(offset, offset + len(data))
            for scan in self.scans:
                scan.note(offset, len(data))
            self.tracker.mark(offset, len(data))
            try:
                return os.pwrite(self.fd, data, offset)
            finally:
                self.tracker.written()
        finally:
            self.barrier.leave()

    async def truncate(self, size: int) -> None:
        """Resize the image; shrinking destroys data, which each job copies first."""
        await self.barrier.enter()
        try:
            for job in list(self.jobs):
                if size < job.size:
                    await job.copy_before_write(size, job.size - size)
            old = -1
            while old != self.size:  # a write may grow the image while the intent is written
                old = self.size
                await self.tracker.ensure(min(old, size), max(old, size))
            for scan in self.scans:
                scan.note(min(old, size), abs(old - size))
            self.tracker.mark(min(old, size), abs(old - size))
            try:
                os.ftruncate(self.fd, size)
            finally:
                self.tracker.written()
        finally:
            self.barrier.leave()

    @contextmanager
    def attributes(self) -> Iterator[int]:
        """Around a change of the image's mode, owner or times (yields its fd): its ctime
        moves, and after a crash that must not read as a change outside cowfs."""
        self.tracker.changing()
        try:
            yield self.fd
        finally:
            self.tracker.written()

    async def scan(self, cluster_size: int) -> DataScan:
        """Which clusters hold data, scanned in a thread while writes go on; end it with
        `scans.remove` once the point in time is fixed."""
        scan = DataScan(cluster_size)
        self.scans.append(scan)
        try:
            await trio.to_thread.run_sync(scan.scan, self.fd)
        except BaseException:
            self.scans.remove(scan)
            raise
        return scan

    def running_job(self) -> Job | None:
        return next((job for job in self.jobs if not job.ended.is_set()), None)
