"""Views (issue 11): `cowfs backup MP ... --view` shows each image at the job's point in
time as a read-only file, MP/.views/<job>/<image>, while the guest writes to the live
file (DESIGN.md, "Views").

Why these tests: a view is read while the guest writes, so a read and a write of one
cluster race for real; the only sound check is a byte comparison with a copy of the
source taken while nothing wrote, right before `backup --view`. Readers here hash the
whole view in shuffled pieces (buffered and O_DIRECT) while O_DIRECT and buffered
writers, aimed half of the time at the piece being read, overwrite the image; QEMU's
and GNU's tools read views too. Releases free a fleecing store behind a sequential
reader, measured by the store's allocated blocks. Faults are real: a full tmpfs for
the store, a slow target (faultfs) for --cbw-timeout, a failing fsync for `end`.

Two failures name their own exception, since their first versions caught real bugs:
- `ViewGoneNotEIO`: once a job has ended (end, cancel, failure), reads on a view the
  reader still has open must fail with EIO (not ENOENT, nor cached data).
- `ReleasedRangeCached`: a released range that the reader had read before must not
  read again from the page cache (views bypass it).
"""

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import TIMEOUT, CowfsRunner, ok, run_cowfs, status, wait_until
from helpers.qemu import assert_identical, check_clean, qemu_img
from helpers.views import (
    PAGE,
    KiB,
    MiB,
    Writers,
    allocated,
    assert_refused,
    backup_view,
    clusters,
    differences,
    jobs_of,
    read_direct,
    read_errno,
    read_view,
)

SIZE = 32 * MiB
FLEECING_TAIL = "complete (fleecing: overwritten clusters only)"
PACED = "2M"
"""A full copy of SIZE takes over 10 s at this speed (the copier is checked still at work
after 20 pieces of the view are read, well within a second)."""
WRITES_PER_PIECE = 3
"""Writes issued while each piece of a view is read (and done before the next): the
view is read while the image changes, throughout, and not all of it is overwritten."""

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


class ViewGoneNotEIO(AssertionError):
    """A read of an ended job's view (still open) did not fail with EIO."""


class ReleasedRangeCached(AssertionError):
    """A released range the reader had read before still read (page cache)."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pit_copy(source: Path, copy: Path) -> bytes:
    """The point-in-time copy, taken while nothing writes; returns its bytes."""
    shutil.copyfile(source, copy)
    return copy.read_bytes()


def assert_errors_eio(errors: dict[str, int | None], what: str) -> None:
    """Every read in `errors` (description -> errno or None) failed with EIO. Reads that
    returned data fail the test; ENOENT everywhere is the known bug."""
    succeeded = [k for k, e in errors.items() if e is None]
    assert not succeeded, f"{what}: reads returned data after the view was gone: {succeeded}"
    if any(e != errno.EIO for e in errors.values()):
        names = {k: errno.errorcode.get(e, e) for k, e in errors.items()}
        if all(e == errno.ENOENT for e in errors.values()):
            raise ViewGoneNotEIO(f"{what}: {names}")
        raise AssertionError(f"{what}: reads failed, but not with EIO: {names}")


def assert_view_gone(mp: Path, job: int, view: Path) -> None:
    assert not view.exists(), f"{view} outlived its job"
    assert ".views" not in os.listdir(mp), os.listdir(mp)
    for j in jobs_of(mp, job).values():
        assert j["view"] is None and j["dirty_extents"] is None, j


def open_reader(view: Path) -> tuple[int, int]:
    """A reader's two handles on a view: buffered and O_DIRECT."""
    fd = os.open(view, os.O_RDONLY)
    try:
        return fd, os.open(view, os.O_RDONLY | os.O_DIRECT)
    except BaseException:
        os.close(fd)
        raise


# -- 1. the view is the point in time, whatever the writers do -------------------------------


CASES = [
    ("none", 1),
    ("none", 2),
    ("full", 3),
    ("full", 4),
    ("incremental", 5),
    ("incremental", 6),
    ("top", 7),
]


@pytest.mark.parametrize(("mode", "seed"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_view_is_the_point_in_time_under_writers(
    cowfs: CowfsRunner, tmp_path: Path, mode: str, seed: int
) -> None:
    """A reader hashes the whole view in shuffled pieces, buffered and O_DIRECT, while an
    O_DIRECT writer and two buffered writers (1 B to 1 MiB, overlapping, half of them
    aimed at the piece being read) overwrite the live file: the hash is the PIT copy's.
    Full: the copier is still running (paced) while the view is read; incremental: the
    `.dirty` file lists exactly the clusters written since the full backup. `end` then
    says complete (exit 0), the view goes, and the target restores the PIT copy."""
    rng = random.Random(seed)
    size = SIZE + (5000 if seed % 2 else 0)  # a last partial cluster, and a page's tail
    cluster = {"full": [4 * KiB, 64 * KiB], "incremental": [0]}.get(mode, [4 * KiB, 256 * KiB])
    cluster = rng.choice(cluster)
    where = f"seed {seed}, {mode}, cluster {cluster or 'default'}, size {size}"
    src = make_image(tmp_path / "vda.img", size, seed)
    mp = tmp_path / "mnt"
    m = cowfs.serve(mp, src)
    assert os.listdir(mp) == ["vda.img"], where

    args: list[str] = ["--sync", mode]
    between: list[tuple[int, int]] = []
    if cluster:
        args += ["--cluster-size", str(cluster)]
    if mode == "full":
        fmt = rng.choice(["raw", "qcow2"])
        target = tmp_path / f"full.{fmt}"
        args += ["--speed", PACED] + (["--compress"] if fmt == "qcow2" else [])
    elif mode == "incremental":
        full = tmp_path / "full.qcow2"
        ok("backup", mp, "--target", full, "--bitmap", "nightly", "--wait")
        cluster = rng.choice([64 * KiB, 128 * KiB])
        fd = os.open(m.live, os.O_WRONLY)
        try:
            for _ in range(12):
                offset = rng.randrange(size)
                data = rng.randbytes(min(int(2 ** rng.uniform(0, 18)), size - offset))
                os.pwrite(fd, data, offset)
                between.append((offset, len(data)))
            os.fsync(fd)
        finally:
            os.close(fd)
        target = tmp_path / "inc.qcow2"
        args += ["--bitmap", "nightly", "--backing", str(full)]
        args += ["--cluster-size", str(cluster)]
    else:
        target = tmp_path / f"{mode}.img"

    pit = pit_copy(src, tmp_path / "pit.img")
    job, views = backup_view(mp, "--target", target, *args)
    assert views == [mp / ".views" / str(job) / "vda.img"], (where, views)
    (view,) = views
    (j,) = jobs_of(mp, job).values()
    assert j["state"] == "running" and j["view"] == str(view), (where, j)
    dirty = Path(str(view) + ".dirty")
    if mode == "incremental":
        assert j["dirty_extents"] == str(dirty), (where, j)
        assert sorted(os.listdir(view.parent)) == ["vda.img", "vda.img.dirty"]
        check_dirty_file(dirty, clusters(between, cluster), cluster, size, where)
    else:
        assert j["dirty_extents"] is None, (where, j)
        assert os.listdir(view.parent) == ["vda.img"], where
    assert sorted(os.listdir(mp)) == [".views", "vda.img"], where
    text = ok("status", mp).stdout
    assert f"view: {view} (until `cowfs end`)" in text, (where, text)
    assert (f"dirty extents: {dirty}" in text) == (mode == "incremental"), (where, text)
    st = view.stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444, (where, st)
    assert st.st_size == size, (where, st)
    pit_ns = int(datetime.fromisoformat(j["point_in_time"]).timestamp() * 1e9)
    assert abs(st.st_mtime_ns - pit_ns) < 1000, (where, st.st_mtime_ns, j["point_in_time"])

    reading = {"at": 0, "pieces": 0}
    with Writers(m.live, size, seed, hot=lambda: reading["at"], paced=True) as writers:
        writers.grant(WRITES_PER_PIECE)
        writers.settle()

        def before(offset: int, length: int) -> None:
            reading["at"] = offset + rng.randrange(length)
            writers.grant(WRITES_PER_PIECE)  # written while the piece is read

        def after(offset: int, length: int) -> None:
            writers.settle()
            reading["pieces"] += 1
            if mode == "full" and reading["pieces"] == 20:  # the copier is still at work
                (j,) = jobs_of(mp, job).values()
                assert j["state"] == "running", (where, j)
                assert j["bytes_copier"] > 0 and j["bytes_done"] < j["bytes_total"], (where, j)

        data = read_view(view, size, rng, before, after)
    assert not writers.errors, (where, writers.errors)
    written = writers.touched(cluster or 64 * KiB)
    assert len(written) > 20, (where, "the writers barely wrote")
    assert sha(data) == sha(pit), (
        f"{where}: the view is not the point in time; 4 KiB blocks that differ at "
        f"{differences(data, pit)}"
    )
    assert src.read_bytes() != pit, where

    if mode in ("full", "top"):
        ok("set-speed", mp, "64M", str(job))  # `end` still waits for the copier's rest
    ended = ok("end", mp, str(job))
    assert ended.stdout.splitlines()[0] == (FLEECING_TAIL if mode == "none" else "complete"), (
        where,
        ended.stdout,
    )
    assert_view_gone(mp, job, view)
    assert not dirty.exists(), where
    (j,) = jobs_of(mp, job).values()
    assert j["state"] == "complete", (where, j)

    if mode == "incremental":  # complete: the bitmap now holds the writes since the PIT
        (image,) = status(mp)["images"]
        (nightly,) = [b for b in image["bitmaps"] if b["name"] == "nightly"]
        since = clusters(writers.intended, 64 * KiB)
        clamped = sum(min(64 * KiB, size - c * 64 * KiB) for c in since)
        assert nightly["consistent"], (where, nightly)
        assert nightly["dirty_bytes"] in (clamped, len(since) * 64 * KiB), (where, nightly)

    pit_file = tmp_path / "pit.img"
    if mode == "none":
        check_fleecing_store(target, pit, written, cluster, where)
    elif target.suffix == ".qcow2":
        check_clean(target)
        assert_identical(target, pit_file)
    else:
        assert files_equal(target, pit_file), where


def check_dirty_file(dirty: Path, expected: set[int], cluster: int, size: int, where: str) -> None:
    """`<image>.dirty`: read-only JSON extents, sorted and coalesced, of exactly the
    clusters written since the bitmap's point in time."""
    text = dirty.read_bytes()
    assert dirty.stat().st_size == len(text), where
    assert stat.S_IMODE(dirty.stat().st_mode) == 0o444, where
    extents = json.loads(text)
    assert isinstance(extents, list) and extents, (where, extents)
    listed: set[int] = set()
    end = -1
    for extent in extents:
        assert set(extent) == {"offset", "length"}, (where, extent)
        offset, length = extent["offset"], extent["length"]
        assert offset % cluster == 0 and offset > end, (where, "unsorted or adjacent", extents)
        assert length % cluster == 0 or offset + length == size, (where, extent)
        listed |= clusters([(offset, length)], cluster)
        end = offset + length
    assert listed == expected, (where, sorted(listed ^ expected))
    with pytest.raises(OSError) as e:
        os.open(dirty, os.O_WRONLY)
    assert e.value.errno == errno.EROFS, where


def check_fleecing_store(
    store: Path, pit: bytes, written: set[int], cluster: int, where: str
) -> None:
    """A raw --sync none store holds the old content of every overwritten cluster and
    zeros everywhere else (a view's reads copy nothing)."""
    data = store.read_bytes()
    assert len(data) == len(pit), where
    bad = []
    for c in range(-(-len(pit) // cluster)):
        piece = slice(c * cluster, (c + 1) * cluster)
        want = pit[piece] if c in written else bytes(len(data[piece]))
        if data[piece] != want:
            bad.append(c)
    assert not bad, f"{where}: store clusters wrong (overwritten: {bad[0] in written}): {bad[:8]}"


# -- 2. tools read views ----------------------------------------------------------------------


@needs_qemu_img
@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
@pytest.mark.parametrize("mode", ["none", "full-copied"])
def test_tools_read_a_view(cowfs: CowfsRunner, tmp_path: Path, mode: str) -> None:
    """While writers overwrite the live file, `qemu-img convert -O raw` of a view and
    `tar` of it into a directory (and out again) both give the PIT image; tar finds
    the file unchanged while it read it, and keeps its mtime: the point in time. `none`:
    a fleecing view; `full-copied`: a full job into qcow2 whose copier is done, which
    stays open (running) until `end`."""
    seed = 21 if mode == "none" else 22
    src = make_image(tmp_path / "disk.img", SIZE, seed)
    mp = tmp_path / "mnt"
    m = cowfs.serve(mp, src)
    pit = pit_copy(src, tmp_path / "pit.img")
    if mode == "none":
        target = tmp_path / "store.img"
        job, (view,) = backup_view(mp, "--target", target, "--sync", "none")
    else:
        target = tmp_path / "full.qcow2"
        job, (view,) = backup_view(mp, "--target", target)

        def copied() -> bool:
            (j,) = jobs_of(mp, job).values()
            return j["bytes_done"] == j["bytes_total"]

        wait_until(copied, 20, "the copier to finish")
    (j,) = jobs_of(mp, job).values()
    assert j["state"] == "running" and j["view"] == str(view), j  # open until `end`
    out = tmp_path / "out"
    out.mkdir()
    archive = tmp_path / "view.tar"
    with Writers(m.live, SIZE, seed) as writers:
        writers.wait_for(5)
        converted = qemu_img("convert", "-f", "raw", "-O", "raw", view, out / "converted.raw")
        assert converted.returncode == 0, converted.stderr
        writers.wait_for(5)
        packed = subprocess.run(
            ["tar", "-C", str(view.parent), "-cf", str(archive), view.name],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert packed.returncode == 0, packed.stderr  # 1: "file changed as we read it"
        writers.wait_for(5)
    assert not writers.errors, writers.errors
    unpacked = subprocess.run(
        ["tar", "-C", str(out), "-xf", str(archive)], capture_output=True, text=True
    )
    assert unpacked.returncode == 0, unpacked.stderr
    for name in ("converted.raw", "disk.img"):
        got = (out / name).read_bytes()
        assert sha(got) == sha(pit), f"{mode}, {name}: blocks differ at {differences(got, pit)}"
    pit_s = int(datetime.fromisoformat(j["point_in_time"]).timestamp())
    assert int((out / "disk.img").stat().st_mtime) == pit_s
    assert src.read_bytes() != pit
    ended = ok("end", mp, str(job))
    assert ended.stdout.splitlines()[0] == (FLEECING_TAIL if mode == "none" else "complete")
    assert_view_gone(mp, job, view)
    if mode != "none":
        assert_identical(target, tmp_path / "pit.img")


# -- 3. release behind a sequential reader ----------------------------------------------------


STEP = 2 * MiB
"""The sequential reader's piece, released once read."""
BLOCK = 256 * KiB
"""The writer overwrites the image in blocks of this size, in random order."""
SLACK = 2 * MiB
"""What the store may hold beyond the overwritten, unreleased clusters: a copy in
flight when its cluster is released may land after the hole is punched."""


class Stopping(threading.Event):
    """A writer's stop flag that also wakes a writer waiting in the pacer."""

    def __init__(self, pacer: "Pacer") -> None:
        super().__init__()
        self.pacer = pacer

    def set(self) -> None:
        super().set()
        self.pacer.close()


class Pacer:
    """Hands the writer the image's blocks in random order, so many per step of the
    reader, and small writes near the reader in between: everything gets overwritten,
    ahead of the reader (copied into the store) and behind it (released: no copy)."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.blocks = [(o, min(BLOCK, size - o)) for o in range(0, size, BLOCK)]
        rng.shuffle(self.blocks)
        self.size = size
        self.cond = threading.Condition()
        self.allowed = 0
        self.at = 0
        self.closed = False
        self.picked = 0
        self.stopping = Stopping(self)

    def allow(self, blocks: int) -> None:
        with self.cond:
            self.allowed += blocks
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def pick(self, rng: random.Random) -> tuple[int, int] | None:
        with self.cond:
            if rng.random() < 0.3:  # a small write where the reader is: races its release
                offset = max(0, min(self.size - 1, self.at + rng.randrange(-STEP, STEP)))
                self.picked += 1
                return offset, min(rng.randrange(1, 128 * KiB), self.size - offset)
            self.cond.wait_for(lambda: self.allowed > 0 or self.closed)
            if not self.blocks or (self.allowed <= 0 and self.closed):
                return None
            self.allowed -= 1
            self.picked += 1
            return self.blocks.pop()

    def step_written(self, writers: Writers) -> bool:
        """The blocks allowed so far are written (called under the writers' lock)."""
        return self.picked == len(writers.intended) and (self.allowed == 0 or not self.blocks)


def test_release_behind_a_sequential_reader(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """A --sync none view into a raw store, read sequentially, each piece released once
    read, while a writer overwrites the whole image: the store's allocated size never
    exceeds the overwritten, unreleased clusters plus a little, so it ends almost
    empty; released clusters read EIO (O_DIRECT, bypassing the page cache); every piece
    read before its release is the PIT's."""
    seed = 31
    rng = random.Random(seed)
    size = SIZE - 20000  # the last cluster is partial: releasing up to the end frees it
    cluster = 64 * KiB
    src = tmp_path / "vda.img"
    src.write_bytes(rng.randbytes(size))  # every cluster data: every overwrite copies
    mp = tmp_path / "mnt"
    m = cowfs.serve(mp, src)
    pit = pit_copy(src, tmp_path / "pit.img")
    store = tmp_path / "store.img"
    job, (view,) = backup_view(mp, "--target", store, "--sync", "none")

    pacer = Pacer(size, rng)
    steps = -(-size // STEP)
    per_step = -(-len(pacer.blocks) // steps)
    released: set[int] = set()
    trace = []
    fd, dfd = open_reader(view)
    writers = Writers(m.live, size, seed, kinds=("buffered",), pick=pacer.pick)
    writers.stopping = pacer.stopping  # stopping the writer wakes it from the pacer
    try:
        with writers:
            for step in range(steps):
                offset = step * STEP
                length = min(STEP, size - offset)
                pacer.at = offset
                pacer.allow(per_step)
                data = os.pread(fd, length, offset)
                assert data == pit[offset : offset + length], (
                    f"seed {seed}: piece at {offset} is not the PIT's: "
                    f"{differences(data, pit[offset : offset + length])}"
                )
                # This step's blocks are written: some ahead of the reader, some behind.
                writers.wait_until(lambda: pacer.step_written(writers), "the step's end")
                ok("release", mp, str(job), str(offset), str(length))
                released |= clusters([(offset, length)], cluster)
                have = allocated(store)
                unreleased = writers.touched(cluster) - released
                bound = len(unreleased) * cluster + SLACK
                trace.append((step, have, bound))
                assert have <= bound, f"seed {seed}: the store outgrew its bound: {trace}"
                probe = rng.choice(sorted(released))
                got = read_errno(dfd, probe * cluster, PAGE, direct=True)
                assert got == errno.EIO, f"released cluster {probe} read: {got}"
            pacer.allow(len(pacer.blocks))
            pacer.close()
        assert not writers.errors, writers.errors
    finally:
        pacer.close()
        os.close(fd)
        os.close(dfd)
    assert not pacer.blocks, "the writer did not overwrite everything"
    assert max(have for _, have, _ in trace) >= 4 * MiB, f"nothing to free: {trace}"
    assert allocated(store) <= SLACK, f"seed {seed}: store left {allocated(store)}: {trace}"
    tail = (size - 1) // cluster * cluster  # the partial last cluster was released too
    assert read_errno(view, tail, PAGE, direct=True) == errno.EIO
    ended = ok("end", mp, str(job))
    assert ended.stdout.splitlines()[0] == FLEECING_TAIL, ended.stdout
    assert_view_gone(mp, job, view)


def test_release_frees_whole_clusters_only(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """A release frees the whole clusters inside its range: partial ones at its ends
    stay readable (and still protected: an overwrite there is copied); from the last
    cluster on, the range may run past the end. Releasing twice is harmless."""
    cluster = 64 * KiB
    size = 8 * MiB + 3000
    src = tmp_path / "vda.img"
    src.write_bytes(random.Random(41).randbytes(size))
    mp = tmp_path / "mnt"
    m = cowfs.serve(mp, src)
    pit = pit_copy(src, tmp_path / "pit.img")
    store = tmp_path / "store.img"
    job, (view,) = backup_view(mp, "--target", store, "--sync", "none")

    ok("release", mp, str(job), str(3 * cluster + 1), str(3 * cluster))  # frees 4 and 5 only
    ok("release", mp, str(job), str(3 * cluster + 1), str(3 * cluster))
    ok("release", mp, str(job), str(size - 3000 - cluster // 2), str(1 << 40))  # the tail
    last = (size - 1) // cluster
    fd = os.open(view, os.O_RDONLY | os.O_DIRECT)
    try:
        readable = [3, 6, last - 1]
        for c in readable:
            assert read_direct(fd, c * cluster, cluster) == pit[c * cluster : (c + 1) * cluster]
        for c in (4, 5, last):
            assert read_errno(fd, c * cluster, PAGE, direct=True) == errno.EIO, c
        # Partial clusters were not released: overwriting them copies the old content.
        with open(m.live, "r+b", buffering=0) as live:
            for c in readable:
                live.seek(c * cluster + 100)
                live.write(b"\xff" * 10)
        for c in readable:
            assert read_direct(fd, c * cluster, cluster) == pit[c * cluster : (c + 1) * cluster]
    finally:
        os.close(fd)
    data = store.read_bytes()
    for c in readable:
        assert data[c * cluster : (c + 1) * cluster] == pit[c * cluster : (c + 1) * cluster]
    ended = ok("end", mp, str(job))
    assert ended.stdout.splitlines()[0] == FLEECING_TAIL, ended.stdout


def test_released_range_read_before_fails_again(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """A range the reader read, then released, fails with EIO when read again the
    ordinary way (buffered, a fresh open), not only with O_DIRECT."""
    src = tmp_path / "vda.img"
    src.write_bytes(random.Random(51).randbytes(4 * MiB))
    mp = tmp_path / "mnt"
    cowfs.serve(mp, src)
    job, (view,) = backup_view(mp, "--target", tmp_path / "store.img", "--sync", "none")
    with open(view, "rb") as f:
        assert f.read(MiB) == src.read_bytes()[:MiB]
    ok("release", mp, str(job), "0", "1M")
    assert read_errno(view, 0, PAGE, direct=True) == errno.EIO
    got = read_errno(view, 0, PAGE)
    if got is None:
        raise ReleasedRangeCached("a buffered read of released cluster 0 returned data")
    assert got == errno.EIO, errno.errorcode.get(got, got)


# -- 4. faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cause", ["full-store", "cbw-timeout"])
def test_failed_job_fails_its_view_not_the_guest(
    request: pytest.FixtureRequest, cowfs: CowfsRunner, tmp_path: Path, cause: str
) -> None:
    """The job fails under writers — its fleecing store on an 8 MiB tmpfs fills up (the
    default break-snapshot policy), or a copy-before-write to a slow store outlasts
    --cbw-timeout — while a reader has the view open: every guest write succeeds, the
    record and status say failed and why, `end` and `release` are refused, the view and
    `.views` go, and the reader's later reads fail with EIO, never data."""
    seed = 61 if cause == "full-store" else 62
    size = SIZE if cause == "full-store" else 8 * MiB
    src = tmp_path / "vda.img"
    src.write_bytes(random.Random(seed).randbytes(size))
    mp = tmp_path / "mnt"
    m = cowfs.serve(mp, src)
    pit = pit_copy(src, tmp_path / "pit.img")
    args = ["--sync", "none"]
    if cause == "full-store":
        store = request.getfixturevalue("small_fs").path / "store.img"
        why = "No space left on device"
    else:
        faulty = request.getfixturevalue("faulty")
        store = faulty.path("store.img")
        args += ["--cbw-timeout", "0.2"]
        why = "took over 0.2 s"
    job, (view,) = backup_view(mp, "--target", store, *args)
    fd, dfd = open_reader(view)
    try:
        half = size // 2
        assert os.pread(fd, half, 0) == pit[:half]
        if cause == "cbw-timeout":
            faulty.fail("store.img", op="write", errno=0, delay=1.0)

        def failed() -> bool:
            (j,) = jobs_of(mp, job).values()
            return j["state"] == "failed"

        with Writers(m.live, size, seed) as writers:
            wait_until(failed, 20, f"the job to fail ({cause})")
            writers.wait_for(10)  # and the guest goes on writing
        assert not writers.errors, writers.errors
        (j,) = jobs_of(mp, job).values()
        assert any(why in e for e in j["errors"]), j["errors"]
        assert j["view"] is None, j
        rec = json.loads(Path(f"{store}.cowfs.json").read_text())
        assert rec["status"] == "failed" and any(why in e for e in rec["errors"]), rec
        info = run_cowfs("info", store)
        assert info.returncode == 1 and info.stdout.startswith("failed"), info.stdout
        assert_refused(run_cowfs("end", mp, str(job)), "end of a failed job")
        assert_refused(run_cowfs("release", mp, str(job), "0", "64K"), "release, failed job")
        assert_view_gone(mp, job, view)
        with open(m.live, "r+b", buffering=0) as live:  # the live file is fine
            live.seek(size - 5)
            live.write(b"after")
            live.seek(size - 5)
            assert live.read(5) == b"after"
        errors = {
            "buffered, read before": read_errno(fd, 0, PAGE),
            "buffered, never read": read_errno(fd, size - PAGE, PAGE),
            "O_DIRECT": read_errno(dfd, half, PAGE, direct=True),
        }
    finally:
        os.close(fd)
        os.close(dfd)
    assert_errors_eio(errors, f"the view of the failed job ({cause})")


def test_view_is_read_only(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """Opening a view for writing or truncating, truncate, chmod, chown and utime all
    fail with EROFS and change nothing."""
    src = make_image(tmp_path / "vda.img", 4 * MiB, seed=71)
    mp = tmp_path / "mnt"
    cowfs.serve(mp, src)
    pit = pit_copy(src, tmp_path / "pit.img")
    job, (view,) = backup_view(mp, "--target", tmp_path / "store.img", "--sync", "none")
    before = view.stat()
    attempts = {
        "open O_WRONLY": lambda: os.close(os.open(view, os.O_WRONLY)),
        "open O_RDWR": lambda: os.close(os.open(view, os.O_RDWR)),
        "open O_WRONLY|O_TRUNC": lambda: os.close(os.open(view, os.O_WRONLY | os.O_TRUNC)),
        "open O_RDONLY|O_TRUNC": lambda: os.close(os.open(view, os.O_RDONLY | os.O_TRUNC)),
        "open O_WRONLY|O_APPEND": lambda: os.close(os.open(view, os.O_WRONLY | os.O_APPEND)),
        "truncate": lambda: os.truncate(view, 0),
        "chmod": lambda: os.chmod(view, 0o644),
        "chown": lambda: os.chown(view, 1, 1),
        "utime": lambda: os.utime(view, (0, 0)),
    }
    wrong = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            wrong[name] = "succeeded"
        except OSError as e:
            if e.errno != errno.EROFS:
                wrong[name] = errno.errorcode.get(e.errno, e.errno)
    assert not wrong, f"not EROFS: {wrong}"
    after = view.stat()
    assert (after.st_size, after.st_mode, after.st_uid, after.st_mtime_ns) == (
        before.st_size,
        before.st_mode,
        before.st_uid,
        before.st_mtime_ns,
    )
    assert view.read_bytes() == pit
    assert src.read_bytes() == pit
    ok("end", mp, str(job))


@pytest.mark.parametrize("how", ["end", "cancel"])
def test_end_or_cancel_while_a_reader_has_the_view_open(
    cowfs: CowfsRunner, tmp_path: Path, how: str
) -> None:
    """`end` (of a --sync none view: exit 0, the record says complete) or `cancel` (of a
    paced full one: the record says cancelled) while a reader holds the view open and a
    writer writes: the view and `.views` go, a second end or cancel is refused, and the
    reader's later reads fail with EIO."""
    seed = 81 if how == "end" else 82
    size = 8 * MiB
    src = make_image(tmp_path / "vda.img", size, seed)
    mp = tmp_path / "mnt"
    m = cowfs.serve(mp, src)
    pit = pit_copy(src, tmp_path / "pit.img")
    target = tmp_path / "t.img"
    args = ["--sync", "none"] if how == "end" else ["--speed", "1M"]
    job, (view,) = backup_view(mp, "--target", target, *args)
    fd, dfd = open_reader(view)
    try:
        with Writers(m.live, size, seed) as writers:
            writers.wait_for(10)
            assert os.pread(fd, size // 2, 0) == pit[: size // 2]
            result = ok(how, mp, str(job))
            writers.wait_for(10)
        assert not writers.errors, writers.errors
        first = result.stdout.splitlines()[0]
        assert first == (FLEECING_TAIL if how == "end" else "cancelled"), result.stdout
        rec = json.loads(Path(f"{target}.cowfs.json").read_text())
        assert rec["status"] == ("complete" if how == "end" else "cancelled"), rec
        assert_view_gone(mp, job, view)
        assert_refused(run_cowfs("end", mp, str(job)), f"end after {how}")
        assert_refused(run_cowfs("cancel", mp, str(job)), f"cancel after {how}")
        errors = {
            "buffered, read before": read_errno(fd, 0, PAGE),
            "buffered, never read": read_errno(fd, size - PAGE, PAGE),
            "O_DIRECT": read_errno(dfd, 0, PAGE, direct=True),
        }
    finally:
        os.close(fd)
        os.close(dfd)
    assert_errors_eio(errors, f"the view after {how}")


def test_end_exits_1_when_the_job_fails_at_its_end(
    faulty, cowfs: CowfsRunner, tmp_path: Path
) -> None:
    """A full view job whose copier is done ends on `end`; the target's fsync fails
    (faultfs): `end` exits 1 and prints the failed record."""
    src = make_image(tmp_path / "vda.img", 4 * MiB, seed=91)
    mp = tmp_path / "mnt"
    cowfs.serve(mp, src)
    target = faulty.path("t.img")
    job, (view,) = backup_view(mp, "--target", target)

    def copied() -> bool:
        (j,) = jobs_of(mp, job).values()
        return j["bytes_done"] == j["bytes_total"]

    wait_until(copied, 20, "the copier to finish")
    faulty.fail("t.img", op="fsync")
    ended = run_cowfs("end", mp, str(job))
    assert ended.returncode == 1, (ended.stdout, ended.stderr)
    assert ended.stdout.startswith("failed"), ended.stdout
    assert "fsync" in ended.stdout, ended.stdout
    assert faulty.hits() >= 1
    assert_view_gone(mp, job, view)


def test_release_and_end_refusals(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """Refusals exit 2 with one line and change nothing: `release` of a full job's view,
    of a bad range, of an unknown job or image, of a job without a view, after `end`;
    `end` of a job that ends by itself (no view, not --sync none), of a mount without
    jobs. `end` of a --sync none job without a view is allowed."""
    src = make_image(tmp_path / "vda.img", 4 * MiB, seed=101)
    size = 4 * MiB
    mp = tmp_path / "mnt"
    cowfs.serve(mp, src)
    pit = pit_copy(src, tmp_path / "pit.img")
    assert_refused(run_cowfs("end", mp), "end without any job")

    job, _ = backup_view(mp, "--target", tmp_path / "full.img", "--speed", "1M")
    line = assert_refused(run_cowfs("release", mp, str(job), "0", "64K"), "release, full")
    assert "--sync none" in line, line
    ok("cancel", mp, str(job))

    plain = tmp_path / "plain.img"
    result = ok("backup", mp, "--target", plain, "--speed", "1M")
    (job_line,) = result.stdout.splitlines()  # no view: no path printed
    plain_job = int(job_line)
    line = assert_refused(run_cowfs("end", mp, str(plain_job)), "end of a plain full job")
    assert "ends by itself" in line, line
    assert jobs_of(mp, plain_job)["vda.img"]["state"] == "running"
    assert_refused(run_cowfs("release", mp, str(plain_job), "0", "64K"), "release, no view")
    ok("cancel", mp, str(plain_job))

    job, (view,) = backup_view(mp, "--target", tmp_path / "store.img", "--sync", "none")
    for args in (
        ["0", "0"],
        [str(size), "64K"],
        [str(size + MiB), "1"],
        ["-1", "64K"],
        ["0", "-64K"],
        ["abc", "64K"],
        ["0", "64K", "--image", "other.img"],
    ):
        assert_refused(run_cowfs("release", mp, str(job), *args), f"release {args}")
    assert_refused(run_cowfs("release", mp, str(job + 7), "0", "64K"), "release, no such job")
    assert view.read_bytes() == pit  # nothing was released
    ok("end", mp, str(job))
    assert_refused(run_cowfs("release", mp, str(job), "0", "64K"), "release after end")

    result = ok("backup", mp, "--target", tmp_path / "fleece.img", "--sync", "none")
    none_job = int(result.stdout.split()[0])
    assert ".views" not in os.listdir(mp)
    assert_refused(run_cowfs("release", mp, str(none_job), "0", "64K"), "release, none no view")
    ended = ok("end", mp)  # the running one
    assert ended.stdout.splitlines()[0] == FLEECING_TAIL, ended.stdout


# -- 5. the .views directory; several images ---------------------------------------------------


def test_views_directory_only_while_a_view_is_open(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """`.views` is neither listed nor found while no view is open: on a fresh mount,
    during a job without a view, and once the view's job has ended."""
    src = make_image(tmp_path / "vda.img", 4 * MiB, seed=111)
    mp = tmp_path / "mnt"
    cowfs.serve(mp, src)

    def no_views() -> None:
        assert os.listdir(mp) == ["vda.img"]
        assert not (mp / ".views").exists()
        with pytest.raises(FileNotFoundError):
            os.lstat(mp / ".views")

    no_views()
    result = ok("backup", mp, "--target", tmp_path / "plain.img", "--speed", "1M")
    plain = int(result.stdout.split()[0])
    no_views()
    assert jobs_of(mp, plain)["vda.img"]["view"] is None
    ok("cancel", mp, str(plain))
    no_views()

    job, (view,) = backup_view(mp, "--target", tmp_path / "store.img", "--sync", "none")
    assert sorted(os.listdir(mp)) == [".views", "vda.img"]
    st = os.stat(mp / ".views")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555
    assert os.listdir(mp / ".views") == [str(job)]
    assert os.listdir(mp / ".views" / str(job)) == ["vda.img"]
    assert not (mp / ".views" / str(job + 1)).exists()
    assert not (mp / ".views" / str(job) / "vda.img.dirty").exists()
    ok("end", mp, str(job))
    no_views()
    assert not view.exists()

    named = tmp_path / "other" / ".views"
    named.parent.mkdir()
    shutil.copyfile(src, named)
    other = tmp_path / "mnt-other"
    other.mkdir()
    line = assert_refused(run_cowfs("mount", named, other), "an image named .views")
    assert ".views" in line, line
    assert not os.listdir(other) and not os.path.ismount(other)


def test_two_images_two_views(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """`backup --view` of a mount of two images prints two view paths, one per image,
    both the images' point in time under writers on both; `release` must name the
    image; `end` prints both records and exits 0."""
    a = make_image(tmp_path / "a.img", 16 * MiB, seed=121)
    b = make_image(tmp_path / "b.img", 8 * MiB + 4096, seed=122)
    mp = tmp_path / "mnt"
    cowfs.serve(mp, a, b)
    pits = {"a.img": pit_copy(a, tmp_path / "a.pit"), "b.img": pit_copy(b, tmp_path / "b.pit")}
    targets = {"a.img": tmp_path / "a-store.img", "b.img": tmp_path / "b-store.img"}
    job, views = backup_view(
        mp, "--sync", "none", *[f"--target={n}={t}" for n, t in targets.items()]
    )
    assert views == [mp / ".views" / str(job) / "a.img", mp / ".views" / str(job) / "b.img"]
    assert sorted(os.listdir(mp / ".views" / str(job))) == ["a.img", "b.img"]
    jobs = jobs_of(mp, job)
    assert {n: j["view"] for n, j in jobs.items()} == {v.name: str(v) for v in views}

    rng = random.Random(123)
    with (
        Writers(mp / "a.img", len(pits["a.img"]), 124, paced=True) as wa,
        Writers(mp / "b.img", len(pits["b.img"]), 125, ("direct", "buffered"), paced=True) as wb,
    ):

        def before(offset: int, length: int) -> None:
            wa.grant(2)
            wb.grant(2)

        def after(offset: int, length: int) -> None:
            wa.settle()
            wb.settle()

        for view in views:
            size = len(pits[view.name])
            data = read_view(view, size, rng, before, after)
            assert sha(data) == sha(pits[view.name]), (
                f"{view.name}: blocks differ at {differences(data, pits[view.name])}"
            )
    assert not wa.errors and not wb.errors, wa.errors + wb.errors

    line = assert_refused(run_cowfs("release", mp, str(job), "0", "64K"), "release, 2 images")
    assert "a.img" in line and "b.img" in line, line
    ok("release", mp, str(job), "0", "64K", "--image", "b.img")
    assert read_errno(views[1], 0, PAGE, direct=True) == errno.EIO
    assert read_direct_ok(views[0], pits["a.img"])
    ended = ok("end", mp, str(job))
    heads = [line for line in ended.stdout.splitlines() if line.startswith("complete")]
    assert heads == [FLEECING_TAIL] * 2, ended.stdout
    targets_printed = [line for line in ended.stdout.splitlines() if line.startswith("target:")]
    assert len(targets_printed) == 2, ended.stdout
    for view in views:
        assert_view_gone(mp, job, view)


def read_direct_ok(view: Path, pit: bytes) -> bool:
    fd = os.open(view, os.O_RDONLY | os.O_DIRECT)
    try:
        return read_direct(fd, 0, 64 * KiB) == pit[: 64 * KiB]
    finally:
        os.close(fd)
