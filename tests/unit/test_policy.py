"""Error policies, pause/resume and the copy-before-write timeout, in process.

The faults are real OSErrors from a target that fails chosen clusters (a full
disk, an I/O error, a write that hangs); the source is a real file. Each test
ends with the job's final state and, where it completes, the target equal to
the source as it was at the point in time.
"""

import errno
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers.jobs import RecordingTarget, close_job, poll, random_full_source
from helpers.sizes import KiB, MiB

from cowfs.copier import copy_in_background
from cowfs.job import Job, JobOptions, JobState, SyncMode
from cowfs.policy import CbwPolicy, TargetPolicy, retry_delay
from cowfs.target import RawTarget

CS = 64 * KiB


class FlakyTarget(RecordingTarget):
    """Data writes touching `bad` clusters fail with `err` while `failing` is set."""

    def __init__(self, raw: RawTarget, cluster_size: int, bad: set[int], err: int) -> None:
        super().__init__(raw, cluster_size)
        self.bad = bad
        self.err = err
        self.failing = True
        self.failures = 0

    def write(self, offset: int, data: memoryview) -> None:
        clusters = set(range(offset // CS, (offset + len(data) - 1) // CS + 1))
        if self.failing and clusters & self.bad:
            self.failures += 1
            raise OSError(self.err, os.strerror(self.err))
        super().write(offset, data)


class HangingTarget(RecordingTarget):
    """Data writes touching `bad` clusters block until `release` is set (a hung NFS)."""

    def __init__(self, raw: RawTarget, cluster_size: int, bad: set[int]) -> None:
        super().__init__(raw, cluster_size)
        self.bad = bad
        self.release = threading.Event()

    def write(self, offset: int, data: memoryview) -> None:
        if set(range(offset // CS, (offset + len(data) - 1) // CS + 1)) & self.bad:
            self.release.wait(30)
        super().write(offset, data)


def make(tmp_path: Path, target_cls, size: int = 2 * MiB, **kw) -> tuple[Job, RecordingTarget]:
    source = random_full_source(tmp_path, size)
    options = kw.pop("options")
    fd = os.open(source, os.O_RDWR)
    raw = RawTarget.create(tmp_path / "target.img", size)
    target = target_cls(raw, CS, **kw)
    job = Job(fd, str(source), target, options)  # type: ignore[arg-type]
    target.job = job
    return job, target


def snapshot(tmp_path: Path) -> bytes:
    return (tmp_path / "source.img").read_bytes()


async def wait_state(job: Job, state: JobState) -> None:
    await poll(lambda: job.state is state)


@pytest.mark.parametrize("policy", ["enospc", "stop"])
async def test_full_target_pauses_then_resumes_to_a_complete_backup(
    tmp_path: Path, policy: str
) -> None:
    job, target = make(
        tmp_path,
        FlakyTarget,
        bad={7, 8},
        err=errno.ENOSPC,
        options=JobOptions(SyncMode.FULL, CS, on_target_error=TargetPolicy(policy)),
    )
    before = snapshot(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            await wait_state(job, JobState.PAUSED)
            status = job.status()
            assert status.paused_reason == "error"
            assert "No space left" in status.last_error
            # While paused, copy-before-write still protects the point in time.
            await job.copy_before_write(20 * CS, 10)
            assert job.copy.done[20]
            os.pwrite(job.source_fd, b"guest", 20 * CS)
            target.failing = False  # space was freed
            job.resume()
            await job.complete()
        assert job.state is JobState.COMPLETE, job.errors
        job.target.fsync()
        assert (tmp_path / "target.img").read_bytes() == before
    finally:
        close_job(job)


async def test_enospc_policy_reports_other_errors(tmp_path: Path) -> None:
    job, _ = make(
        tmp_path,
        FlakyTarget,
        bad={3},
        err=errno.EIO,
        options=JobOptions(SyncMode.FULL, CS, on_target_error=TargetPolicy.ENOSPC),
    )
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            await job.complete()
        assert job.state is JobState.FAILED
        assert "Input/output error" in job.errors[0]
    finally:
        close_job(job)


async def test_ignore_retries_until_the_error_goes_away(tmp_path: Path) -> None:
    job, target = make(
        tmp_path,
        FlakyTarget,
        bad={5},
        err=errno.EIO,
        options=JobOptions(SyncMode.FULL, CS, on_target_error=TargetPolicy.IGNORE),
    )
    before = snapshot(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            await poll(lambda: target.failures >= 3)
            assert job.state is JobState.RUNNING
            assert "Input/output error" in job.status().last_error
            target.failing = False
            await job.complete()
        assert job.state is JobState.COMPLETE, job.errors
        job.target.fsync()
        assert (tmp_path / "target.img").read_bytes() == before
    finally:
        close_job(job)


def test_retry_delay_is_bounded() -> None:
    delays = [retry_delay(n) for n in range(1, 30)]
    assert delays[0] == pytest.approx(0.1)
    assert delays == sorted(delays)
    assert max(delays) == 5.0


async def test_a_stopped_job_that_cannot_recover_after_unmount_fails(tmp_path: Path) -> None:
    job, _ = make(
        tmp_path,
        FlakyTarget,
        bad={2},
        err=errno.ENOSPC,
        options=JobOptions(SyncMode.FULL, CS, on_target_error=TargetPolicy.STOP),
    )
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            await wait_state(job, JobState.PAUSED)
            with trio.fail_after(10):
                await job.complete()  # unmounted: nobody can resume any more
        assert job.state is JobState.FAILED
        assert "nobody can resume" in job.errors[-1]
    finally:
        close_job(job)


async def test_break_guest_write_fails_the_write_and_keeps_the_backup(tmp_path: Path) -> None:
    job, target = make(
        tmp_path,
        FlakyTarget,
        bad={9},
        err=errno.EIO,
        options=JobOptions(SyncMode.NONE, CS, on_cbw_error=CbwPolicy.BREAK_GUEST_WRITE),
    )
    before = snapshot(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            with pytest.raises(OSError) as e:
                await job.copy_before_write(9 * CS + 5, 100)
            assert e.value.errno == errno.EIO
            assert job.state is JobState.RUNNING and not job.copy.done[9]
            target.failing = False
            await job.copy_before_write(9 * CS + 5, 100)  # the guest tries again
            assert job.copy.done[9]
            os.pwrite(job.source_fd, b"x" * 100, 9 * CS + 5)
            await job.complete()
        assert job.state is JobState.COMPLETE
        job.target.fsync()
        got = (tmp_path / "target.img").read_bytes()
        assert got[9 * CS : 10 * CS] == before[9 * CS : 10 * CS]
    finally:
        close_job(job)


async def test_cbw_timeout_breaks_the_snapshot_instead_of_stalling(tmp_path: Path) -> None:
    job, target = make(
        tmp_path, HangingTarget, bad={4}, options=JobOptions(SyncMode.NONE, CS, cbw_timeout=0.2)
    )
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            with trio.fail_after(5):
                await job.copy_before_write(4 * CS, 10)  # returns although the target hangs
            assert job.state is JobState.FAILED
            assert "took over 0.2 s" in job.errors[0]
            await job.complete()
    finally:
        target.release.set()
        close_job(job)


async def test_user_pause_holds_the_copier(tmp_path: Path) -> None:
    job, _ = make(tmp_path, RecordingTarget, size=4 * MiB, options=JobOptions(SyncMode.FULL, CS))
    before = snapshot(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            job.pause("user")
            await poll(lambda: len(job.copy.claims) == 0)  # the batch in flight, if any, is done
            copied = job.copy.bytes_copier
            assert copied < job.size
            await trio.testing.wait_all_tasks_blocked()
            assert job.copy.bytes_copier == copied
            assert job.status().state == "paused"
            assert job.status().paused_reason == "user"
            await job.copy_before_write(60 * CS, 1)  # paused: copy-before-write still works
            assert job.copy.done[60] and job.copy.bytes_copier == copied
            job.set_speed(8 * MiB)
            job.resume()
            await job.complete()
        assert job.state is JobState.COMPLETE
        assert job.status().speed == 8 * MiB
        job.target.fsync()
        assert (tmp_path / "target.img").read_bytes() == before
    finally:
        close_job(job)
