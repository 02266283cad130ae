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
size (u64), length of the next part (u64); one state byte per cluster, deflated; the 16
digest bytes of each data cluster, in the order of the clusters; SHA-256 of everything
before it. Memory and file grow with the data, not with the image's size.
"""

import hashlib
import re
import struct
import zlib
from pathlib import Path
from typing import Protocol

import xxhash

from .atomic import replace_file
from .errors import CowfsError

MAGIC = b"COWFSSUM"
VERSION = 2
HEADER = struct.Struct("<8sIIQQ")
"""Magic, version, cluster size, image size, length of the compressed states."""
DIGEST = 16
ALGORITHM = "xxh3-128"
SUMS_SUFFIX = ".cowfs.sums"
CHUNK = 4096
"""Clusters per block of digests held in memory: only blocks with data take space, so a
huge sparse image costs little more than its states (one byte per cluster)."""

ABSENT = 0
"""Not in this target: it reads through to the backing file (or as zero without one)."""
ZERO = 1
DATA = 2
RELEASED = 3
"""Freed by a view's reader: the target no longer holds it."""

_DATA_STATE = re.compile(bytes([DATA]))


def sums_path(target: Path) -> Path:
    return target.with_name(target.name + SUMS_SUFFIX)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


class Checksums:
    """One state per cluster of `size` bytes, and a digest per data cluster. Recording is
    safe from several threads at once for distinct clusters (each is a single GIL-held
    store; a new block of digests is made under the GIL too)."""

    def __init__(self, size: int, cluster_size: int) -> None:
        self.size = size
        self.cluster_size = cluster_size
        self.count = -(-size // cluster_size)
        self.states = bytearray(self.count)
        self._digests: dict[int, bytearray] = {}

    def data(self, offset: int, cluster: memoryview) -> None:
        """The job wrote `cluster` (the image's bytes there, up to its end) at `offset`."""
        self.set_data(offset // self.cluster_size, digest(cluster))

    def set_data(self, i: int, value: bytes | memoryview) -> None:
        block = self._digests.get(i // CHUNK)
        if block is None:
            block = self._digests.setdefault(i // CHUNK, bytearray(CHUNK * DIGEST))
        pos = i % CHUNK * DIGEST
        block[pos : pos + DIGEST] = value
        self.states[i] = DATA

    def zero(self, offset: int, length: int) -> None:
        first = offset // self.cluster_size
        last = -(-(offset + length) // self.cluster_size)
        self.states[first:last] = bytes([ZERO]) * (last - first)

    def release(self, first: int, count: int) -> None:
        self.states[first : first + count] = bytes([RELEASED]) * count

    def digest_of(self, cluster: int) -> bytes:
        """The digest of a data cluster (zeros for any other)."""
        if self.states[cluster] != DATA:
            return bytes(DIGEST)
        pos = cluster % CHUNK * DIGEST
        return bytes(self._digests[cluster // CHUNK][pos : pos + DIGEST])

    def extent(self, cluster: int) -> tuple[int, int]:
        """Offset and length of `cluster` (the last one may be partial)."""
        offset = cluster * self.cluster_size
        return offset, min(self.cluster_size, self.size - offset)

    # -- the file ----------------------------------------------------------------

    def encode(self) -> bytes:
        """Header, the states deflated (runs of one state shrink to nothing), the digests
        of the data clusters in order, SHA-256 of all that."""
        states = zlib.compress(bytes(self.states), 1)
        parts: list[bytes | bytearray] = [
            HEADER.pack(MAGIC, VERSION, self.cluster_size, self.size, len(states)),
            states,
        ]
        for chunk in sorted(self._digests):
            block = self._digests[chunk]
            base = chunk * CHUNK
            for match in _DATA_STATE.finditer(self.states, base, min(base + CHUNK, self.count)):
                pos = (match.start() - base) * DIGEST
                parts.append(block[pos : pos + DIGEST])
        body = b"".join(parts)
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
        bad = CowfsError(f"{path}: not a cowfs checksum file of version {VERSION}")
        if len(data) < HEADER.size + 32:
            raise bad
        magic, version, cluster_size, size, packed = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or cluster_size <= 0:
            raise bad
        sums = cls(size, cluster_size)
        pos = HEADER.size + packed
        try:
            sums.states[:] = zlib.decompress(data[HEADER.size : pos])
        except zlib.error:
            raise bad from None
        if len(sums.states) != sums.count:
            raise bad
        digests = memoryview(data)[pos:-32]
        if len(digests) != sums.states.count(DATA) * DIGEST:
            raise CowfsError(f"{path}: the checksum file has the wrong length")
        for n, match in enumerate(_DATA_STATE.finditer(sums.states)):
            sums.set_data(match.start(), digests[n * DIGEST : (n + 1) * DIGEST])
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
