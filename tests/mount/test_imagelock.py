"""QEMU-compatible image locks, both directions, with real qemu-io and qemu-storage-daemon.

OFD locks belong to an open file description, not to a process: the locks this test
process takes through `lock_image` conflict with the qemu-io children it starts exactly as
a cowfs daemon's would. What QEMU holds is read from /proc/locks by the image's inode.
"""

import fcntl
import os
import struct
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.mounting import TIMEOUT, run_cowfs, wait_until
from helpers.qemu import qemu_io_holding

from cowfs.errors import CowfsError
from cowfs.imagelock import Role, lock_image

SIZE = 1 << 20
PATTERN = 0x5A


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes([PATTERN]) * SIZE)
    return path


def held_ranges(path: Path) -> Counter[tuple[int, int]]:
    """The byte ranges locked on `path` by anyone, from /proc/locks (start, end inclusive)."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        rows = [line.split() for line in f if "->" not in line]
    return Counter((int(row[-2]), int(row[-1])) for row in rows if row[-3] == device)


def qemu_io(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-io", "-f", "raw", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT
    )


@contextmanager
def locked(path: Path, role: Role) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        lock_image(fd, path, role)
        yield fd
    finally:
        os.close(fd)


@contextmanager
def storage_daemon_exporting(path: Path, workdir: Path) -> Iterator[subprocess.Popen]:
    """qemu-storage-daemon serving `path` as a writable NBD export, as a VM host would.

    Ready once its pid file exists: QSD writes it after the block nodes and exports are
    created (documented ordering)."""
    pidfile = workdir / "qsd.pid"
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"file,node-name=disk,filename={path}",
            "--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}",
            "--export", "nbd,id=exp,node-name=disk,writable=on",
            "--pidfile", str(pidfile),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: pidfile.exists() or proc.poll() is not None, what="qsd pid file")
        assert proc.poll() is None, proc.communicate()[1]
        yield proc
    finally:
        proc.kill()
        proc.wait(TIMEOUT)


def test_source_lock_bytes_are_qemus(image: Path) -> None:
    with locked(image, "source"):
        assert held_ranges(image) == Counter([(100, 101), (103, 103), (201, 201), (203, 203)])
    with locked(image, "target"):
        assert held_ranges(image) == Counter([(100, 101), (103, 103), (201, 203)])


@pytest.mark.parametrize("role", ["source", "target"])
def test_qemu_refuses_to_write_a_locked_image(image: Path, role: Role) -> None:
    with locked(image, role):
        write = qemu_io("-c", "write -P 0x11 0 4k", image)
        assert write.returncode != 0
        assert 'Failed to get "write" lock' in write.stderr
        assert "Is another process using the image" in write.stderr
        # Read-only users that share writes are let in, as beside a running VM.
        read = qemu_io("-r", "-c", "read -P 0x5a 0 4k", image)
        assert read.returncode == 0, read.stderr
        # qemu-img convert does not share write: refused, as beside a running VM.
        copy = subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", image, image.with_suffix(".copy")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert 'Failed to get shared "write" lock' in copy.stderr
    assert image.read_bytes() == bytes([PATTERN]) * SIZE


def test_locks_stay_while_any_duplicate_of_the_fd_is_open(image: Path) -> None:
    """OFD locks follow the open file description: a forked or dup'ed fd keeps them."""
    with locked(image, "source") as fd:
        duplicate = os.dup(fd)
    try:
        assert 'Failed to get "write" lock' in qemu_io("-c", "write 0 4k", image).stderr
    finally:
        os.close(duplicate)
    assert held_ranges(image) == Counter()
    assert qemu_io("-c", "write -P 0x11 0 4k", image).returncode == 0


@pytest.mark.parametrize("role", ["source", "target"])
def test_refuses_an_image_qemu_io_writes(image: Path, role: Role) -> None:
    with qemu_io_holding(image):
        before = held_ranges(image)
        assert before == Counter([(100, 101)])  # consistent read + write, shares everything
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            with pytest.raises(CowfsError) as refused:
                lock_image(fd, image, role)
            assert held_ranges(image) == before  # the failed attempt left nothing behind
        finally:
            os.close(fd)
    assert refused.value.message == (
        f"{role} {image} is in use by another process (e.g. QEMU): "
        'it holds the "write" permission, which cowfs does not share'
    )


def test_refuses_an_image_a_storage_daemon_exports(image: Path, tmp_path: Path) -> None:
    with storage_daemon_exporting(image, tmp_path):
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            with pytest.raises(CowfsError) as refused:
                lock_image(fd, image, "source")
        finally:
            os.close(fd)
    assert refused.value.message == (
        f"source {image} is in use by another process (e.g. QEMU): "
        'it does not share the "resize" permission cowfs needs'
    )


def test_a_read_only_qemu_io_does_not_stop_a_backup(image: Path) -> None:
    """`qemu-io -r` takes consistent read and shares everything: like a VM, cowfs starts."""
    with qemu_io_holding(image, "-r"), locked(image, "source"):
        assert held_ranges(image) == Counter(
            [(100, 100), (100, 101), (103, 103), (201, 201), (203, 203)]
        )


def test_a_second_job_is_refused(image: Path) -> None:
    with (
        locked(image, "source"),
        pytest.raises(CowfsError, match='does not share the "write" permission'),
        locked(image, "source"),
    ):
        pass


def test_closing_the_fd_releases_the_locks(image: Path) -> None:
    with locked(image, "source"):
        assert qemu_io("-c", "write 0 4k", image).returncode != 0
    assert held_ranges(image) == Counter()
    write = qemu_io("-c", "write -P 0x11 0 4k", image)
    assert write.returncode == 0, write.stderr
    assert image.read_bytes()[:4096] == b"\x11" * 4096
    with qemu_io_holding(image):  # and QEMU can hold it again
        pass


def test_refuses_an_image_with_a_foreign_exclusive_lock(image: Path) -> None:
    """QEMU never takes exclusive locks on its bytes; whoever does is not sharing either."""
    with open(image, "r+b") as other:
        exclusive = struct.pack("=hh4xqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 101, 1, 0)
        fcntl.fcntl(other, fcntl.F_OFD_SETLK, exclusive)
        with (
            pytest.raises(CowfsError, match="exclusive lock on byte 101"),
            locked(image, "source"),
        ):
            pass
        assert held_ranges(image) == Counter([(101, 101)])


# -- through the real command -------------------------------------------------------


def test_a_running_backup_keeps_qemu_off_its_source_and_target(cowfs, image: Path) -> None:
    m = cowfs.mount(image, None, "--speed", "1M")
    for path in (image, m.target):
        result = qemu_io("-c", "write -P 0x11 0 4k", path)
        assert result.returncode != 0
        assert 'Failed to get "write" lock' in result.stderr + result.stdout
    assert m.finish().returncode == 0
    assert image.read_bytes() == bytes([PATTERN]) * SIZE
    assert qemu_io("-c", "write -P 0x11 0 4k", image).returncode == 0  # locks gone


def test_mount_refuses_a_source_qemu_has_open(cowfs, image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    target = tmp_path / "target.img"
    with qemu_io_holding(image):
        result = run_cowfs("mount", image, mnt, "--target", target)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: error: source"), result.stderr
    assert "in use by another process" in lines[0]
    assert not target.exists() and not list(tmp_path.glob("*.cowfs.*"))
    assert not os.listdir(mnt)
