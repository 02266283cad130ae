"""The job and its copier in-process, no FUSE: the point-in-time guarantee under load.

Why this tier exists: the guarantee of DESIGN.md (copy-before-write before every
mutating operation, single flight per cluster, done only after the copy, holes
stay holes, nothing silent on errors) lives in cowfs.job, cowfs.blockcopy and cowfs.copier. Here we
drive them directly from many trio tasks while the real copier runs in its worker
threads, so that a broken ordering shows up in milliseconds, with a seed to replay,
instead of behind a FUSE mount. The guest's write is simulated exactly as the FUSE
layer does it: `await job.copy_before_write(...)`, then `os.pwrite` on the source.
"""

import errno
import os
import random
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers.jobs import RecordingTarget, close_job, poll, random_full_source, write_source
from helpers.sizes import KiB, MiB

import cowfs.blockcopy
from cowfs.copier import copy_in_background
from cowfs.group import Completion, Group
from cowfs.job import Job, JobOptions, JobState, SyncMode
from cowfs.target import RawTarget

SEEDS = int(os.environ.get("COWFS_JOB_SEEDS", "25"))
"""Seeds per sync mode for the random workload; CI may raise it (each seed is ~50 ms)."""

CS = 64 * KiB
SPARSE_SIZE = 16 * CS + 5000  # a partial last cluster


# -- helpers -------------------------------------------------------------------


class FailingTarget(RecordingTarget):
    """A target whose data writes fail with EIO when they touch chosen clusters."""

    def __init__(self, raw: RawTarget, cluster_size: int, fail_clusters: set[int]) -> None:
        super().__init__(raw, cluster_size)
        self.fail_clusters = fail_clusters

    def write(self, offset: int, data: memoryview) -> None:
        first = offset // self.cluster_size
        last = (offset + len(data) - 1) // self.cluster_size
        if self.fail_clusters & set(range(first, last + 1)):
            raise OSError(errno.EIO, "injected target error")
        super().write(offset, data)


def random_source(path: Path, rng: random.Random, cluster_size: int) -> int:
    """Random data, written zeros and holes in runs that cross cluster boundaries; the
    size usually ends in a partial cluster. Returns the size."""
    nclusters = rng.randint(1, 40)
    size = max(1, nclusters * cluster_size - rng.choice([0, rng.randrange(cluster_size)]))
    holes = rng.random() < 0.7
    pieces = []
    pos = 0
    while pos < size:
        length = min(size - pos, rng.randint(1, 3 * cluster_size))
        kind = rng.random()
        if kind < 0.55:
            pieces.append((pos, rng.randbytes(length)))
        elif kind < 0.75 or not holes:
            pieces.append((pos, bytes(length)))
        pos += length
    write_source(path, size, pieces)
    return size


def make_job(
    tmp_path: Path,
    source: Path,
    sync: SyncMode,
    cluster_size: int,
    *,
    speed: int = 0,
    target_cls: type[RecordingTarget] = RecordingTarget,
    **target_kw: object,
) -> tuple[Job, RecordingTarget]:
    fd = os.open(source, os.O_RDWR)
    size = os.fstat(fd).st_size
    raw = RawTarget.create(tmp_path / "target.img", size)
    target = target_cls(raw, cluster_size, **target_kw)  # type: ignore[arg-type]
    job = Job(fd, str(source), target, JobOptions(sync, cluster_size, speed))  # type: ignore[arg-type]
    target.job = job
    return job, target


def cluster_bytes(size: int, cluster_size: int, clusters: set[int]) -> int:
    """Bytes of `clusters`, the last partial cluster counted as partial."""
    return sum(min(cluster_size, size - c * cluster_size) for c in clusters)


def data_cluster_set(before: bytes, cluster_size: int, holes: set[int]) -> set[int]:
    n = -(-len(before) // cluster_size)
    return set(range(n)) - holes


def hole_clusters(path: Path, cluster_size: int) -> set[int]:
    """Clusters with no data extent, computed independently of cowfs.extents."""
    size = path.stat().st_size
    n = -(-size // cluster_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        holes = set()
        for c in range(n):
            try:
                data = os.lseek(fd, c * cluster_size, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                data = size
            if data >= min(size, (c + 1) * cluster_size):
                holes.add(c)
        return holes
    finally:
        os.close(fd)


# -- the point in time under a random concurrent workload ---------------------


async def guest(
    job: Job, rng: random.Random, touched: list[tuple[int, int]], ops: int, truncate: bool
) -> None:
    """One guest task: random writes (1 byte to 1 MiB, unaligned, some past EOF), maybe a
    shrinking truncate, each preceded by copy-before-write exactly as the FUSE layer does."""
    cs = job.cluster_size
    fd = job.source_fd
    truncate_at = rng.randrange(ops) if truncate else -1
    for i in range(ops):
        if i == truncate_at:
            current = os.fstat(fd).st_size
            new_size = rng.randrange(0, max(1, current))
            touched.append((new_size, current - new_size))
            await job.copy_before_write(new_size, current - new_size)
            os.ftruncate(fd, new_size)
        else:
            if rng.random() < 0.5:
                offset = rng.randrange(0, job.size + cs)
            else:  # at a cluster boundary or one byte either side of it
                offset = max(0, rng.randrange(0, job.size // cs + 2) * cs + rng.choice([-1, 0, 1]))
            length = rng.choice(
                [rng.randint(1, 16), rng.randint(1, 2 * cs), cs, 2, rng.randint(1, MiB)]
            )
            data = bytes(length) if rng.random() < 0.1 else rng.randbytes(length)
            touched.append((offset, length))
            await job.copy_before_write(offset, length)
            os.pwrite(fd, data, offset)  # no checkpoint between CBW and the write
        if rng.random() < 0.3:
            await trio.sleep(rng.random() * 0.002)  # let the copier's threads move on
        else:
            await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("sync", [SyncMode.FULL, SyncMode.TOP, SyncMode.NONE])
@pytest.mark.parametrize("seed", range(SEEDS))
async def test_point_in_time_under_concurrent_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, sync: SyncMode
) -> None:
    rng = random.Random(f"{seed}-{sync}")
    cs = rng.choice([4 * KiB, 16 * KiB, 64 * KiB])
    # Small batches make the copier claim many times, so guest writes meet its claims.
    monkeypatch.setattr(cowfs.blockcopy, "BATCH_BYTES", rng.choice([cs, 4 * cs, MiB]))
    source = tmp_path / "source.img"
    size = random_source(source, rng, cs)
    before = source.read_bytes()
    holes = hole_clusters(source, cs)
    job, target = make_job(tmp_path, source, sync, cs, thread_delay=0.0002)
    touched: list[tuple[int, int]] = []
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                job.start()
                nursery.start_soon(copy_in_background, job)
                assert job.state is JobState.RUNNING
                async with trio.open_nursery() as guests:
                    for _ in range(rng.randint(1, 8)):
                        guests.start_soon(
                            guest,
                            job,
                            random.Random(rng.random()),
                            touched,
                            rng.randint(1, 8),
                            rng.random() < 0.3,
                        )
                await job.complete()
        status = job.status()
    finally:
        close_job(job)

    replay = f"seed={seed} sync={sync} cluster={cs} size={size}"
    assert job.state is JobState.COMPLETE, (replay, job.errors)
    assert job.errors == []
    assert target.violations == [], replay

    got = (tmp_path / "target.img").read_bytes()
    assert len(got) == size
    data = data_cluster_set(before, cs, holes)
    if sync is SyncMode.NONE:
        hit = set()
        for offset, length in touched:
            end = min(offset + length, size)
            if offset < end:
                hit |= set(range(offset // cs, (end - 1) // cs + 1))
        expected = bytearray(size)
        for c in hit:
            expected[c * cs : (c + 1) * cs] = before[c * cs : (c + 1) * cs]
        assert got == bytes(expected), replay
        copied = hit & data
        assert status.bytes_copier == 0
        assert status.bytes_cbw == cluster_bytes(size, cs, copied)
    else:
        assert got == before, replay
        copied = data
        assert status.bytes_done == status.bytes_total
        assert status.bytes_copier + status.bytes_cbw == cluster_bytes(size, cs, data)
    # Every cluster that held data at the point in time was copied exactly once.
    assert target.seen == copied, replay


async def test_cbw_waits_for_the_copier_claim(tmp_path: Path) -> None:
    """A guest write to a cluster the copier is copying right now waits for that copy
    and does not copy the cluster again."""
    cs = 64 * KiB
    source = tmp_path / "source.img"
    write_source(source, 4 * MiB, [(0, random.Random(1).randbytes(4 * MiB))])
    before = source.read_bytes()
    gate = threading.Event()  # holds the copier's writes until the guest waits
    job, target = make_job(tmp_path, source, SyncMode.FULL, cs, gate=gate)
    returned = trio.Event()

    async def guest_write() -> None:
        await job.copy_before_write(10, 1)
        assert job.copy.done[0]
        os.pwrite(job.source_fd, b"\xff", 10)
        returned.set()

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                job.start()
                nursery.start_soon(copy_in_background, job)
                await poll(lambda: job.copy.claims.is_claimed(0))
                nursery.start_soon(guest_write)
                await trio.testing.wait_all_tasks_blocked()
                assert not returned.is_set()  # the guest waits for the copier's copy
                assert not job.copy.done[0]
                gate.set()
                await returned.wait()
                await job.complete()
        assert job.state is JobState.COMPLETE
        assert target.violations == []
        assert job.copy.bytes_cbw == 0  # the copier's copy served the guest
        assert (tmp_path / "target.img").read_bytes() == before
    finally:
        close_job(job)


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 1, {0}),
        (CS - 1, 1, {0}),
        (CS - 1, 2, {0, 1}),
        (CS, CS, {1}),
        (CS + 1, CS - 1, {1}),
        (2 * CS, 3 * CS, {2, 3, 4}),
        (5 * CS + 7, 0, set()),
        (16 * CS + 4999, 1, {16}),
        (16 * CS + 4999, MiB, {16}),
        (16 * CS + 5000, 10, set()),
        (15 * CS, 10 * MiB, {15, 16}),
    ],
)
async def test_cbw_copies_exactly_the_touched_clusters(
    tmp_path: Path, offset: int, length: int, expected: set[int]
) -> None:
    """CBW of [offset, offset+length) copies the clusters it overlaps below the
    point-in-time size, no fewer (data loss) and no more (a fleecing target that lies)."""
    source = tmp_path / "source.img"
    write_source(source, SPARSE_SIZE, [(0, random.Random(5).randbytes(SPARSE_SIZE))])
    job, target = make_job(tmp_path, source, SyncMode.NONE, CS)
    try:
        job.start()
        await job.copy_before_write(offset, length)
        assert {c for c in range(len(job.copy.done)) if job.copy.done[c]} == expected
        assert target.seen == expected
        assert target.violations == []
        assert job.copy.bytes_cbw == cluster_bytes(SPARSE_SIZE, CS, expected)
    finally:
        close_job(job)


async def test_empty_source(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    write_source(source, 0, [])
    job, _ = make_job(tmp_path, source, SyncMode.FULL, 64 * KiB)
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            await job.copy_before_write(0, 100)
            await job.complete()
        assert job.state is JobState.COMPLETE
        assert job.status().bytes_total == 0
    finally:
        close_job(job)


# -- holes ---------------------------------------------------------------------


SPARSE_DATA = {2: b"a" * CS, 9: b"b" * 100, 16: b"c" * 5000}  # cluster -> data at its start
SPARSE_ZERO_WRITTEN = 5  # a cluster of written zeros: allocated, but not worth writing


def sparse_source(tmp_path: Path) -> Path:
    source = tmp_path / "source.img"
    pieces = [(c * CS, data) for c, data in SPARSE_DATA.items()]
    pieces.append((SPARSE_ZERO_WRITTEN * CS, bytes(CS)))
    write_source(source, SPARSE_SIZE, pieces)
    return source


@pytest.mark.parametrize("sync", [SyncMode.FULL, SyncMode.TOP, SyncMode.NONE])
async def test_holes_are_done_from_the_start(tmp_path: Path, sync: SyncMode) -> None:
    source = sparse_source(tmp_path)
    job, _ = make_job(tmp_path, source, sync, CS)
    try:
        job.start()
        data = {*SPARSE_DATA, SPARSE_ZERO_WRITTEN}
        assert {c for c in range(17) if not job.copy.done[c]} == data
        assert len(job.copy.done) == 17
        total = job.status().bytes_total
        if sync is SyncMode.FULL:
            assert total == SPARSE_SIZE
        elif sync is SyncMode.TOP:
            assert total == 3 * CS + 5000  # holes excluded, last cluster partial
        else:
            assert total == 0
    finally:
        close_job(job)


@pytest.mark.parametrize("sync", [SyncMode.FULL, SyncMode.TOP])
async def test_target_stays_sparse(tmp_path: Path, sync: SyncMode) -> None:
    source = sparse_source(tmp_path)
    before = source.read_bytes()
    job, target = make_job(tmp_path, source, sync, CS)
    try:
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            await job.copy_before_write(9 * CS, 1)  # CBW of a data cluster
            os.pwrite(job.source_fd, b"x", 9 * CS)
            await job.copy_before_write(12 * CS, CS)  # CBW of a hole: nothing to copy
            os.pwrite(job.source_fd, b"y" * CS, 12 * CS)
            await job.complete()
        assert job.state is JobState.COMPLETE
        assert target.violations == []
        assert not [c for c in target.calls if c[0] == "write" and c[1] // CS == 12]
    finally:
        close_job(job)
    out = tmp_path / "target.img"
    assert out.read_bytes() == before
    # Only the three clusters with non-zero data were written: the rest are holes.
    assert hole_clusters(out, CS) == set(range(17)) - set(SPARSE_DATA)
    assert out.stat().st_blocks * 512 <= 4 * CS


# -- failures and cancel ---------------------------------------------------------


async def test_cbw_error_breaks_the_snapshot(tmp_path: Path) -> None:
    cs = 64 * KiB
    source = random_full_source(tmp_path, 4 * MiB)
    bad = 60
    job, target = make_job(
        tmp_path, source, SyncMode.FULL, cs, speed=1, target_cls=FailingTarget, fail_clusters={bad}
    )
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                job.start()
                nursery.start_soon(copy_in_background, job)
                await job.copy_before_write(bad * cs + 100, 10)  # returns: the guest proceeds
                assert job.state is JobState.FAILED
                assert any(
                    "copy-before-write" in e and str(bad * cs) in e and "injected" in e
                    for e in job.errors
                ), job.errors
                os.pwrite(job.source_fd, b"guest", bad * cs + 100)
                calls = len(target.calls)
                await job.copy_before_write(0, 4 * MiB)  # the job has ended: no copy
                assert len(target.calls) == calls
                await job.copier_done.wait()  # the copier stopped
                await job.complete()
        assert job.state is JobState.FAILED
        assert job.status().state == "failed"
        assert len(job.errors) == 1, job.errors  # complete() added nothing
        assert not job.copy.done[bad]
        assert target.violations == []
    finally:
        close_job(job)


async def test_cbw_error_in_sync_none_stays_failed(tmp_path: Path) -> None:
    """A fleecing job has nothing left to copy at the end; a broken CBW must still fail it."""
    cs = 64 * KiB
    source = random_full_source(tmp_path, MiB)
    job, _ = make_job(
        tmp_path, source, SyncMode.NONE, cs, target_cls=FailingTarget, fail_clusters={3}
    )
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                job.start()
                nursery.start_soon(copy_in_background, job)
                await job.copy_before_write(0, 2 * cs)
                await job.copy_before_write(3 * cs, 1)
                os.pwrite(job.source_fd, b"guest", 3 * cs)
                await job.complete()
        assert job.state is JobState.FAILED
        assert len(job.errors) == 1 and "copy-before-write" in job.errors[0]
    finally:
        close_job(job)


async def test_copier_error_fails_the_job(tmp_path: Path) -> None:
    cs = 64 * KiB
    source = random_full_source(tmp_path, 2 * MiB)
    bad = 5
    job, target = make_job(
        tmp_path, source, SyncMode.FULL, cs, target_cls=FailingTarget, fail_clusters={bad}
    )
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                job.start()
                nursery.start_soon(copy_in_background, job)
                await job.complete()
                calls = len(target.calls)
                await job.copy_before_write(0, 2 * MiB)
                assert len(target.calls) == calls
        assert job.state is JobState.FAILED
        assert any("copier" in e and "injected" in e for e in job.errors), job.errors
        assert not job.copy.done[bad]
    finally:
        close_job(job)


async def test_cancel_stops_copier_and_cbw(tmp_path: Path) -> None:
    cs = 64 * KiB
    source = random_full_source(tmp_path, 8 * MiB)
    job, target = make_job(tmp_path, source, SyncMode.FULL, cs, speed=2 * MiB)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                job.start()
                nursery.start_soon(copy_in_background, job)
                await poll(lambda: job.copy.bytes_copier > 0)
                job.cancel("by the test")
                assert job.state is JobState.CANCELLED
                await job.copier_done.wait()
                calls = len(target.calls)
                await trio.sleep(0.05)
                assert len(target.calls) == calls  # the copier wrote nothing more
                last = len(job.copy.done) - 1
                assert not job.copy.done[last]
                await job.copy_before_write(last * cs, cs)  # returns at once, copies nothing
                assert len(target.calls) == calls
                assert not job.copy.done[last]
                await job.complete()
        assert job.state is JobState.CANCELLED
        assert job.errors == ["cancelled: by the test"]
        assert job.status().bytes_done < job.status().bytes_total
    finally:
        close_job(job)


class CountingTarget(RecordingTarget):
    """Counts the writes that have returned, beside the calls that began."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.returned = 0

    def write(self, offset: int, data: memoryview) -> None:
        super().write(offset, data)
        with self.lock:
            self.returned += 1


@pytest.mark.parametrize("writer", ["copier", "copy-before-write"])
async def test_job_ends_only_once_its_threads_stopped_writing(tmp_path: Path, writer: str) -> None:
    """A job cancelled while a worker thread is in the middle of writing its target: the
    end (which closes the target and writes the record, often on the fd number the
    close frees) waits for that thread, or a late write could land in the record."""
    source = random_full_source(tmp_path, 8 * MiB)
    gate = threading.Event()  # holds the worker threads' writes
    sync = SyncMode.FULL if writer == "copier" else SyncMode.NONE
    job, target = make_job(tmp_path, source, sync, CS, target_cls=CountingTarget, gate=gate)
    job.copy.inline = False  # as for a cold cluster: copy-before-write copies in a thread
    at_end: list[tuple[int, int]] = []

    async def on_end(ended: Job) -> None:
        with target.lock:
            began = sum(1 for kind, _, _ in target.calls if kind == "write")
            at_end.append((began, target.returned))

    group = Group(1, [job], Completion.GROUPED, on_end)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                job.start()
                nursery.start_soon(group.run, trio.Event())
                if writer == "copy-before-write":
                    nursery.start_soon(job.copy_before_write, 3 * CS, 1)
                try:
                    await poll(lambda: bool(target.calls))  # a thread waits at the gate
                    job.cancel("by the test")
                    await trio.testing.wait_all_tasks_blocked()
                    assert at_end == []  # the job's end waits for the thread
                finally:
                    gate.set()
        assert job.state is JobState.CANCELLED
        assert len(at_end) == 1
        began, returned = at_end[0]
        assert began == returned > 0  # every write had returned when the job ended
    finally:
        close_job(job)
