"""What every file target (raw, qcow2) does the same way at a job's start and end.

A file target takes whatever the job selects, is made durable by fsync, and keeps its
checksum file (sums.py) and its record (record.py) beside it. A repository target
(repo/chunker.py) does each of these its own way; the job asks the target, not the kind.
"""

from datetime import datetime
from pathlib import Path

from bitarray import bitarray

from ..record import Record, record_path, write_record
from ..sums import Checksums, sums_path
from .writeback import WritebackPacer


class FileTarget:
    checksummed = True
    """Its checksum file is how verify and restore check it."""
    closed_before_record = True

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.writeback = WritebackPacer(fd)

    @property
    def name(self) -> str:
        """What records, status and bitmaps call the target."""
        return str(self.path)

    def needs(self, clusters: bitarray, size: int) -> bitarray:
        """The clusters an incremental must copy to hold `clusters`: just those."""
        return clusters

    def begin(self, size: int, needed: bitarray, at: datetime) -> None:
        """At the point in time; a file needs no notice."""

    def admit(self, length: int) -> None:
        """Blocking, the copier's, before each run it copies: a file takes any amount at
        once; once the guest is gone, what the copier wrote goes on to the disk."""
        self.writeback.copied(length)

    def guest_gone(self) -> None:
        """The live file is gone: the copier need not spare the guest's CPU any longer
        (writeback.py)."""
        self.writeback.start()

    def fsync(self) -> None: ...

    def seal(self, sums: Checksums) -> str | None:
        """Blocking, once everything is written: the target durable, then its checksum
        file; returns that file's SHA-256 for the record."""
        try:
            self.fsync()
        except OSError as e:
            raise OSError(e.errno, f"fsync of the target: {e.strerror}") from e
        try:
            return sums.save(sums_path(self.path))
        except OSError as e:
            raise OSError(e.errno, f"writing the checksums: {e.strerror}") from e

    def write_record(self, record: Record, reserve: bool) -> None:
        write_record(record_path(self.path), record, reserve)
