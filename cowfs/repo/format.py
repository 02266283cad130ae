"""The repository's objects, byte for byte: keys, chunks, indexes, manifests (FORMAT.md).

Pure functions of bytes and names: nothing here touches a store, so another tool (or
a test) can read a repository with this module alone.
"""

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import zstandard

from .store import RepoError

FORMAT_VERSION = 1
CONFIG_KEY = "cowfs-repo.json"
GC_KEY = "gc.json"
"""The generation of the newest gc: a local cache of known chunks older than it lies."""
BAD_KEY = "bad-chunks.json"
LOCK_PREFIX = "locks/"
GC_LOCK = "locks/gc.json"
SNAPSHOT_PREFIX = "snapshots/"
CHUNK_PREFIX = "chunks/"
DEFAULT_CHUNK = 4 << 20
HASH = 32
ZERO_HASH = bytes(HASH)
"""An all-zero chunk: stored nowhere (no SHA-256 is all zeros in practice)."""

CHUNK_MAGIC = b"CWCHUNK1"
RAW, ZSTD = 0, 1
INDEX_MAGIC = b"CWINDEX1"
INDEX_HEADER = struct.Struct("<8sIIQQ")
"""Magic, version, chunk size, image size, chunk count."""

_TIME = "%Y-%m-%dT%H:%M:%SZ"


def chunk_key(digest: bytes) -> str:
    h = digest.hex()
    return f"{CHUNK_PREFIX}{h[:2]}/{h[2:4]}/{h}"


def digest_of_key(key: str) -> bytes | None:
    name = key.rsplit("/", 1)[-1]
    try:
        value = bytes.fromhex(name)
    except ValueError:
        return None
    return value if len(value) == HASH else None


def snapshot_key(image: str, stamp: str, suffix: str) -> str:
    """The image's name is percent-encoded (all but letters, digits and `_.-~`): any file
    name, spaces and UTF-8 included, is one safe key part on S3 and on a file system."""
    return f"{SNAPSHOT_PREFIX}{quote(image, safe='')}/{stamp}{suffix}"


def lock_key(job: str) -> str:
    return f"{LOCK_PREFIX}backup-{job}.json"


def check_image_name(name: str) -> str:
    """An image's name is a file name: not empty, no `/` (snapshots are REPO/IMAGE@TIME)."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise RepoError(f"image name {name!r} cannot name snapshots")
    return name


def stamp_of(point_in_time: datetime, microseconds: bool) -> str:
    """A snapshot's name after its image: the point in time in UTC (to the microsecond
    only when a snapshot of the same second exists)."""
    if microseconds:
        return point_in_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return point_in_time.strftime(_TIME)


def split_snapshot(name: str) -> tuple[str, str]:
    """`vda.img@2026-11-30T02:00:00Z` -> (image, stamp)."""
    image, sep, stamp = name.rpartition("@")
    if not sep or not image or not stamp:
        raise RepoError(f"{name!r} names no snapshot (IMAGE@TIME, as `cowfs repo list` shows)")
    return check_image_name(image), stamp


# -- chunks --------------------------------------------------------------------------


ZSTD_LEVEL = 1
"""Level 1 compresses 4 MiB chunks of disk data at about 600 MiB/s here, level 3 at
260 MiB/s for objects about 10 % smaller: the upload path was CPU-bound at 3."""


def encode_chunk(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """The object of a chunk: magic, codec, payload (zstd unless it saves nothing)."""
    packed = zstandard.ZstdCompressor(level=level).compress(data)
    if len(packed) < len(data):
        return CHUNK_MAGIC + bytes([ZSTD]) + packed
    return CHUNK_MAGIC + bytes([RAW]) + bytes(data)


def decode_chunk(obj: bytes, expected: bytes, max_size: int) -> bytes:
    """The chunk's bytes, checked against the SHA-256 that names it."""
    if obj[: len(CHUNK_MAGIC)] != CHUNK_MAGIC or len(obj) <= len(CHUNK_MAGIC):
        raise ValueError("not a cowfs chunk object")
    codec, payload = obj[len(CHUNK_MAGIC)], obj[len(CHUNK_MAGIC) + 1 :]
    if codec == ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_size)
        except zstandard.ZstdError as e:
            raise ValueError(f"cannot decompress: {e}") from None
    elif codec == RAW:
        data = payload
    else:
        raise ValueError(f"unknown codec {codec}")
    if hashlib.sha256(data).digest() != expected:
        raise ValueError("SHA-256 mismatch")
    return data


# -- indexes -------------------------------------------------------------------------


@dataclass
class Index:
    """One SHA-256 per chunk of the image, in order; ZERO_HASH for an all-zero chunk."""

    chunk_size: int
    size: int
    hashes: list[bytes]

    @property
    def count(self) -> int:
        return len(self.hashes)

    def extent(self, i: int) -> tuple[int, int]:
        offset = i * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def encode(self) -> bytes:
        body = INDEX_HEADER.pack(
            INDEX_MAGIC, FORMAT_VERSION, self.chunk_size, self.size, self.count
        )
        body += b"".join(self.hashes)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, data: bytes, where: str) -> "Index":
        if len(data) < INDEX_HEADER.size + HASH:
            raise RepoError(f"{where}: index truncated")
        body, check = data[:-HASH], data[-HASH:]
        if hashlib.sha256(body).digest() != check:
            raise RepoError(f"{where}: index damaged (SHA-256 mismatch)")
        magic, version, chunk_size, size, count = INDEX_HEADER.unpack_from(body)
        if magic != INDEX_MAGIC or version != FORMAT_VERSION:
            raise RepoError(f"{where}: not a cowfs index of version {FORMAT_VERSION}")
        if len(body) != INDEX_HEADER.size + count * HASH or count != -(-size // chunk_size):
            raise RepoError(f"{where}: index length does not match its header")
        start = INDEX_HEADER.size
        hashes = [body[start + i * HASH : start + (i + 1) * HASH] for i in range(count)]
        return cls(chunk_size, size, hashes)


# -- manifests -----------------------------------------------------------------------


@dataclass
class Manifest:
    """What makes a snapshot exist: written last, after its chunks and its index."""

    image: str
    snapshot: str
    size: int
    chunk_size: int
    cluster_size: int
    point_in_time: str
    parent: str | None
    index: str
    index_sha256: str
    chunks: int
    zero_chunks: int
    new_chunks: int
    new_bytes: int
    """Bytes of the chunk objects this snapshot's backup uploaded (compressed)."""
    data_bytes: int
    """Bytes of the image in chunks that are not all zero."""
    shared_bytes: int = 0
    """Of those, the bytes in chunks the repository held already (not uploaded)."""
    record: dict[str, Any] = field(default_factory=dict)
    status: str = "complete"
    format: str = "cowfs-snapshot"
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> "Manifest":
        try:
            doc = json.loads(data)
            manifest = cls(**doc)
        except (ValueError, TypeError) as e:
            raise RepoError(f"{where}: not a cowfs manifest ({e})") from None
        if manifest.format != "cowfs-snapshot" or manifest.version != FORMAT_VERSION:
            raise RepoError(f"{where}: not a cowfs manifest of version {FORMAT_VERSION}")
        return manifest

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.point_in_time)
