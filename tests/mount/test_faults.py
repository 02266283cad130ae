"""Real faults under a live backup, with today's default policies (issue 4).

Backups run unattended against disks that fail and fill up, and daemons die.
What must hold then (DESIGN.md, "The guarantee" and "Errors"): the guest keeps
working unless its own write failed on the source; a failed backup says
`failed` with the reason and where; a killed one never says `complete`; a target
is never corrupted; and the next job on that source works. The faults are real:
the source lies on faultfs (tests/faultfs.py), which returns EIO from the kernel
for chosen ranges; the target lies on a small tmpfs that fills up; the daemon
gets kill -9 at random moments. Only the default policies are tested here
(`--on-source-error report`, `--on-target-error report`, `--on-cbw-error
break-snapshot`); the others are in test_policies.py.
"""

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import FaultyFS, SmallFS, files_equal, make_image
from helpers.faults import BATCH, CLUSTER, FAST, PACED, SIZE
from helpers.mounting import COWFS, TIMEOUT, CowfsRunner, Mounted, pid_gone, run_cowfs, wait_until
from helpers.mounts import assert_gone, info, record, write_live


@pytest.fixture
def source(faulty: FaultyFS) -> Path:
    """A 4 MiB image without holes in faultfs's backing directory."""
    make_image(faulty.backing_path("disk.img"), SIZE, seed=41, holes=False)
    return faulty.path("disk.img")


@pytest.fixture
def before(faulty: FaultyFS, source: Path, tmp_path: Path) -> Path:
    """The source before the mount: what a complete target must equal."""
    copy = tmp_path / "before.img"
    shutil.copyfile(faulty.backing_path("disk.img"), copy)
    return copy


def state(m: Mounted) -> str:
    return m.status()["state"]


def error_offsets(errors: list[str]) -> list[int]:
    return [int(n) for e in errors for n in re.findall(r"offset (\d+)", e)]


# -- the source fails ------------------------------------------------------------------


def test_source_read_error_fails_the_job(
    cowfs: CowfsRunner, faulty: FaultyFS, source: Path, before: Path
) -> None:
    """--on-source-error report (default): the copier's read error fails the job, which
    says where; the guest's writes go on, straight to the source; finish unmounts."""
    bad = 3 * BATCH + 3 * CLUSTER + 4096
    faulty.fail("disk.img", "read", offset=bad, length=4096)
    m = cowfs.mount(source, None, "--speed", FAST)
    wait_until(lambda: state(m) == "failed", 20, "the job to fail")
    assert faulty.hits() >= 1

    # The guest does not notice: writes (even over the bad range) land in the source.
    backing = faulty.backing_path("disk.img")
    for offset in (0, bad - 100, SIZE - 5000):
        write_live(m, b"g" * 5000, offset)
        assert backing.read_bytes()[offset : offset + 5000] == b"g" * 5000
    assert m.is_mounted()

    result = m.finish()
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "failed", result.stdout
    assert_gone(m)
    assert info(m.target) == (1, "failed")
    rec = record(m.target)
    assert rec["status"] == "failed"
    assert any(errno.errorcode[errno.EIO] in e or "Input/output" in e for e in rec["errors"])
    assert any(o <= bad < o + BATCH for o in error_offsets(rec["errors"])), rec["errors"]


def test_live_file_reads_with_source_on_fuse(
    cowfs: CowfsRunner, faulty: FaultyFS, source: Path, before: Path
) -> None:
    """Prerequisite of the tests below: cowfs works at all on a source on FUSE (sshfs,
    s3ql, a FUSE export), which supports neither RWF_NOWAIT nor SEEK_DATA."""
    m = cowfs.mount(source, None, "--speed", FAST)
    assert m.live.read_bytes() == before.read_bytes()
    write_live(m, b"w" * 1000, SIZE - 1000)  # copy-before-write of the last cluster
    assert state(m) in ("running", "complete")  # a job may end while mounted
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_equal(m.target, before)


def test_target_on_fuse_works(cowfs: CowfsRunner, faulty: FaultyFS, tmp_path: Path) -> None:
    """Prerequisite of the target-fault tests: a target (created under a temporary name,
    renamed, locked, fsynced, its record beside it) on faultfs, with no fault set."""
    source = make_image(tmp_path / "disk.img", SIZE, seed=43, holes=False)
    before = tmp_path / "before.img"
    shutil.copyfile(source, before)
    m = cowfs.mount(source, faulty.path("target.img"), "--speed", FAST)
    write_live(m, b"t" * 70_000, SIZE - 70_000)
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_equal(faulty.backing_path("target.img"), before)
    assert info(m.target) == (0, "complete")


def test_guest_write_failing_on_source_gets_eio(
    cowfs: CowfsRunner, faulty: FaultyFS, source: Path, before: Path
) -> None:
    """A guest write the source refuses returns EIO to the guest, changes nothing, and
    never corrupts the target: a complete target equals the point in time, anything
    else says it is not complete."""
    bad = SIZE - BATCH + 5 * CLUSTER
    faulty.fail("disk.img", "write", offset=bad, length=4096)
    m = cowfs.mount(source, None, "--speed", PACED)
    fd = os.open(m.live, os.O_RDWR)
    try:
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x" * 4096, bad)
        assert err.value.errno == errno.EIO
        assert os.pwrite(fd, b"y" * 4096, bad + CLUSTER) == 4096  # elsewhere: fine
    finally:
        os.close(fd)
    backing = faulty.backing_path("disk.img").read_bytes()
    old = before.read_bytes()
    assert backing[bad : bad + 4096] == old[bad : bad + 4096]
    assert backing[bad + CLUSTER : bad + CLUSTER + 4096] == b"y" * 4096

    faulty.clear()
    run_cowfs("set-speed", m.mountpoint, "0")  # the point is made: no need to crawl
    result = m.finish()
    code, first = info(m.target)
    assert result.returncode == code
    if code == 0:
        assert first == "complete"
        assert files_equal(m.target, before)
    else:
        assert first in ("failed", "cancelled") or first.startswith("incomplete")
        assert record(m.target)["errors"], "a job that is not complete says why"


def test_guest_write_failing_on_source_leaves_the_job_running(
    cowfs: CowfsRunner, faulty: FaultyFS, source: Path, before: Path
) -> None:
    """The copy-before-write itself succeeded; only the guest's write failed. Nothing
    about the backup went wrong, so it completes and equals the point in time."""
    bad = SIZE - BATCH + 5 * CLUSTER
    faulty.fail("disk.img", "write", offset=bad, length=4096, times=1)
    m = cowfs.mount(source, None, "--speed", PACED)
    with pytest.raises(OSError) as err:
        write_live(m, b"x" * 4096, bad)
    assert err.value.errno == errno.EIO
    write_live(m, b"z" * 4096, bad)  # the fault fired once: the retry lands
    assert m.status()["bytes_cbw"] == CLUSTER
    assert state(m) == "running"
    run_cowfs("set-speed", m.mountpoint, "0")
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_equal(m.target, before)
    assert faulty.backing_path("disk.img").read_bytes()[bad : bad + 4096] == b"z" * 4096


def test_cbw_read_error_breaks_the_snapshot(
    cowfs: CowfsRunner, faulty: FaultyFS, source: Path, before: Path
) -> None:
    """--on-cbw-error break-snapshot (default): the old data cannot be read, so the guest
    write goes through and the backup fails, naming the I/O error."""
    bad = SIZE - 2 * CLUSTER
    faulty.fail("disk.img", "read", offset=bad, length=CLUSTER)
    m = cowfs.mount(source, None, "--speed", PACED)
    write_live(m, b"n" * 4096, bad)
    assert faulty.backing_path("disk.img").read_bytes()[bad : bad + 4096] == b"n" * 4096
    assert state(m) == "failed"
    errors = m.status()["errors"]
    assert any("copy-before-write" in e and "Input/output" in e for e in errors), errors
    write_live(m, b"m" * 4096, 0)  # from now on writes go straight to the source
    faulty.clear()
    assert m.finish().returncode == 1
    assert info(m.target) == (1, "failed")


# -- the target fills up ----------------------------------------------------------------


def test_target_full_fails_the_job_guest_writes_go_on(
    cowfs: CowfsRunner, small_fs: SmallFS, tmp_path: Path
) -> None:
    """--on-target-error report (default): the target's filesystem fills up during the
    copy (another tenant takes the space); the job fails with ENOSPC, the guest never
    sees an error, and the record says failed, with the reason."""
    source = make_image(tmp_path / "disk.img", 2 * SIZE, seed=42, holes=False)
    target = small_fs.path / "target.img"
    m = cowfs.mount(source, target, "--speed", "1M")  # slow: the copier must outlive fill()
    write_live(m, b"a" * 70_000, 2 * SIZE - 100_000)  # copy-before-write into the target
    small_fs.fill()
    status = m.status()
    assert status["bytes_done"] < status["bytes_total"], "the copier ended before the disk filled"

    def ended() -> bool:
        try:
            return state(m) != "running"
        except subprocess.CalledProcessError:
            return True  # no mount any more

    wait_until(ended, 20, "the job to notice the full target")
    assert m.is_mounted(), "the mount must outlive a full target"
    assert state(m) == "failed"
    for offset in (0, SIZE, 2 * SIZE - 4096):
        write_live(m, b"b" * 4096, offset)
    with open(source, "rb") as f:
        f.seek(SIZE)
        assert f.read(4096) == b"b" * 4096
        f.seek(2 * SIZE - 100_000)
        assert f.read(70_000) == b"a" * 70_000
    assert m.finish().returncode == 1
    assert_gone(m)
    assert info(m.target) == (1, "failed")
    assert any("No space left" in e for e in record(m.target)["errors"])
    assert sorted(p.name for p in small_fs.path.iterdir() if p.name != ".filler") == [
        "target.img",
        "target.img.cowfs.json",
        "target.img.cowfs.log",
    ]


# -- kill -9 ------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Random guest writes through the live file until stopped or the mount dies."""

    def __init__(self, live: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.live = live
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0
        self.error: OSError | None = None

    def run(self) -> None:
        fd = os.open(self.live, os.O_RDWR)
        try:
            while not self.stop.is_set():
                length = self.rng.choice([512, 4096, 65536, 131072])
                offset = self.rng.randrange(0, SIZE - length)
                os.pwrite(fd, self.rng.randbytes(length), offset)
                self.writes += 1
        except OSError as e:
            self.error = e  # expected once the daemon is killed under us; a failure before
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def target_allocated(target: Path) -> int:
    return target.stat().st_blocks * 512


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("moment", ["cbw", "copier", "finish"])
def test_kill9_never_says_complete(
    cowfs: CowfsRunner, tmp_path: Path, moment: str, seed: int
) -> None:
    """kill -9 at a random moment: the record says complete only if the job really
    completed before the kill, and then the target equals the point in time; the next
    mount of the source (--force onto the same target) works."""
    rng = random.Random(seed)
    source = make_image(tmp_path / "disk.img", SIZE, seed=seed, holes=False)
    before = tmp_path / "before.img"
    shutil.copyfile(source, before)
    # At 1M/s the copier is still far from done when the writer's first CBW lands, even
    # on a loaded machine; the other moments need no more than 4M/s.
    m = cowfs.mount(source, None, "--speed", "1M" if moment == "cbw" else "4M")
    writer = Writer(m.live, seed)
    finisher = None
    try:
        if moment == "cbw":
            writer.start()
            threshold = rng.randint(1, 8) * CLUSTER
            wait_until(
                lambda: writer.error is not None or m.status()["bytes_cbw"] >= threshold,
                20,
                "copy-before-write",
            )
            assert writer.error is None, f"guest write failed before the kill: {writer.error}"
        elif moment == "copier":
            threshold = int(rng.uniform(0.05, 0.9) * SIZE)
            wait_until(lambda: m.status()["bytes_done"] >= threshold, 20, "copier progress")
        else:
            write_live(m, rng.randbytes(100_000), rng.randrange(SIZE - 100_000))
            finisher = subprocess.Popen(
                [*COWFS, "finish", str(m.mountpoint)], stdout=subprocess.PIPE, text=True
            )
            wait_until(lambda: not m.is_mounted(), 20, "finish to unmount")
            threshold = int(rng.uniform(0.1, 1.0) * SIZE * 0.8)
            wait_until(
                lambda: pid_gone(m.pid) or target_allocated(m.target) >= threshold,
                20,
                "the copier to go on after the unmount",
            )
        completed_before_kill = pid_gone(m.pid) and info(m.target)[0] == 0
        if not pid_gone(m.pid):
            os.kill(m.pid, signal.SIGKILL)
    finally:
        writer.stop.set()
        if writer.is_alive():
            writer.join(TIMEOUT)
    m.wait_exit()
    if finisher is not None:
        out, _ = finisher.communicate(timeout=TIMEOUT)
        first_line = out.splitlines()[0]
        if completed_before_kill:
            assert first_line == "complete", out
        else:
            assert first_line.startswith("incomplete"), out
    try:
        wait_until(lambda: not m.is_mounted(), 5, "auto_unmount after kill -9")
    except TimeoutError:
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=False)
    assert not m.is_mounted()

    code, first = info(m.target)
    if completed_before_kill:
        assert (code, first) == (0, "complete")
        assert files_equal(m.target, before)
    else:
        assert code == 1, first
        assert first.startswith("incomplete"), first
        assert record(m.target)["status"] != "complete"

    again = tmp_path / "again.img"
    shutil.copyfile(source, again)
    m2 = cowfs.mount(source, None, "--speed", FAST, "--force", mountpoint=m.mountpoint)
    write_live(m2, b"2" * 4096, 0)
    result = m2.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert info(m2.target) == (0, "complete")
    assert files_equal(m2.target, again)
