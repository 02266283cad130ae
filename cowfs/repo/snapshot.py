"""A repository snapshot read back through its index, every chunk checked.

The restore commands read a backup the same way whatever holds it (restore.py asks
for `size`, `cluster_size`, `record`, `top`, `links` and `read`), so a snapshot
answers as a file chain does: `read` returns the image's bytes at the point in time,
each chunk checked against the SHA-256 that names it, and a chunk that is missing or
damaged is a CorruptCluster that names it. Chunks are fetched whole and a few are
kept, so the restore's cluster-sized reads cost one GET per chunk.
"""

import concurrent.futures
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

from ..chainread import CorruptCluster
from ..record import Record
from .format import ZERO_HASH, chunk_key
from .repository import Repository
from .store import MissingObject, RepoError, S3Access

log = logging.getLogger(__name__)

READERS = 4
AHEAD = 4
"""Chunks fetched ahead of a reader that goes in order (a restore's copiers): S3's
latency hides behind several GETs in flight."""
KEEP = 16
"""Chunks kept decoded: the read-ahead's, and those the copiers and on-demand reads use."""


def is_snapshot(source: str) -> bool:
    """Whether `source` names a repository snapshot (REPO/IMAGE@TIME), not a file."""
    if source.startswith("s3://"):
        return True
    path = Path(source)
    if path.exists() or "@" not in path.name:
        return False
    return (path.parent / "cowfs-repo.json").is_file()


class RepoSnapshot:
    def __init__(self, repo: Repository, name: str) -> None:
        self.repo = repo
        self.manifest = repo.manifest(name)
        self.index = repo.index(self.manifest)
        self.top = repo.snapshot_url(*name.rsplit("@", 1))
        self.size = self.manifest.size
        self.cluster_size = self.manifest.cluster_size
        self.chunk_size = self.manifest.chunk_size
        known = {f.name for f in fields(Record)}
        self.record = Record(**{k: v for k, v in self.manifest.record.items() if k in known})
        self.links: list = []
        """No files: nothing a destination could overwrite."""
        self._lock = threading.Lock()
        self._kept: OrderedDict[int, bytes] = OrderedDict()
        self._fetching: dict[int, threading.Event] = {}
        self._ahead = concurrent.futures.ThreadPoolExecutor(AHEAD, "read-ahead")

    @classmethod
    def open(cls, source: str, access: S3Access | None) -> "RepoSnapshot":
        url, sep, name = source.rstrip("/").rpartition("/")
        if not sep or "@" not in name:
            raise RepoError(f"{source} names no snapshot (REPO/IMAGE@TIME)")
        return cls(Repository.open(url, access), name)

    @property
    def bytes_to_verify(self) -> int:
        return sum(
            self.index.extent(i)[1] for i, h in enumerate(self.index.hashes) if h != ZERO_HASH
        )

    def read(self, offset: int, length: int) -> bytearray:
        """The image's bytes at [offset, offset+length), verified. Raises CorruptCluster."""
        out = bytearray(length)
        pos = offset
        end = offset + length
        while pos < end:
            i = pos // self.chunk_size
            start = i * self.chunk_size
            piece = min(end, start + self.chunk_size) - pos
            if self.index.hashes[i] != ZERO_HASH:
                data = self.chunk(i)
                out[pos - offset : pos - offset + piece] = data[pos - start : pos - start + piece]
            pos += piece
        return out

    def chunk(self, i: int) -> bytes:
        """Chunk `i`, fetched once however many readers want it at the same time. A
        reader going through the image in order gets the next chunks fetched ahead."""
        while True:
            with self._lock:
                sequential = i - 1 in self._kept
                data = self._kept.get(i)
                if data is not None:
                    self._kept.move_to_end(i)
                    break
                waiting = self._fetching.get(i)
                if waiting is None:
                    self._fetching[i] = threading.Event()
                    break
            waiting.wait()  # then kept, or (a read-ahead failed) ours to fetch
        if sequential:
            self._read_ahead(i)
        return data if data is not None else self._load(i)

    def _load(self, i: int) -> bytes:
        """Fetch chunk `i` (its fetching event is ours) and keep it."""
        try:
            data = self._fetch(i)
            with self._lock:
                self._kept[i] = data
                while len(self._kept) > KEEP:
                    self._kept.popitem(last=False)
            return data
        finally:
            with self._lock:
                self._fetching.pop(i).set()

    def _read_ahead(self, i: int) -> None:
        hashes = self.index.hashes
        for j in range(i + 1, min(i + 1 + AHEAD, len(hashes))):
            with self._lock:
                if hashes[j] == ZERO_HASH or j in self._kept or j in self._fetching:
                    continue
                self._fetching[j] = threading.Event()
            self._ahead.submit(self._load_ahead, j)

    def _load_ahead(self, j: int) -> None:
        try:
            self._load(j)
        except (CorruptCluster, RepoError) as e:  # the reader that needs it fetches it
            log.debug("read-ahead of chunk %d: %s", j, e)  # again and reports the error

    def _fetch(self, i: int) -> bytes:
        digest = self.index.hashes[i]
        offset, length = self.index.extent(i)
        where = f"{self.repo.url}/{chunk_key(digest)}"
        try:
            return self.repo.get_chunk(digest, length)
        except MissingObject:
            raise CorruptCluster(where, offset, "chunk missing from the repository") from None
        except ValueError as e:
            raise CorruptCluster(where, offset, f"chunk damaged: {e}") from None

    def verify(self, progress: Callable[[int], None]) -> Iterator[CorruptCluster]:
        """Every chunk of the snapshot fetched and re-hashed (each distinct one once, four
        at a time); yields what is wrong, chunk by chunk."""
        first: dict[bytes, int] = {}
        for i, digest in enumerate(self.index.hashes):
            if digest != ZERO_HASH:
                first.setdefault(digest, i)

        def check(i: int) -> CorruptCluster | None:
            try:
                self._fetch(i)
            except CorruptCluster as e:
                return e
            finally:
                progress(self.index.extent(i)[1])
            return None

        with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
            for problem in pool.map(check, first.values()):
                if problem is not None:
                    yield problem

    def close(self) -> None:
        self._ahead.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._kept.clear()
