"""In-process job helpers: a target that checks the job's promises at each write,
sources written from pieces, and waiting on the copier without FUSE."""

import itertools
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

from cowfs.job import Job, JobState
from cowfs.target import RawTarget
from cowfs.target.file import FileTarget


class RecordingTarget(FileTarget):
    """A RawTarget wrapper that checks the job's promises at the moment of each write.

    Every cluster is written (data or zeroes) at most once after the point in time,
    only while the writer holds its claim, and never after it was marked done. Violations
    are collected (an exception raised here would be swallowed into a failed job) and
    asserted by the test. Copier writes arrive from worker threads: a lock guards state,
    and a short sleep there widens the window in which guest writes race the copier.
    """

    format = "raw"
    backing = None

    def __init__(
        self,
        raw: RawTarget,
        cluster_size: int,
        thread_delay: float = 0.0,
        gate: threading.Event | None = None,
    ) -> None:
        self.raw = raw
        self.gate = gate
        super().__init__(raw.path, raw.fd)
        self.cluster_size = cluster_size
        self.thread_delay = thread_delay
        self.job: Job | None = None
        self.lock = threading.Lock()
        self.seen: set[int] = set()
        self.calls: list[tuple[str, int, int]] = []
        self.violations: list[str] = []

    def _check(self, kind: str, offset: int, length: int) -> None:
        job = self.job
        assert job is not None
        with self.lock:
            self.calls.append((kind, offset, length))
            if job.state is JobState.CREATED:
                return  # start() zero-fills holes of a full job: not a copy
            if offset % self.cluster_size:
                self.violations.append(f"{kind} at unaligned offset {offset}")
            first = offset // self.cluster_size
            last = (offset + length - 1) // self.cluster_size
            for c in range(first, last + 1):
                if c in self.seen:
                    self.violations.append(f"cluster {c} copied twice ({kind})")
                self.seen.add(c)
                if job.copy.done[c]:
                    self.violations.append(f"{kind} to cluster {c} already marked done")
                if not job.copy.claims.is_claimed(c):
                    self.violations.append(f"{kind} to cluster {c} without a claim")

    def write(self, offset: int, data: memoryview) -> None:
        self._check("write", offset, len(data))
        if threading.current_thread() is not threading.main_thread():
            if self.gate is not None:
                assert self.gate.wait(10), "the test never opened the gate"
            time.sleep(self.thread_delay)
        self.raw.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check("zeroes", offset, length)
        self.raw.write_zeroes(offset, length)

    def fsync(self) -> None:
        self.raw.fsync()

    def close(self) -> None:
        self.raw.close()


def write_source(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    """A sparse file of `size` bytes holding `pieces`; everything else is a hole."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def close_job(job: Job) -> None:
    os.close(job.source_fd)
    job.target.close()


async def poll(condition: Callable[[], bool]) -> None:
    """Wait for a condition the job offers no event for (the copier's progress)."""
    with trio.fail_after(5):
        for _ in itertools.count():
            if condition():
                return
            await trio.sleep(0.001)


def random_full_source(tmp_path: Path, size: int, seed: int = 7) -> Path:
    source = tmp_path / "source.img"
    write_source(source, size, [(0, random.Random(seed).randbytes(size))])
    return source
