"""The write-intent record of one source: which regions may hold writes that the last
durable save of its bitmaps does not.

The file (`.NAME.cowfs-intent` beside the source and its bitmap file) holds an
*alive page* and two fixed-size slots. Each update goes to the slot that does not
hold the newest record, with one `fdatasync`: a torn or lost update leaves the
other slot, the previous record, which is still valid (each slot carries its own
SHA-256). That is an atomic replacement without a rename, so the common update
allocates nothing and costs one small synchronous write — which matters on the
guest's write path, and keeps change tracking working on a full filesystem (the
blocks are allocated when the file is made). Only a record too big for its slots
(the source grew a lot) makes a new file, by rename. On filesystems that copy on
write (btrfs, ZFS) an overwrite allocates too; it is still atomic there.

The alive page (the first 4 KiB, mapped into the daemon's memory) says when the
session's last write to the source started and ended: two stores per write, no
system call. It is never made durable on purpose, and need not be: after the
daemon dies (kill -9, a crash of its own) the page cache still holds it, exact; after
the machine went down it is stale, which its boot id shows, and the lease alone bounds
the writes. So a source written outside cowfs after a kill -9 is seen even a moment
later. All integers little-endian:

    magic "COWFSALV" | boot id 16 bytes | session 16 bytes | started ns u64 | ended ns u64

`started` is nonzero while a write runs (its start plus WRITE_BOUND_NS: a write
cannot still change the source's times after that); `ended` is when the last one
returned. A file system that cannot map the page (FUSE with direct_io) leaves it
without its magic: the lease alone bounds the writes then.

A slot:

    magic "COWFSINT" | version u32 | slot size u32 | seq u64 | session 16 bytes |
    lease ns u64 | region size u64 | size limit u64 | regions n u64 |
    n bits, packed little-endian by 8 | zero padding | SHA-256 of all before it

`session` names the mount that wrote it (the bitmap file names the same session
while that mount runs); `lease` is a wall-clock time no write of that mount is later
than; `size limit` the largest size the mount may have given the source.
"""

import hashlib
import mmap
import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bitarray import bitarray

from .errors import CowfsError

REGION_SIZE = 64 << 20
"""The default bytes per intent bit (tracking.py says why)."""
SAVE_PERIOD_S = 10.0
"""The default seconds of writes between two saves of the bitmaps (tracking.py)."""
MAGIC = b"COWFSINT"
VERSION = 1
HEADER = struct.Struct("<8sIIQ16sQQQQ")
DIGEST = 32
PAGE = 4096
ALIVE_MAGIC = b"COWFSALV"
ALIVE = struct.Struct("<8s16s16sQQ")
STARTED, ENDED = 5, 6
"""The alive page's two times, as indices of 8-byte words."""
WRITE_BOUND_NS = 100_000_000
"""How long after its start a running write may still set the source's times: they are
set as the write system call begins, microseconds after. Longer only if the daemon was
not scheduled meanwhile, and then a recovery refuses rather than trusts."""


@dataclass
class IntentRecord:
    session: str
    """16 bytes in hex: the mount that wrote the record."""
    seq: int
    lease_ns: int
    region_size: int
    size_limit: int
    regions: bitarray
    written_before_ns: int | None = None
    """From the alive page (read back in the same boot): no write of the session set the
    source's times later. None when unknown (another boot, or no page)."""

    def pack(self, slot_size: int) -> bytes:
        bits = bitarray(self.regions, endian="little")
        bits.fill()
        body = HEADER.pack(
            MAGIC, VERSION, slot_size, self.seq, bytes.fromhex(self.session),
            self.lease_ns, self.region_size, self.size_limit, len(self.regions),
        ) + bits.tobytes()  # fmt: skip
        if len(body) + DIGEST > slot_size:
            raise ValueError("record larger than its slot")
        body += bytes(slot_size - DIGEST - len(body))
        return body + hashlib.sha256(body).digest()


def intent_path(source: Path) -> Path:
    """Beside the real file, like its bitmaps."""
    source = source.resolve()
    return source.with_name(f".{source.name}.cowfs-intent")


def slot_size_for(nregions: int) -> int:
    """Room for twice `nregions` (a source that grows keeps its file), in whole pages."""
    need = HEADER.size + (2 * nregions + 7) // 8 + DIGEST
    return -(-need // PAGE) * PAGE


def _unpack(slot: bytes) -> IntentRecord | None:
    """The record in `slot`, or None if it is torn, damaged or was never written."""
    if len(slot) < HEADER.size + DIGEST or slot[:8] != MAGIC:
        return None
    body, digest = slot[:-DIGEST], slot[-DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        return None
    _, version, size, seq, session, lease, region, limit, n = HEADER.unpack_from(body)
    if version != VERSION or size != len(slot) or HEADER.size + (n + 7) // 8 > len(body):
        return None
    bits = bitarray(endian="little")
    bits.frombytes(body[HEADER.size : HEADER.size + (n + 7) // 8])
    return IntentRecord(session.hex(), seq, lease, region, limit, bitarray(bits[:n], "big"))


def read_intent(path: Path) -> IntentRecord | None:
    """The newest valid record; None if the file does not exist. A file with no valid
    slot (both damaged) is a CowfsError: what it held is lost."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CowfsError(f"cannot read the intent record {path}: {e.strerror}") from None
    slot_size = (len(raw) - PAGE) // 2
    records = [_unpack(raw[PAGE + i * slot_size : PAGE + (i + 1) * slot_size]) for i in (0, 1)]
    valid = [r for r in records if r is not None]
    if not valid:
        raise CowfsError(f"the intent record {path} is damaged")
    record = max(valid, key=lambda r: r.seq)
    magic, boot, session, started, ended = ALIVE.unpack_from(raw)
    if magic == ALIVE_MAGIC and boot == boot_id() and session.hex() == record.session:
        record.written_before_ns = started or ended
    return record


def boot_id() -> bytes:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return uuid.UUID(f.read().strip()).bytes


class IntentFile:
    """The open intent file of a serving mount. `write` blocks (call it from a worker
    thread); the rest belongs to the loop that writes the source."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.alive: memoryview | None = None
        """The alive page as 8-byte words (STARTED, ENDED); None without a file."""
        self._fd: int | None = None
        self._slot_size = 0
        self._map: mmap.mmap | None = None
        self._next: tuple[int, int, mmap.mmap | None] | None = None
        """A new file, written in the thread, that `adopt` takes over in the loop."""

    @property
    def made(self) -> bool:
        """Whether this session has its file (adopted) yet."""
        return self._fd is not None

    def write(self, record: IntentRecord) -> None:
        """Make `record` durable: in the slot its seq selects, or in a new file when it
        does not fit (or there is no file yet). Then call `adopt` from the loop."""
        need = HEADER.size + (len(record.regions) + 7) // 8 + DIGEST
        if self._fd is None or need > self._slot_size:
            self._replace(record)
            return
        slot = record.pack(self._slot_size)
        os.pwrite(self._fd, slot, PAGE + (record.seq % 2) * self._slot_size)
        os.fdatasync(self._fd)

    def _replace(self, record: IntentRecord) -> None:
        slot_size = slot_size_for(len(record.regions))
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        mapped = None
        try:
            slots = [bytes(slot_size), bytes(slot_size)]  # both allocated now, not later
            slots[record.seq % 2] = record.pack(slot_size)
            os.pwrite(fd, bytes(PAGE) + b"".join(slots), 0)
            try:
                mapped = mmap.mmap(fd, PAGE)
            except OSError:  # no shared mappings here: no alive page, the lease bounds
                pass
            else:
                session = bytes.fromhex(record.session)
                ALIVE.pack_into(mapped, 0, ALIVE_MAGIC, boot_id(), session, 0, time.time_ns())
            os.fsync(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            if mapped is not None:
                mapped.close()
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._next = (fd, slot_size, mapped)

    def adopt(self) -> None:
        """Take over a file `write` made: the alive page's times go along (writes may have
        set them in the old page meanwhile)."""
        if self._next is None:
            return
        fd, slot_size, new_map = self._next
        self._next = None
        new_words = None if new_map is None else memoryview(new_map).cast("Q")
        if self.alive is not None and new_words is not None:
            new_words[STARTED], new_words[ENDED] = self.alive[STARTED], self.alive[ENDED]
        self.close()
        self._fd, self._slot_size, self._map, self.alive = fd, slot_size, new_map, new_words

    def close(self) -> None:
        if self.alive is not None:
            self.alive.release()
            self.alive = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_intent(path: Path) -> None:
    """Take the record away for good (durably): after a crash, no recovery from it."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
