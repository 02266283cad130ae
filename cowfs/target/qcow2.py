"""qcow2 (version 3) targets, written by hand from QEMU's docs/interop/qcow2.txt.

Owns the on-disk layout of one qcow2 target: the header (with the backing file
and its format), the L1/L2 tables that map guest clusters to host clusters,
the refcounts, zero flags and deflate-compressed clusters. Like RawTarget it
only writes clusters at image offsets: it never decides what to copy and knows
nothing of FUSE or jobs. No well-kept Python library writes qcow2, hence this.

Layout: host clusters are only ever appended. `create` lays out the header,
the L1 table (its size follows from the virtual size) and a first refcount
table; L2 tables, refcount blocks and data clusters are appended as writes need
them. The mapping and the refcounts live in memory (only the L2 tables that
writes touched) and reach the file in `fsync()`/`close()`; after `fsync()` the
file is a complete image that `qemu-img check` accepts.

Concurrency: metadata changes happen under one lock; data (and compression)
happens outside it, so two worker threads and the main thread may write
distinct clusters at once.
"""

import os
import re
import struct
import sys
import threading
from array import array
from pathlib import Path

from zlib_ng import zlib_ng

from ..errors import CowfsError
from .file import FileTarget
from .raw import WRITE_PIECE, read_exactly

MAGIC = b"QFI\xfb"
VERSION = 3
"""Version 3 (compat 1.1): needed for the zero flag that stops reads going to the backing file."""
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
"""The version 3 header up to header_length (104 bytes); later optional fields stay absent."""
EXTENSION = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA

REFCOUNT_ORDER = 4
"""16-bit refcounts, QEMU's default: a host cluster shared by compressed clusters needs > 1 bit."""
REFCOUNT_TYPE = "H"
MIN_CLUSTER = 512
"""The format's smallest cluster (cluster_bits >= 9)."""
MAX_CLUSTER = 2 << 20
"""QEMU refuses to open images with larger clusters."""
MAX_L1_BYTES = 32 << 20
"""QEMU refuses to open images whose L1 table is larger."""
MAX_BACKING_NAME = 1023
"""The spec's limit on the backing file name, in bytes."""

COPIED = 1 << 63
"""L1/L2 entry: refcount is exactly 1 (every cluster here; `qemu-img check` insists)."""
COMPRESSED = 1 << 62
ZERO = 1
"""Standard cluster descriptor bit 0: reads as zeros, never from the backing file."""
OFFSET_MASK = ((1 << 56) - 1) & ~511
"""Bits 9-55 of an L1 or standard L2 entry: the host offset."""
SECTOR = 512
"""Compressed cluster sizes are counted in 512-byte sectors, and QEMU sees every image in
whole sectors (a 1000-byte raw file is 1024 bytes to qemu-img): the header's virtual size
is rounded up likewise, so that QEMU reads the source and its backup as the same size."""
DEFLATE_WBITS = -12
"""Raw deflate with a 4 KiB window, as QEMU writes compressed clusters."""
DEFLATE_MEMLEVEL = 9
"""QEMU's memLevel for compressed clusters."""
BIG_ENDIAN = sys.byteorder == "big"


def _align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _be_bytes(table: array) -> bytes:
    """A table as qcow2 stores it: big endian."""
    if not BIG_ENDIAN:
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()


def _extension(kind: int, data: bytes) -> bytes:
    return EXTENSION.pack(kind, len(data)) + data + bytes(_align_up(len(data), 8) - len(data))


def _deflate(cluster: bytes | memoryview) -> bytes:
    """Raw deflate, as QEMU writes and reads it, by zlib-ng: 2-3x zlib's speed at the
    same level (the compressed backup was CPU-bound), any inflate reads it."""
    c = zlib_ng.compressobj(
        zlib_ng.Z_DEFAULT_COMPRESSION, zlib_ng.DEFLATED, DEFLATE_WBITS, DEFLATE_MEMLEVEL
    )
    return c.compress(cluster) + c.flush()


def _check_options(
    path: Path, size: int, cluster_size: int, backing: Path | None, backing_format: str
) -> None:
    """Refuse what QEMU could not open, with a reason a person can act on."""
    if not (MIN_CLUSTER <= cluster_size <= MAX_CLUSTER) or cluster_size & (cluster_size - 1):
        raise CowfsError(
            f"qcow2 cluster size must be a power of two from 512 B to 2 MiB "
            f"(QEMU cannot open larger clusters), not {cluster_size}"
        )
    if size < 0:
        raise CowfsError(f"image size must not be negative, not {size}")
    if _l1_size(size, cluster_size) * 8 > MAX_L1_BYTES:
        raise CowfsError(
            f"a qcow2 image of {size} bytes needs clusters larger than {cluster_size} bytes "
            f"(QEMU limits the L1 table to {MAX_L1_BYTES >> 20} MiB)"
        )
    if backing is None:
        return
    if len(os.fsencode(backing)) > MAX_BACKING_NAME:
        raise CowfsError(f"backing file name longer than {MAX_BACKING_NAME} bytes: {backing}")
    if not (backing if backing.is_absolute() else path.parent / backing).exists():
        raise CowfsError(
            f"backing file {backing} not found (a relative name is relative to the target's "
            f"directory, as QEMU reads it)"
        )
    if not re.fullmatch(r"[a-z0-9_-]{1,32}", backing_format):
        raise CowfsError(f"not a QEMU image format name: {backing_format!r}")


def _l1_size(size: int, cluster_size: int) -> int:
    """L1 entries for `size` bytes; at least one, so that an empty image's L1 is in use."""
    return max(1, -(-size // (cluster_size * (cluster_size // 8))))


class Qcow2Target(FileTarget):
    """A qcow2 image being written; methods are blocking and thread-safe for distinct clusters."""

    format = "qcow2"

    def __init__(
        self,
        path: Path,
        fd: int,
        size: int,
        cluster_size: int,
        backing: Path | None,
        backing_format: str,
        compress: bool,
    ) -> None:
        """In-memory layout of an empty image; `create` is the public way to get one."""
        super().__init__(path, fd)
        self.size = size
        self.cluster_size = cluster_size
        self.backing = backing
        self.backing_format = backing_format
        self.compress = compress
        self._lock = threading.Lock()
        self._bits = cluster_size.bit_length() - 1
        self._l2_entries = cluster_size // 8
        self._rb_entries = cluster_size * 8 // (1 << REFCOUNT_ORDER)
        # Compressed descriptor: host offset in bits 0..x-1, extra sectors in bits x..61.
        self._csize_shift = 62 - (self._bits - 8)
        self._csize_mask = (1 << (self._bits - 8)) - 1

        self._l2: dict[int, array] = {}  # L1 index -> L2 table (only tables writes touched)
        self._l2_offsets: dict[int, int] = {}  # L1 index -> host offset of that L2 table
        self._dirty_l2: set[int] = set()
        self._refcounts = array(REFCOUNT_TYPE, [1])  # per host cluster; cluster 0: the header
        self._rb_offsets: list[int] = []  # refcount block index -> host offset
        self._dirty_rb: set[int] = set()
        self._end = cluster_size  # end of the allocated host clusters
        self._cpos = 0  # next free byte for compressed data (packed, as QEMU does)

        self._l1_size = _l1_size(size, cluster_size)
        self._l1_offset = self._alloc(-(-self._l1_size * 8 // cluster_size))
        self._rt_clusters = 1
        self._rt_offset = self._alloc(self._rt_clusters)
        self._changed = True

    @classmethod
    def create(
        cls,
        path: Path,
        size: int,
        cluster_size: int,
        backing: Path | None = None,
        backing_format: str = "raw",
        compress: bool = False,
    ) -> "Qcow2Target":
        """Create a new image of virtual size `size`; fails if `path` exists.

        `backing` is recorded as given; QEMU reads a relative name relative to
        the image's directory. Clusters never written read through to it.
        """
        path = Path(path)
        backing = None if backing is None else Path(backing)
        _check_options(path, size, cluster_size, backing, backing_format)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            target = cls(path, fd, size, cluster_size, backing, backing_format, compress)
            header = target._header()
            if len(header) > cluster_size:
                raise CowfsError(
                    f"backing file name too long for {cluster_size}-byte clusters: {backing}"
                )
            target._flush()
            os.pwrite(fd, header, 0)
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        return target

    # The interface the copier and copy-before-write use (see RawTarget).

    def write(self, offset: int, data: memoryview) -> None:
        """Write whole clusters at cluster-aligned `offset`; the image's last may be partial."""
        cs = self.cluster_size
        if not self.compress:
            self._write_plain(offset, data)
            return
        for pos in range(0, len(data), cs):
            self._write_compressed(offset + pos, data[pos : pos + cs])

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero clusters: unallocated without a backing file, zero-flagged with one."""
        with self._lock:
            for guest in range(offset, offset + length, self.cluster_size):
                self._zero(guest)

    def read(self, offset: int, length: int) -> bytes:
        """The image's bytes at cluster-aligned [offset, offset+length), as written so
        far: a cluster never written reads as zeros (not through the backing file: a
        caller reads only clusters it had written, zero ones included)."""
        cs = self.cluster_size
        out = bytearray()
        for guest in range(offset, offset + length, cs):
            l1_index, l2_index = divmod(guest >> self._bits, self._l2_entries)
            with self._lock:
                table = self._l2.get(l1_index)
                entry = 0 if table is None else table[l2_index]
            if entry & COMPRESSED:
                host = entry & ((1 << self._csize_shift) - 1)
                sectors = (entry >> self._csize_shift & self._csize_mask) + 1
                blob = read_exactly(
                    self.fd, host, host // SECTOR * SECTOR + sectors * SECTOR - host
                )
                out += zlib_ng.decompressobj(DEFLATE_WBITS).decompress(blob, cs)
            elif entry & ZERO or not entry & OFFSET_MASK:
                out += bytes(cs)
            else:
                out += read_exactly(self.fd, entry & OFFSET_MASK, cs)
        return bytes(out[:length])

    def fsync(self) -> None:
        """Write the metadata and make everything durable: a complete, valid image."""
        self._flush()
        os.fsync(self.fd)

    def close(self) -> None:
        """Write the metadata (so the file is a valid image) and close; no fsync, as RawTarget."""
        try:
            self._flush()
        finally:
            os.close(self.fd)

    # Data.

    def _write_plain(self, offset: int, data: memoryview | bytes) -> None:
        cs = self.cluster_size
        with self._lock:
            hosts = [self._map_plain(offset + pos) for pos in range(0, len(data), cs)]
        run = 0  # first cluster of the current run of contiguous host clusters
        for i in range(1, len(hosts) + 1):
            if i == len(hosts) or hosts[i] != hosts[i - 1] + cs:
                self._pwrite(data[run * cs : i * cs], hosts[run])
                run = i
        if tail := len(data) % cs:  # the image's last, partial cluster: zeros after the end
            self._pwrite(bytes(cs - tail), hosts[-1] + tail)

    def _write_compressed(self, offset: int, cluster: memoryview) -> None:
        cs = self.cluster_size
        if len(cluster) < cs:  # QEMU compresses the last partial cluster padded with zeros
            cluster = memoryview(bytes(cluster) + bytes(cs - len(cluster)))
        blob = _deflate(cluster)
        if len(blob) >= cs:  # incompressible: QEMU writes a normal cluster instead
            self._write_plain(offset, cluster)
            return
        with self._lock:
            host = self._alloc_compressed(len(blob))
            extra_sectors = (host + len(blob) - 1) // SECTOR - host // SECTOR
            table, i = self._slot(offset)
            self._release(table[i])
            table[i] = COMPRESSED | extra_sectors << self._csize_shift | host
        self._pwrite(blob, host)

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        data = memoryview(data)
        pos = 0
        while pos < len(data):
            pos += os.pwrite(self.fd, data[pos : pos + WRITE_PIECE], offset + pos)

    # Mapping (under the lock).

    def _slot(self, guest: int) -> tuple[array, int]:
        """The L2 table (created if needed) and index mapping `guest`; marks the table dirty."""
        l1_index, l2_index = divmod(guest >> self._bits, self._l2_entries)
        table = self._l2.get(l1_index)
        if table is None:
            table = self._l2[l1_index] = array("Q", bytes(self.cluster_size))
            self._l2_offsets[l1_index] = self._alloc(1)
        self._dirty_l2.add(l1_index)
        self._changed = True
        return table, l2_index

    def _map_plain(self, guest: int) -> int:
        """The host cluster for a normal write of guest cluster `guest` (reused if it has one)."""
        table, i = self._slot(guest)
        entry = table[i]
        if entry & COMPRESSED or not entry & OFFSET_MASK:
            self._release(entry)
            host = self._alloc(1)
        else:
            host = entry & OFFSET_MASK
        table[i] = COPIED | host
        return host

    def _zero(self, guest: int) -> None:
        if self.backing is None and (guest >> self._bits) // self._l2_entries not in self._l2:
            return  # nothing written here and no backing file: already reads as zeros
        table, i = self._slot(guest)
        entry = table[i]
        if not entry & COMPRESSED and entry & OFFSET_MASK:  # keep the cluster, preallocated
            table[i] = COPIED | entry & OFFSET_MASK | ZERO
        else:
            self._release(entry)
            table[i] = ZERO if self.backing is not None else 0

    def _release(self, entry: int) -> None:
        """Drop the references of an entry that is being replaced (its space is not reused)."""
        if entry & COMPRESSED:
            host = entry & ((1 << self._csize_shift) - 1)
            sectors = (entry >> self._csize_shift & self._csize_mask) + 1
            self._count(host, host // SECTOR * SECTOR + sectors * SECTOR, -1)
        elif entry & OFFSET_MASK:
            self._count(entry & OFFSET_MASK, (entry & OFFSET_MASK) + 1, -1)

    # Host clusters and refcounts (under the lock).

    def _alloc(self, count: int, refcount: int = 1) -> int:
        """Append `count` contiguous host clusters; returns the first one's offset."""
        while (self._end // self.cluster_size + count - 1) // self._rb_entries >= len(
            self._rb_offsets
        ):  # the refcount block for the next range goes first, covering itself
            self._rb_offsets.append(self._end)
            self._grow(1, 1)
        offset = self._end
        self._grow(count, refcount)
        return offset

    def _grow(self, count: int, refcount: int) -> None:
        first = len(self._refcounts)
        self._refcounts.extend([refcount] * count)
        self._end += count * self.cluster_size
        last = first + count - 1
        self._dirty_rb.update(range(first // self._rb_entries, last // self._rb_entries + 1))

    def _alloc_compressed(self, length: int) -> int:
        """Host bytes for one compressed cluster, packed right after the previous one.

        The data may spill into the next host cluster only if that one is
        appended right after (QEMU does the same); else it starts a new cluster.
        """
        pos = self._cpos
        limit = _align_up(pos, self.cluster_size)  # end of the cluster compressed data fills
        if pos + length > limit:
            start = self._alloc(1, refcount=0)
            if start != limit:
                pos = start
        self._cpos = pos + length
        self._count(pos, _align_up(pos + length, SECTOR), +1)
        return pos

    def _count(self, start: int, end: int, delta: int) -> None:
        """Each host cluster that [start, end) touches gains `delta` references (the spec's
        rule for compressed clusters, which may share host clusters)."""
        for cluster in range(start >> self._bits, ((end - 1) >> self._bits) + 1):
            self._refcounts[cluster] += delta
            self._dirty_rb.add(cluster // self._rb_entries)

    def _fit_refcount_table(self) -> None:
        """Move the refcount table to the end if the refcount blocks outgrew it."""
        per_cluster = self.cluster_size // 8
        while len(self._rb_offsets) > self._rt_clusters * per_cluster:
            old_offset, old_clusters = self._rt_offset, self._rt_clusters
            self._rt_clusters = -(-2 * len(self._rb_offsets) // per_cluster)  # room to grow
            self._rt_offset = self._alloc(self._rt_clusters)
            first = old_offset >> self._bits
            for cluster in range(first, first + old_clusters):  # the old table is free space
                self._refcounts[cluster] = 0
                self._dirty_rb.add(cluster // self._rb_entries)

    # Metadata on disk.

    def _header(self) -> bytes:
        backing = b"" if self.backing is None else os.fsencode(self.backing)
        extensions = b""
        if backing:
            extensions += _extension(EXT_BACKING_FORMAT, self.backing_format.encode())
        extensions += _extension(EXT_END, b"")
        header = HEADER.pack(
            MAGIC,
            VERSION,
            HEADER.size + len(extensions) if backing else 0,  # backing name after extensions
            len(backing),
            self._bits,
            _align_up(self.size, SECTOR),
            0,  # no encryption
            self._l1_size,
            self._l1_offset,
            self._rt_offset,
            self._rt_clusters,
            0,  # no snapshots
            0,
            0,  # incompatible features
            0,  # compatible features
            0,  # autoclear features
            REFCOUNT_ORDER,
            HEADER.size,
        )
        return header + extensions + backing

    def _flush(self) -> None:
        """Write L2 tables, L1, refcounts and the header if anything changed (not durable yet)."""
        with self._lock:
            if not self._changed:
                return
            old_table = self._rt_offset
            self._fit_refcount_table()
            for l1_index in sorted(self._dirty_l2):
                self._pwrite(_be_bytes(self._l2[l1_index]), self._l2_offsets[l1_index])
            self._dirty_l2.clear()
            l1 = array("Q", bytes(self._l1_size * 8))
            for l1_index, offset in self._l2_offsets.items():
                l1[l1_index] = COPIED | offset
            self._pwrite(_be_bytes(l1), self._l1_offset)
            self._write_refcounts()
            os.ftruncate(self.fd, self._end)
            if self._rt_offset != old_table:  # make the new table durable before pointing at it
                os.fsync(self.fd)
                os.pwrite(self.fd, self._header(), 0)
            self._changed = False

    def _write_refcounts(self) -> None:
        n = self._rb_entries
        for block in sorted(self._dirty_rb):
            if block >= len(self._rb_offsets):
                continue  # beyond the last allocated cluster: nothing to count yet
            entries = self._refcounts[block * n : (block + 1) * n]
            entries.extend([0] * (n - len(entries)))
            self._pwrite(_be_bytes(entries), self._rb_offsets[block])
        self._dirty_rb.clear()
        table = array("Q", bytes(self._rt_clusters * self.cluster_size))
        table[: len(self._rb_offsets)] = array("Q", self._rb_offsets)
        self._pwrite(_be_bytes(table), self._rt_offset)


def backing_name(path: Path) -> str | None:
    """The backing file name a qcow2 image records (None for none, or not qcow2)."""
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:4] != MAGIC:
            return None
        offset, size = struct.unpack(">QI", head[8:20])
        if not offset or not size:
            return None
        f.seek(offset)
        return os.fsdecode(f.read(min(size, MAX_BACKING_NAME)))
