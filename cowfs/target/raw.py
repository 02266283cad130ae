"""Raw targets: a sparse file of the source's size.

A fresh raw target reads as zeros everywhere, so zero clusters need no write
and the file stays sparse. Owns only the file; never decides what to copy.
"""

import os
from pathlib import Path

from ..libc import check, libc
from .file import FileTarget

WRITE_PIECE = 128 << 10
"""Large single pwrites into the page cache are slow on these machines (see STYLE.md);
128 KiB pieces measured fastest for the copier's write side."""


class RawTarget(FileTarget):
    """A raw image being written; methods are blocking and thread-safe (positional I/O)."""

    format = "raw"
    backing: Path | None = None  # raw files have no backing file

    @classmethod
    def create(cls, path: Path, size: int) -> "RawTarget":
        """Create a new sparse file; fails if `path` exists (callers pick a fresh name)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        return cls(path, fd)

    def write(self, offset: int, data: memoryview) -> None:
        """Write `data` at `offset`, in page-cache-friendly pieces."""
        end = len(data)
        pos = 0
        while pos < end:
            pos += os.pwrite(self.fd, data[pos : pos + WRITE_PIECE], offset + pos)

    def write_zeroes(self, offset: int, length: int) -> None:
        """A fresh raw target already reads as zeros there: nothing to do."""

    def read(self, offset: int, length: int) -> bytes:
        """The image's bytes at [offset, offset+length) as written so far (holes: zeros)."""
        return read_exactly(self.fd, offset, length)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def read_exactly(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`; zeros past the end of the file."""
    data = os.pread(fd, length, offset)
    while 0 < len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data + bytes(length - len(data))


FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of [offset, offset+length): it reads as zeros, the size stays."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    check(libc.fallocate(fd, mode, offset, length), f"punching a hole at {offset}")
