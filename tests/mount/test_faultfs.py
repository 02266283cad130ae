"""The fault layers themselves: faultfs (tests/faultfs.py) and the small tmpfs.

The fault tests of cowfs are only as good as their faults. A fault that fires at
the wrong offset, fires twice when asked once, or leaks into other ranges would
make those tests pass or fail for the wrong reason; a filesystem that cannot be
unmounted would hang the suite. So each property the cowfs tests rely on is
checked here, against the kernel, with no cowfs involved.
"""

import errno
import fcntl
import os
import time
from pathlib import Path

import pytest
from conftest import FaultyFS, SmallFS
from helpers.mounting import wait_until

SIZE = 1 << 20


@pytest.fixture
def data(faulty: FaultyFS) -> bytes:
    """A 1 MiB file `f.img` of random bytes in the backing directory."""
    content = os.urandom(SIZE)
    faulty.backing_path("f.img").write_bytes(content)
    return content


def open_rw(faulty: FaultyFS, name: str = "f.img") -> int:
    return os.open(faulty.path(name), os.O_RDWR)


def test_read_fault_once(faulty: FaultyFS, data: bytes) -> None:
    faulty.fail("f.img", "read", offset=200_000, length=10, times=1)
    fd = open_rw(faulty)
    try:
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, 198_000)  # overlaps the range
        assert err.value.errno == errno.EIO
        assert os.pread(fd, 4096, 198_000) == data[198_000:202_096]  # once only
        assert os.pread(fd, SIZE, 0) == data
    finally:
        os.close(fd)
    state = faulty.state()
    assert [(f["hits"], f["remaining"]) for f in state["faults"]] == [(1, 0)]
    assert state["failed"] == [
        {"name": "f.img", "op": "read", "offset": 198_000, "size": 4096, "errno": errno.EIO}
    ]
    assert state["requests"]["read"] >= 3


def test_write_fault_always(faulty: FaultyFS, data: bytes) -> None:
    faulty.fail("f.img", "write", offset=65536, length=65536)
    fd = open_rw(faulty)
    try:
        for offset in (65536, 131071, 60000):  # first byte, last byte, straddling
            with pytest.raises(OSError) as err:
                os.pwrite(fd, b"x" * 8192, offset)
            assert err.value.errno == errno.EIO
        assert os.pwrite(fd, b"y" * 4096, 131072) == 4096  # just after the range
        assert os.pwrite(fd, b"y" * 4096, 65536 - 4096) == 4096  # just before it
        assert os.pread(fd, 65536, 65536) == data[65536:131072]  # reads are not affected
    finally:
        os.close(fd)
    backing = faulty.backing_path("f.img").read_bytes()
    assert backing[60000 : 65536 - 4096] == data[60000 : 65536 - 4096]
    assert backing[65536:131072] == data[65536:131072]  # nothing of the failed writes landed
    assert backing[131072:135168] == b"y" * 4096
    assert faulty.hits() == 3

    faulty.clear()
    fd = open_rw(faulty)
    try:
        assert os.pwrite(fd, b"z" * 10, 70000) == 10
    finally:
        os.close(fd)
    assert faulty.backing_path("f.img").read_bytes()[70000:70010] == b"z" * 10


def test_faults_are_per_file_and_per_operation(faulty: FaultyFS, data: bytes) -> None:
    faulty.backing_path("other.img").write_bytes(data)
    faulty.fail("f.img", "write", times=None, errno=errno.ENOSPC)
    faulty.fail("other.img", "read", offset=0, length=1, times=2, errno=errno.EROFS)
    fd, other = open_rw(faulty), open_rw(faulty, "other.img")
    try:
        assert os.pread(fd, SIZE, 0) == data
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"a", SIZE - 1)
        assert err.value.errno == errno.ENOSPC
        assert os.pwrite(other, b"b", 0) == 1
        for _ in range(2):
            with pytest.raises(OSError) as err:
                os.pread(other, 10, 0)
            assert err.value.errno == errno.EROFS
        assert os.pread(other, 10, 0) == b"b" + data[1:10]
    finally:
        os.close(fd)
        os.close(other)


def test_fsync_fault_and_delay(faulty: FaultyFS, data: bytes) -> None:
    fd = open_rw(faulty)
    try:
        os.fsync(fd)
        faulty.fail("f.img", "fsync", times=1)
        with pytest.raises(OSError) as err:
            os.fsync(fd)
        assert err.value.errno == errno.EIO
        os.fsync(fd)

        faulty.fail("f.img", "read", offset=0, length=4096, times=1, errno=0, delay=0.3)
        start = time.monotonic()
        assert os.pread(fd, 4096, 0) == data[:4096]  # slow, then fine
        assert time.monotonic() - start >= 0.3
    finally:
        os.close(fd)


def test_what_cowfs_does_to_a_source(faulty: FaultyFS, data: bytes) -> None:
    """O_RDWR, flock (emulated by the kernel), fstat, ftruncate, fsync, statfs, SEEK_*."""
    fd = open_rw(faulty)
    second = open_rw(faulty)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)

        assert os.fstat(fd).st_size == SIZE
        os.ftruncate(fd, SIZE // 2)
        assert os.fstat(fd).st_size == SIZE // 2
        assert faulty.backing_path("f.img").stat().st_size == SIZE // 2
        os.ftruncate(fd, SIZE)
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0  # all data: no lseek in pyfuse3
        assert os.lseek(fd, 0, os.SEEK_HOLE) == SIZE
        assert os.fstatvfs(fd).f_blocks == os.statvfs(faulty.backing).f_blocks
    finally:
        os.close(fd)
        os.close(second)
    assert os.listdir(faulty.mountpoint) == ["f.img"]  # the control file is hidden


def test_files_appear_and_can_be_created(faulty: FaultyFS) -> None:
    assert os.listdir(faulty.mountpoint) == []
    faulty.backing_path("late.img").write_bytes(b"late")
    assert faulty.path("late.img").read_bytes() == b"late"
    faulty.path("new.img").write_bytes(b"new")
    assert faulty.backing_path("new.img").read_bytes() == b"new"
    faulty.path("new.img").unlink()
    assert sorted(os.listdir(faulty.mountpoint)) == ["late.img"]


def test_faults_follow_a_rename(faulty: FaultyFS, data: bytes) -> None:
    """cowfs creates its target and record under a temporary name, then renames them:
    a fault on the final name must hit handles opened under the temporary one."""
    faulty.fail("final.img", "write", offset=0, length=4096)
    fd = os.open(faulty.path("tmp.img"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.pwrite(fd, b"t" * 4096, 0) == 4096  # not the faulty name yet
        os.rename(faulty.path("tmp.img"), faulty.path("final.img"))
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"u" * 4096, 0)
        assert err.value.errno == errno.EIO
        assert os.fstat(fd).st_size == 4096
        os.rename(faulty.path("f.img"), faulty.path("final.img"))  # replaces it
        assert os.pwrite(fd, b"v" * 4096, 0) == 4096  # the old file has no name now
    finally:
        os.close(fd)
    assert sorted(os.listdir(faulty.mountpoint)) == ["final.img"]
    assert faulty.path("final.img").read_bytes() == data
    dfd = os.open(faulty.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # record.write_record does this
    finally:
        os.close(dfd)


def test_bad_commands_are_refused(faulty: FaultyFS) -> None:
    for bad in (b"not json", b'{"add": [{"op": "read"}]}', b'{"add": [{"name": "x", "op": "x"}]}'):
        fd = os.open(faulty.mountpoint / ".faultfs", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as err:
                os.write(fd, bad)
            assert err.value.errno == errno.EINVAL
        finally:
            os.close(fd)
    assert faulty.state()["faults"] == []


def test_unmount_is_clean(faulty: FaultyFS, data: bytes) -> None:
    assert faulty.unmount() == 0
    assert not faulty.is_mounted()
    assert os.listdir(faulty.mountpoint) == []
    assert faulty.backing_path("f.img").read_bytes() == data


def test_sigterm_is_clean(faulty: FaultyFS) -> None:
    assert faulty.proc is not None
    faulty.proc.terminate()
    assert faulty.proc.wait(10) == 0
    wait_until(lambda: not faulty.is_mounted(), 10, "faultfs to unmount")


# -- the small filesystem ------------------------------------------------------------------


def test_small_fs_fills_and_frees(small_fs: SmallFS) -> None:
    assert 0 < small_fs.available() <= 8 << 20
    probe: Path = small_fs.path / "probe"
    small_fs.fill()
    assert small_fs.available() == 0
    with open(probe, "wb", buffering=0) as f, pytest.raises(OSError) as err:
        f.write(bytes(4096))
    assert err.value.errno == errno.ENOSPC

    small_fs.free(1 << 20)
    assert small_fs.available() >= 1 << 20
    with open(probe, "wb", buffering=0) as f:
        assert f.write(bytes(1 << 20)) == 1 << 20
    small_fs.free()
    assert small_fs.filler.stat().st_size == 0


def test_small_fs_leave_and_resize(small_fs: SmallFS) -> None:
    small_fs.fill(leave=1 << 20)
    assert 1 << 20 <= small_fs.available() < (1 << 20) + (1 << 16)
    small_fs.free()
    small_fs.resize(2 << 20)
    assert small_fs.available() <= 2 << 20
    small_fs.fill()
    assert small_fs.filler.stat().st_size <= 2 << 20


def test_inode_numbers_are_never_reused(faulty: FaultyFS) -> None:
    """A save by temp file and rename (as cowfs saves its bitmaps) must not leave two names
    with one inode number: the kernel would serve one file's data under the other name."""
    faulty.path("f.json").write_bytes(b"old")
    faulty.path("f.json.tmp").write_bytes(b"first")
    os.rename(faulty.path("f.json.tmp"), faulty.path("f.json"))  # replaces a name
    faulty.path("g.img").write_bytes(b"other")
    faulty.path("f.json.tmp").write_bytes(b"second")
    inodes = [faulty.path(n).stat().st_ino for n in ("f.json", "g.img", "f.json.tmp")]
    assert len(set(inodes)) == 3, inodes
    assert faulty.path("f.json").read_bytes() == b"first"
    assert faulty.path("g.img").read_bytes() == b"other"
