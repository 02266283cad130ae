"""The page cache of one file, seen and emptied without touching its pages.

cachestat(2) (Linux 6.5 and newer) counts a file's cached, dirty and under-writeback
pages; unlike a probing RWF_NOWAIT read, it starts no readahead that would bring back
the very pages it looks for.
"""

import ctypes
import errno
import os
import platform
from pathlib import Path

import pytest

NR_CACHESTAT = 451  # x86_64 and the generic table alike
EVICT_ATTEMPTS = 50

_libc = ctypes.CDLL(None, use_errno=True)


class CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


class CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


def cachestat(path: Path) -> CacheStat:
    """The whole file's page-cache figures, in pages; skips the test on older kernels."""
    fd = os.open(path, os.O_RDONLY)
    try:
        cs, whole = CacheStat(), CacheStatRange(0, 0)
        if _libc.syscall(NR_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(cs), 0):
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                pytest.skip(f"no cachestat(2) in kernel {platform.release()}")
            raise OSError(err, f"cachestat of {path}: {os.strerror(err)}")
        return cs
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop `path` from the page cache. POSIX_FADV_DONTNEED passes over pages busy at that
    instant (just written back, still in another CPU's LRU batch), as seen on a loaded
    CI machine: so it is repeated until cachestat counts no page of the file."""
    for _ in range(EVICT_ATTEMPTS):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if not cachestat(path).nr_cache:
            return
    raise AssertionError(f"{path} stayed in the page cache after {EVICT_ATTEMPTS} evictions")
