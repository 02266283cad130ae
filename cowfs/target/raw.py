"""Raw targets: a sparse file of the source's size.

A fresh raw target reads as zeros everywhere, so zero clusters need no write
and the file stays sparse. Owns only the file; never decides what to copy.
"""

import os
from pathlib import Path

WRITE_PIECE = 128 << 10
"""Large single pwrites into the page cache are slow on these machines (see STYLE.md);
128 KiB pieces measured fastest for the copier's write side."""


class RawTarget:
    """A raw image being written; methods are blocking and thread-safe (positional I/O)."""

    format = "raw"
    backing: Path | None = None  # raw files have no backing file

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

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

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
