"""The checksum file beside each target: what every cluster of the backup must read as.

A job records, for each of its clusters, whether it put the cluster in its target
and how: as data (with the XXH3-128 digest of the bytes it handed the target, the
uncompressed ones for a compressed target), as zero, or not at all (a cluster an
incremental leaves to its backing file; a hole a `top` job never needed). A view's
reader can release clusters: those are gone from the target and say so. `verify`
and `restore` read a chain back against these files, so a flipped bit, a lost
cluster or a damaged table is found, and named, before anyone trusts the bytes.

The file is written once, when the job has put everything in its target and made
it durable, and before its record says complete; the record holds the file's
SHA-256, so a damaged checksum file is found too.

Layout (little endian): magic `COWFSSUM`, version (u32), cluster size (u32), image
size (u64); one state byte per cluster; 16 digest bytes per cluster (zeros where the
state is not data); SHA-256 of everything before it.
"""

import hashlib
import struct
from pathlib import Path
from typing import Protocol

import xxhash

from .atomic import replace_file
from .errors import CowfsError

MAGIC = b"COWFSSUM"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")
DIGEST = 16
ALGORITHM = "xxh3-128"
SUMS_SUFFIX = ".cowfs.sums"

ABSENT = 0
"""Not in this target: it reads through to the backing file (or as zero without one)."""
ZERO = 1
DATA = 2
RELEASED = 3
"""Freed by a view's reader: the target no longer holds it."""
STATE_NAMES = {ABSENT: "absent", ZERO: "zero", DATA: "data", RELEASED: "released"}


def sums_path(target: Path) -> Path:
    return target.with_name(target.name + SUMS_SUFFIX)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


class Checksums:
    """One state and one digest per cluster of `size` bytes. Recording is safe from
    several threads at once for distinct clusters (each is a single GIL-held store)."""

    def __init__(self, size: int, cluster_size: int) -> None:
        self.size = size
        self.cluster_size = cluster_size
        self.count = -(-size // cluster_size)
        self.states = bytearray(self.count)
        self.digests = bytearray(self.count * DIGEST)

    def data(self, offset: int, cluster: memoryview) -> None:
        """The job wrote `cluster` (the image's bytes there, up to its end) at `offset`."""
        i = offset // self.cluster_size
        self.digests[i * DIGEST : (i + 1) * DIGEST] = digest(cluster)
        self.states[i] = DATA

    def zero(self, offset: int, length: int) -> None:
        first = offset // self.cluster_size
        last = -(-(offset + length) // self.cluster_size)
        self.states[first:last] = bytes([ZERO]) * (last - first)

    def release(self, first: int, count: int) -> None:
        self.states[first : first + count] = bytes([RELEASED]) * count
        self.digests[first * DIGEST : (first + count) * DIGEST] = bytes(count * DIGEST)

    def digest_of(self, cluster: int) -> bytes:
        return bytes(self.digests[cluster * DIGEST : (cluster + 1) * DIGEST])

    def extent(self, cluster: int) -> tuple[int, int]:
        """Offset and length of `cluster` (the last one may be partial)."""
        offset = cluster * self.cluster_size
        return offset, min(self.cluster_size, self.size - offset)

    # -- the file ----------------------------------------------------------------

    def encode(self) -> bytes:
        body = HEADER.pack(MAGIC, VERSION, self.cluster_size, self.size)
        body += bytes(self.states) + bytes(self.digests)
        return body + hashlib.sha256(body).digest()

    def save(self, path: Path) -> str:
        """Write the file atomically and durably; returns its SHA-256 for the record."""
        data = self.encode()
        replace_file(path, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: Path, expected_sha256: str) -> "Checksums":
        """The checksums of a target; a file that is missing, damaged or not the one its
        record names is a CowfsError that says which."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CowfsError(f"{path}: cannot read the checksums: {e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            raise CowfsError(f"{path}: the checksum file is damaged (not the one its record names)")
        if len(data) < HEADER.size + 32:
            raise CowfsError(f"{path}: the checksum file is truncated")
        magic, version, cluster_size, size = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or cluster_size <= 0:
            raise CowfsError(f"{path}: not a cowfs checksum file of version {VERSION}")
        sums = cls(size, cluster_size)
        if len(data) != HEADER.size + sums.count * (1 + DIGEST) + 32:
            raise CowfsError(f"{path}: the checksum file has the wrong length")
        pos = HEADER.size
        sums.states[:] = data[pos : pos + sums.count]
        pos += sums.count
        sums.digests[:] = data[pos : pos + sums.count * DIGEST]
        return sums


class Writer(Protocol):
    def write(self, offset: int, data: memoryview) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...


class Recording:
    """A target's write side that records each cluster's checksum as it hands it on:
    the copier and copy-before-write write through it, so no path can skip the record."""

    def __init__(self, target: Writer, sums: Checksums) -> None:
        self.target = target
        self.sums = sums

    def write(self, offset: int, data: memoryview) -> None:
        cs = self.sums.cluster_size
        for pos in range(0, len(data), cs):
            self.sums.data(offset + pos, data[pos : pos + cs])
        self.target.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.sums.zero(offset, length)
        self.target.write_zeroes(offset, length)
