"""The write-intent record of one source: which regions may hold writes that the last
durable save of its bitmaps does not.

The file (`.NAME.cowfs-intent` beside the source and its bitmap file) holds two
fixed-size slots. Each update goes to the slot that does not hold the newest record,
with one `fdatasync`: a torn or lost update leaves the other slot, the previous
record, which is still valid (each slot carries its own SHA-256). That is an atomic
replacement without a rename, so the common update allocates nothing and costs one
small synchronous write — which matters on the guest's write path, and keeps change
tracking working on a full filesystem (the blocks are allocated when the file is
made). Only a record too big for its slots (the source grew a lot) makes a new file,
by rename. On filesystems that copy on write (btrfs, ZFS) an overwrite allocates
too; it is still atomic there.

A slot, all integers little-endian:

    magic "COWFSINT" | version u32 | slot size u32 | seq u64 | session 16 bytes |
    lease ns u64 | region size u64 | size limit u64 | regions n u64 |
    n bits, packed little-endian by 8 | zero padding | SHA-256 of all before it

`session` names the mount that wrote it (the bitmap file names the same session
while that mount runs); `lease` is a wall-clock time no write of that mount is later
than; `size limit` the largest size the mount may have given the source.
"""

import hashlib
import os
import struct
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


@dataclass
class IntentRecord:
    session: str
    """16 bytes in hex: the mount that wrote the record."""
    seq: int
    lease_ns: int
    region_size: int
    size_limit: int
    regions: bitarray

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
    slot_size = len(raw) // 2
    records = [_unpack(raw[i * slot_size : (i + 1) * slot_size]) for i in (0, 1)]
    valid = [r for r in records if r is not None]
    if not valid:
        raise CowfsError(f"the intent record {path} is damaged")
    return max(valid, key=lambda r: r.seq)


class IntentFile:
    """The open intent file of a serving mount. Blocking: call it from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.slot_size = 0

    def write(self, record: IntentRecord) -> None:
        """Make `record` durable: in the slot its seq selects, or in a new file when it
        does not fit (or there is no file yet)."""
        need = HEADER.size + (len(record.regions) + 7) // 8 + DIGEST
        if self.fd is None or need > self.slot_size:
            self._replace(record)
            return
        slot = record.pack(self.slot_size)
        os.pwrite(self.fd, slot, (record.seq % 2) * self.slot_size)
        os.fdatasync(self.fd)

    def _replace(self, record: IntentRecord) -> None:
        slot_size = slot_size_for(len(record.regions))
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            slots = [bytes(slot_size), bytes(slot_size)]  # both allocated now, not later
            slots[record.seq % 2] = record.pack(slot_size)
            os.pwrite(fd, b"".join(slots), 0)
            os.fsync(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.close()
        self.fd, self.slot_size = fd, slot_size

    def remove(self) -> None:
        """Take the record away for good (durably): after a crash, no recovery from it."""
        self.close()
        remove_intent(self.path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_intent(path: Path) -> None:
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
