"""Target formats. Each writes clusters at image offsets and knows nothing of FUSE or jobs."""

from datetime import datetime
from pathlib import Path
from typing import Protocol

from bitarray import bitarray

from ..options import FORMATS
from ..record import Record
from ..sums import Checksums
from .qcow2 import Qcow2Target
from .raw import RawTarget


class Target(Protocol):
    """What the job needs of a target; methods are blocking and thread-safe per cluster.
    File targets share their start and end (file.py); a repository has its own."""

    path: Path
    fd: int
    format: str
    backing: Path | None
    checksummed: bool
    """Whether the job records each cluster's checksum for it (sums.py)."""
    closed_before_record: bool
    """Whether its final record is written after `close` (a file: its locks are gone by
    the time the record says complete, so any tool may open it at once) or before (a
    repository: the record is an object the open target puts)."""

    @property
    def name(self) -> str: ...
    def needs(self, clusters: bitarray, size: int) -> bitarray: ...
    def begin(self, size: int, needed: bitarray, at: datetime) -> None: ...
    def admit(self, length: int) -> None: ...
    def guest_gone(self) -> None: ...
    def write(self, offset: int, data: memoryview) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def seal(self, sums: Checksums) -> str | None: ...
    def write_record(self, record: Record, reserve: bool) -> None: ...
    def close(self) -> None: ...


def create_target(
    path: Path,
    size: int,
    fmt: str,
    cluster_size: int,
    backing: Path | None = None,
    compress: bool = False,
) -> Target:
    """A new, empty target at `path` (which must not exist)."""
    if fmt == "raw":
        return RawTarget.create(path, size)
    backing_format = None
    if backing is not None:  # a relative name is relative to the target, as QEMU reads it
        with open(path.parent / backing, "rb") as f:
            backing_format = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    return Qcow2Target.create(
        path, size, cluster_size, backing, backing_format or "raw", compress=compress
    )


__all__ = ["FORMATS", "Qcow2Target", "RawTarget", "Target", "create_target"]
