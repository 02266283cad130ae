"""The copier has the kernel write the target back as it goes (cowfs/target/writeback.py).

Why: left to the kernel, everything the copier wrote stays dirty in the page cache until
the kernel's dirty threshold or its 30 s expiry, and the job's final fsync waits for it
all at once. Seen per file with cachestat(2): while the job is paused half-way, the
target's dirty pages drain within seconds instead of the kernel's 30.
"""

import ctypes
import errno
import os
import platform
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import CowfsRunner, ok, wait_for, wait_until
from helpers.qemu import assert_identical, check_clean

from cowfs.target.writeback import EVERY

MiB = 1 << 20
SIZE = 192 * MiB
NR_CACHESTAT = 451  # x86_64 and the generic table alike

_libc = ctypes.CDLL(None, use_errno=True)


class CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


class CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


def dirty_bytes(path: Path) -> int:
    """The bytes of `path` dirty in the page cache (cachestat, Linux 6.5 and newer)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        cs, whole = CacheStat(), CacheStatRange(0, 0)
        if _libc.syscall(NR_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(cs), 0):
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                pytest.skip(f"no cachestat(2) in kernel {platform.release()}")
            raise OSError(err, f"cachestat of {path}: {os.strerror(err)}")
        return cs.nr_dirty * os.sysconf("SC_PAGE_SIZE")
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_copied_data_goes_to_disk_while_the_job_runs(
    cowfs: CowfsRunner, tmp_path: Path, fmt: str
) -> None:
    source = make_image(tmp_path / "disk.img", SIZE, seed=71, holes=False)
    fd = os.open(source, os.O_RDONLY)
    os.fsync(fd)  # the source's own dirty pages are not the target's
    os.close(fd)
    target = tmp_path / f"target.{fmt}"
    m = cowfs.mount(source, target, "--sync", "full", "--speed", "64M")
    half = SIZE // 2
    wait_until(lambda: m.status()["bytes_done"] >= half, 30, "the copier half-way")
    ok("pause", m.mountpoint)
    copied = m.status()["bytes_done"]
    # Writeback was started at most EVERY bytes ago (and one batch in flight): what is
    # still dirty drains well before the kernel's own 30 s expiry would write it.
    bound = EVERY + 2 * MiB
    assert wait_for(lambda: dirty_bytes(m.target) <= bound, 10), (
        f"{dirty_bytes(m.target) // MiB} MiB of the target still dirty "
        f"{copied // MiB} MiB into the copy"
    )
    ok("resume", m.mountpoint)
    ok("set-speed", m.mountpoint, "0")
    result = m.finish()
    assert result.returncode == 0 and result.stdout.startswith("complete"), result.stdout
    if fmt == "raw":
        assert files_equal(target, source)
    else:
        check_clean(target)
        assert_identical(target, source)
