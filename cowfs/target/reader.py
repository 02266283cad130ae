"""Reading one link of a backup chain back: its own clusters, never its backing file's.

`verify` and `restore` must know which file holds each cluster, so a link is read
on its own: what the file itself holds at an offset, and whether it holds anything
there at all (a qcow2 cluster that is unallocated and not zero-flagged reads
through to the backing file). Also checks the qcow2 structure the way `qemu-img
check` does: every table and data cluster inside the file and aligned, no cluster
used twice, refcounts equal to the references. Reads images QEMU wrote too (after
`qemu-img commit`), and refuses with a reason the features cowfs does not read
(encryption, external data files, extended L2 entries, zstd compression).
"""

import functools
import os
import struct
from array import array
from collections import Counter
from pathlib import Path
from typing import cast

from zlib_ng import zlib_ng

from ..errors import CowfsError
from .qcow2 import (
    BIG_ENDIAN,
    COMPRESSED,
    DEFLATE_WBITS,
    HEADER,
    MAGIC,
    MAX_CLUSTER,
    MIN_CLUSTER,
    OFFSET_MASK,
    SECTOR,
    ZERO,
)
from .raw import read_exactly

INFLATE_ERROR = cast(type[Exception], zlib_ng.error)  # its stub calls it an instance

INCOMPATIBLE_DIRTY = 1 << 0
INCOMPATIBLE_CORRUPT = 1 << 1
UNSUPPORTED = {
    1 << 2: "an external data file",
    1 << 3: "a compression type other than deflate",
    1 << 4: "extended L2 entries (subclusters)",
}


def _be_table(data: bytes, typecode: str) -> array:
    table = array(typecode, data)
    if not BIG_ENDIAN:
        table.byteswap()
    return table


class RawLink:
    """A raw file: it holds every byte of the image (holes read as zeros)."""

    format = "raw"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _open(path)
        self.file_size = os.fstat(self.fd).st_size

    def holds(self, offset: int, length: int) -> tuple[bool, bool]:
        """Whether this file holds any and all of [offset, offset+length): a raw file all."""
        return True, True

    def read_into(self, view: memoryview, offset: int) -> tuple[bool, bool]:
        """Fill `view` with this file's bytes at `offset` (zeros past its end); returns
        whether it holds any and all of them, as `holds`."""
        got = os.preadv(self.fd, [view], offset)
        while 0 < got < len(view):
            more = os.preadv(self.fd, [view[got:]], offset + got)
            if not more:
                break
            got += more
        if got < len(view):
            view[got:] = bytes(len(view) - got)
        return True, True

    def is_hole(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) is a hole of the file (reads as zeros unread)."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) >= offset + length
        except OSError:  # ENXIO: no data after offset
            return True

    def check(self, size: int) -> list[str]:
        if self.file_size < size:
            return [f"{self.path}: {self.file_size} bytes, shorter than the image's {size}"]
        return []

    def close(self) -> None:
        os.close(self.fd)


class Qcow2Link:
    """A qcow2 file: its mapping loaded from the file (L2 tables as they are needed)."""

    format = "qcow2"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _open(path)
        try:
            self._parse_header()
        except BaseException:
            os.close(self.fd)
            raise
        self._l2: dict[int, array] = {}

    def _bad(self, what: str) -> CowfsError:
        return CowfsError(f"{self.path}: damaged qcow2 image: {what}")

    def _parse_header(self) -> None:
        self.file_size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, HEADER.size, 0)
        if len(head) < 72 or head[:4] != MAGIC:
            raise self._bad("no qcow2 header")
        head = head + bytes(HEADER.size - len(head))
        (
            _magic,
            version,
            _backing_offset,
            _backing_size,
            bits,
            self.virtual_size,
            crypt,
            self.l1_size,
            self.l1_offset,
            self.rt_offset,
            self.rt_clusters,
            self.snapshots,
            _snapshots_offset,
            incompatible,
            _compatible,
            _autoclear,
            refcount_order,
            _header_length,
        ) = HEADER.unpack(head)
        if version == 2:
            refcount_order, incompatible = 4, 0
        elif version != 3:
            raise self._bad(f"version {version}")
        if not MIN_CLUSTER.bit_length() - 1 <= bits <= MAX_CLUSTER.bit_length() - 1:
            raise self._bad(f"cluster bits {bits}")
        if crypt:
            raise CowfsError(f"{self.path}: encrypted qcow2 images are not supported")
        for bit, what in UNSUPPORTED.items():
            if incompatible & bit:
                raise CowfsError(f"{self.path}: qcow2 with {what} is not supported")
        if incompatible & INCOMPATIBLE_CORRUPT:
            raise self._bad("QEMU marked it corrupt")
        if incompatible & INCOMPATIBLE_DIRTY:
            raise self._bad("its refcounts are dirty (a writer did not close it)")
        if refcount_order > 6:
            raise self._bad(f"refcount order {refcount_order}")
        self.refcount_order = refcount_order
        self.cluster_size = 1 << bits
        self._bits = bits
        self._l2_entries = self.cluster_size // 8
        self._csize_shift = 62 - (bits - 8)
        self._csize_mask = (1 << (bits - 8)) - 1
        needed = -(-self.virtual_size // (self.cluster_size * self._l2_entries))
        if self.l1_size < needed:
            raise self._bad(f"L1 table of {self.l1_size} entries for {self.virtual_size} bytes")
        self._need(self.l1_offset, self.l1_size * 8, "the L1 table")
        self.l1 = _be_table(os.pread(self.fd, self.l1_size * 8, self.l1_offset), "Q")

    def _need(self, offset: int, length: int, what: str, aligned: bool = True) -> None:
        """[offset, offset+length) must lie in the file; tables and data clusters start at
        sector boundaries too (compressed clusters are packed at any byte)."""
        if (aligned and offset % SECTOR) or offset + length > self.file_size:
            raise self._bad(f"{what} at {offset} lies outside the file")

    # -- the mapping ------------------------------------------------------------------

    def _entry(self, guest: int) -> int:
        l1_index, l2_index = divmod(guest >> self._bits, self._l2_entries)
        if l1_index >= len(self.l1):
            return 0
        table = self._l2.get(l1_index)
        if table is None:
            offset = self.l1[l1_index] & OFFSET_MASK
            if not offset:
                return 0
            if offset % self.cluster_size:
                raise self._bad(f"L2 table at {offset} is not cluster aligned")
            self._need(offset, self.cluster_size, "an L2 table")
            table = _be_table(os.pread(self.fd, self.cluster_size, offset), "Q")
            self._l2[l1_index] = table
        return table[l2_index]

    def _compressed(self, entry: int) -> tuple[int, int]:
        host = entry & ((1 << self._csize_shift) - 1)
        sectors = (entry >> self._csize_shift & self._csize_mask) + 1
        return host, host // SECTOR * SECTOR + sectors * SECTOR - host

    def holds(self, offset: int, length: int) -> tuple[bool, bool]:
        """Whether any and whether all clusters of [offset, offset+length) are this file's
        (data or zero flag); the others read through to the backing file."""
        held = [_held(self._entry(g)) for g in range(offset, offset + length, self.cluster_size)]
        return any(held), all(held)

    def read_into(self, view: memoryview, offset: int) -> tuple[bool, bool]:
        """Fill `view` with this file's bytes at cluster-aligned `offset` (unallocated
        clusters as zeros), reading runs of contiguous host clusters at once; returns
        whether it holds any and all of those clusters, as `holds`."""
        cs = self.cluster_size
        length = len(view)
        any_held, all_held = False, True
        run_pos = run_host = -1  # a run of contiguous data clusters not yet read
        run_len = 0
        for pos in range(0, length, cs):
            entry = self._entry(offset + pos)
            piece = min(cs, length - pos)
            host = entry & OFFSET_MASK
            if _held(entry):
                any_held = True
            else:
                all_held = False
            if host and not entry & (COMPRESSED | ZERO):
                if host % cs:
                    raise self._bad(f"cluster at offset {offset + pos} is misaligned")
                self._need(host, 1, "a data cluster")  # a short last one reads as zeros
                if run_len and run_host + run_len == host:
                    run_len += piece
                    continue
                self._read_run(view, run_pos, run_host, run_len)
                run_pos, run_host, run_len = pos, host, piece
                continue
            self._read_run(view, run_pos, run_host, run_len)
            run_len = 0
            if entry & COMPRESSED:
                view[pos : pos + piece] = self._decompress(entry)[:piece]
            else:
                view[pos : pos + piece] = _zeros(piece)
        self._read_run(view, run_pos, run_host, run_len)
        return any_held, all_held

    def _read_run(self, view: memoryview, pos: int, host: int, length: int) -> None:
        if length:
            part = view[pos : pos + length]
            got = os.preadv(self.fd, [part], host)
            while 0 < got < length:
                more = os.preadv(self.fd, [part[got:]], host + got)
                if not more:
                    break
                got += more
            if got < length:
                part[got:] = _zeros(length - got)

    def _decompress(self, entry: int) -> bytes:
        cs = self.cluster_size
        host, size = self._compressed(entry)
        self._need(host, 1, "a compressed cluster", aligned=False)  # its size is a bound
        try:
            data = zlib_ng.decompressobj(DEFLATE_WBITS).decompress(
                read_exactly(self.fd, host, size), cs
            )
        except INFLATE_ERROR as e:
            raise self._bad(f"compressed cluster at {host}: {e}") from None
        return data + _zeros(cs - len(data))

    # -- the structure ------------------------------------------------------------------

    def check(self, size: int) -> list[str]:
        """What `qemu-img check` would call corruption (leaks are not): one line each."""
        problems: list[str] = []
        cs = self.cluster_size
        refs: Counter[int] = Counter()

        def use(offset: int, length: int, what: str, partial: bool = False) -> bool:
            """Count the references of [offset, offset+length); data may end past the
            file (`partial`: the file's last cluster, short, reads as zeros)."""
            if offset + (1 if partial else length) > self.file_size:
                problems.append(f"{self.path}: {what} at {offset} is beyond the end of the file")
                return False
            for cluster in range(offset // cs, (offset + length - 1) // cs + 1):
                refs[cluster] += 1
            return True

        if self.virtual_size < size:
            problems.append(f"{self.path}: virtual size {self.virtual_size} < the image's {size}")
        use(0, cs, "the header")
        use(self.l1_offset, self.l1_size * 8, "the L1 table")
        use(self.rt_offset, self.rt_clusters * cs, "the refcount table")
        used_data: set[int] = set()
        for l1_index, l1_entry in enumerate(self.l1):
            offset = l1_entry & OFFSET_MASK
            if not offset:
                continue
            if offset % cs or not use(offset, cs, f"L2 table {l1_index}"):
                problems.append(f"{self.path}: L2 table {l1_index} at {offset} is misplaced")
                continue
            for l2_index, entry in enumerate(self._table(l1_index)):
                guest = (l1_index * self._l2_entries + l2_index) * cs
                if entry & COMPRESSED:
                    host, length = self._compressed(entry)
                    use(host, length, f"the compressed cluster of offset {guest}", True)
                elif entry & OFFSET_MASK:
                    host = entry & OFFSET_MASK
                    if host % cs:
                        problems.append(f"{self.path}: cluster at offset {guest} is misaligned")
                    elif host in used_data:
                        problems.append(f"{self.path}: host cluster {host} is used twice")
                    else:
                        used_data.add(host)
                        use(host, cs, f"the data cluster of offset {guest}", True)
        if self.snapshots:  # internal snapshots hold references cowfs does not follow
            return problems
        refcounts = self._refcounts(problems)
        for cluster, count in sorted(refs.items()):
            have = refcounts.get(cluster, 0)
            if have != count:
                problems.append(
                    f"{self.path}: refcount of host cluster {cluster} is {have}, "
                    f"but it is referenced {count} times"
                )
                if len(problems) > 20:
                    break
        return problems

    def _table(self, l1_index: int) -> array:
        self._entry(l1_index * self._l2_entries * self.cluster_size)
        return self._l2[l1_index]

    def _refcounts(self, problems: list[str]) -> dict[int, int]:
        cs = self.cluster_size
        width = 1 << self.refcount_order
        per_block = cs * 8 // width
        counts: dict[int, int] = {}
        if self.rt_offset + self.rt_clusters * cs > self.file_size:
            return counts
        table = _be_table(os.pread(self.fd, self.rt_clusters * cs, self.rt_offset), "Q")
        for index, block in enumerate(table):
            if not block:
                continue
            if block % cs or block + cs > self.file_size:
                problems.append(f"{self.path}: refcount block {index} at {block} is misplaced")
                continue
            data = os.pread(self.fd, cs, block)
            for i, value in enumerate(_refcount_values(data, width)):
                if value:
                    counts[index * per_block + i] = value
        return counts

    def close(self) -> None:
        os.close(self.fd)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CowfsError(f"{path}: cannot open: {e.strerror}") from None


def _held(entry: int) -> bool:
    return bool(entry & (COMPRESSED | ZERO | OFFSET_MASK))


@functools.cache
def _zeros(length: int) -> bytes:
    return bytes(length)


def _refcount_values(data: bytes, width: int) -> list[int]:
    if width >= 8:
        code = {8: "B", 16: ">H", 32: ">I", 64: ">Q"}[width]
        return [v for (v,) in struct.iter_unpack(code, data)]
    value = int.from_bytes(data, "big")
    total = len(data) * 8 // width
    mask = (1 << width) - 1
    return [(value >> ((total - 1 - i) * width)) & mask for i in range(total)]


def open_link(path: Path) -> RawLink | Qcow2Link:
    """The file of one link, by what its first bytes say (as QEMU probes, for reading)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CowfsError(f"{path}: cannot open: {e.strerror}") from None
    return Qcow2Link(path) if magic == MAGIC else RawLink(path)
