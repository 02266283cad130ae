"""A repository as a job's target: clusters in, chunks out, a snapshot at the end.

Copy-before-write and the copier hand clusters over in any order; a chunk can be
hashed only once all of it is there. So clusters land in a *spool*: a sparse,
unnamed local file of the image's size, written at the clusters' own offsets. When
the last needed byte of a chunk arrives, the chunk is complete: an upload thread
reads it back, hashes it, uploads it unless the repository holds it already, and
frees its place in the spool. Memory stays at one chunk per upload thread.

The guest never waits on an upload: a copy-before-write only writes the spool, and
if the spool is full it fails (with ENOSPC) as any full target does, under the
job's policy. The copier waits instead (`admit`) while the spool is more than half
full, so uploads that fall behind slow the copier, not the guest.

An incremental takes every chunk that holds a dirty cluster whole (`needs`), and
every other chunk's hash from its parent's index. A gc never runs while the backup
does: the lock object is taken before the cache of known chunks is read.
"""

import errno
import hashlib
import logging
import os
import threading
from collections import deque
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from bitarray import bitarray
from bitarray.util import intervals, zeros

from ..record import Record
from ..sums import Checksums
from ..target.raw import punch_hole, read_exactly
from .format import ZERO_HASH, Index, Manifest, check_image_name, snapshot_key, stamp_of
from .repository import HEARTBEAT_S, Repository
from .store import RepoError

log = logging.getLogger(__name__)

UPLOADERS = 4
"""Upload threads: hashing and zstd release the GIL, and S3 latency hides behind four."""
DEFAULT_SPOOL_SIZE = 1 << 30


def chunks_holding(clusters: bitarray, per: int) -> set[int]:
    """The chunks (of `per` clusters) that hold a set bit. Walks runs of bits, not chunks:
    `needs` and `begin` run under the barrier, while guest writes wait (a 1 TiB image
    took 0.11 s chunk by chunk)."""
    out: set[int] = set()
    for value, start, stop in intervals(clusters):
        if value:
            out.update(range(start // per, (stop - 1) // per + 1))
    return out


class RepoTarget:
    """A snapshot being written into a repository (the Target protocol of target/)."""

    format = "repo"
    backing: Path | None = None
    checksummed = False
    """Chunks are named by their SHA-256: no per-cluster checksums to keep."""
    closed_before_record = False

    def __init__(
        self,
        repo: Repository,
        image: str,
        parent: tuple[Manifest, Index] | None,
        spool_dir: Path,
        spool_size: int,
        cluster_size: int,
    ) -> None:
        self.repo = repo
        self.image = check_image_name(image)
        self.parent = parent
        self.chunk_size = repo.chunk_size
        self.cluster_size = cluster_size
        self.spool_size = spool_size
        self.path = spool_dir
        self.stamp: str | None = None
        self.lock_id = os.urandom(16).hex()
        try:
            self.fd = os.open(spool_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise RepoError(f"cannot make a spool file in {spool_dir}: {e.strerror}") from None
        self.size = 0
        self._cond = threading.Condition()
        self._expected: list[int] = []
        self._filled: list[int] = []
        self._spooled_of: list[int] = []
        self._hashes: list[bytes | None] = []
        self._ready: deque[int] = deque()
        self._pending = 0
        self._uploading = 0
        self.spooled = 0
        self.error: str | None = None
        self.new_chunks = 0
        self.new_bytes = 0
        self.new_data = 0
        """Bytes of the chunks this backup uploaded, before compression."""
        self.zero_chunks = 0
        self._uploaded: list[bytes] = []
        self._closing = False
        self.index: Index | None = None
        self._threads: list[threading.Thread] = []
        try:
            repo.lock_backup(self.lock_id)  # before the cache: no gc may delete what it lists
            try:
                self._bad = repo.bad_chunks()
                self._known = repo.known_chunks()
            except BaseException:
                repo.unlock_backup(self.lock_id)
                raise
        except BaseException:
            os.close(self.fd)
            raise
        self._locked = True

    @property
    def name(self) -> str:
        return self.repo.snapshot_url(self.image, self.stamp or "(starting)")

    # -- the job's start ---------------------------------------------------------------

    def needs(self, clusters: bitarray, size: int) -> bitarray:
        """Every cluster of each chunk that holds one of `clusters` (a chunk is hashed
        whole), and of the chunks the parent's index cannot give: where the image's
        size changed, and chunks the last verify found bad."""
        per = self.chunk_size // self.cluster_size
        count = -(-size // self.cluster_size)
        out = zeros(count)
        known = min(count, len(clusters))
        out[:known] = clusters[:known]
        chunks = chunks_holding(out, per)
        if self.parent is not None:
            index = self.parent[1]
            if index.size != size:
                chunks.add(max(index.size - 1, 0) // self.chunk_size)
                chunks.add(max(size - 1, 0) // self.chunk_size)
            chunks.update(i for i, h in enumerate(index.hashes) if h in self._bad)
        for i in chunks:
            out[i * per : (i + 1) * per] = 1
        return out

    def begin(self, size: int, needed: bitarray, at: datetime) -> None:
        """At the point in time: which chunks this snapshot writes, and its name."""
        per = self.chunk_size // self.cluster_size
        count = -(-size // self.chunk_size)
        self.size = size
        os.ftruncate(self.fd, size)
        self._expected = [0] * count
        for i in chunks_holding(needed, per):
            self._expected[i] = min(self.chunk_size, size - i * self.chunk_size)
        self._filled = [0] * count
        self._spooled_of = [0] * count
        self._hashes = [None] * count
        self._pending = sum(1 for e in self._expected if e)
        self.stamp = stamp_of(at, microseconds=False)
        for n in range(UPLOADERS):
            t = threading.Thread(target=self._upload_loop, name=f"upload-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        beat = threading.Thread(target=self._heartbeat, name="repo-lock", daemon=True)
        beat.start()
        self._threads.append(beat)

    # -- clusters in -------------------------------------------------------------------

    def guest_gone(self) -> None:
        """The live file is gone: uploads already take whatever CPU is free."""

    def admit(self, length: int) -> None:
        """Blocking, the copier's: wait while the spool is over half full and uploads
        are under way, so that copy-before-write finds room. With none under way only
        the copier can complete the chunks that fill it: it goes on."""
        with self._cond:
            while self.spooled + length > self.spool_size // 2:
                if self.error or self._closing:
                    return  # the write that follows fails with the reason
                if not self._ready and not self._uploading:
                    return  # only copying completes the chunks that fill the spool
                self._cond.wait()

    def write(self, offset: int, data: memoryview) -> None:
        length = len(data)
        with self._cond:
            if self.error:
                raise OSError(errno.EIO, self.error)
            if self._closing:
                raise OSError(errno.EIO, "the job has ended")
            if self.spooled + length > self.spool_size:
                raise OSError(
                    errno.ENOSPC, f"the spool is full ({self.spool_size} bytes): uploads lag"
                )
            self.spooled += length
        pos = 0
        while pos < length:
            pos += os.pwrite(self.fd, data[pos:], offset + pos)
        self._arrived(offset, length, spooled=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._arrived(offset, length, spooled=False)

    def _arrived(self, offset: int, length: int, spooled: bool) -> None:
        end = offset + length
        with self._cond:
            while offset < end:
                i = offset // self.chunk_size
                piece = min(end, (i + 1) * self.chunk_size) - offset
                self._filled[i] += piece
                if spooled:
                    self._spooled_of[i] += piece
                if self._filled[i] == self._expected[i]:
                    self._ready.append(i)
                    self._cond.notify_all()
                elif self._filled[i] > self._expected[i]:
                    self.error = f"chunk {i} got more bytes than it has (a bug)"
                    self._cond.notify_all()
                offset += piece

    def read(self, offset: int, length: int) -> bytes:
        raise OSError(errno.EOPNOTSUPP, "a repository target is not read back while written")

    # -- chunks out --------------------------------------------------------------------

    def _upload_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                i = self._ready.popleft()
                self._uploading += 1
            try:
                digest = self._store_chunk(i)
            except (RepoError, OSError) as e:
                reason = e.message if isinstance(e, RepoError) else str(e)
                log.error("upload of chunk %d failed: %s", i, reason)
                with self._cond:
                    self.error = self.error or f"uploading to {self.repo.url}: {reason}"
                    self._uploading -= 1
                    self._cond.notify_all()
                continue
            with self._cond:
                self._uploading -= 1
                self._hashes[i] = digest
                self.spooled -= self._spooled_of[i]
                self._pending -= 1
                self._cond.notify_all()

    def _store_chunk(self, i: int) -> bytes:
        offset = i * self.chunk_size
        length = self._expected[i]
        data = read_exactly(self.fd, offset, length) if self._spooled_of[i] else bytes(length)
        if not any(data[:64]) and data == bytes(length):
            with self._cond:
                self.zero_chunks += 1
            digest = ZERO_HASH
        else:
            digest = hashlib.sha256(data).digest()
            if self._known.claim(digest, bad=digest in self._bad):
                stored = 0
                try:  # held only once uploaded: a failed upload is never trusted later
                    stored = self.repo.put_chunk(digest, data)
                finally:
                    self._known.uploaded(digest, ok=stored > 0)
                with self._cond:
                    self._bad.discard(digest)  # uploaded again: good from now on
                    self.new_chunks += 1
                    self.new_data += length
                    self.new_bytes += stored
                    self._uploaded.append(digest)
        if self._spooled_of[i]:
            punch_hole(self.fd, offset, length)
        return digest

    def _heartbeat(self) -> None:
        """Renew the lock object while the job runs: a gc takes a stale one for dead."""
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._closing, timeout=HEARTBEAT_S):
                    return
            try:
                self.repo.renew_backup(self.lock_id)
            except RepoError as e:
                log.warning("renewing the backup's lock: %s", e.message)

    # -- the job's end -----------------------------------------------------------------

    def fsync(self) -> None:
        """Durable means uploaded: see seal."""

    def seal(self, sums: Checksums) -> str | None:
        """Blocking: wait for every chunk's upload, then upload the index. The snapshot
        exists only when write_record puts its manifest."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0 or self.error is not None)
            if self.error:
                raise OSError(errno.EIO, self.error)
        parent = self.parent[1].hashes if self.parent is not None else []
        hashes = []
        for i, own in enumerate(self._hashes):
            if self._expected[i]:
                assert own is not None
                hashes.append(own)
            else:
                hashes.append(parent[i] if i < len(parent) else ZERO_HASH)
        self.index = Index(self.chunk_size, self.size, hashes)
        return None

    def write_record(self, record: Record, reserve: bool) -> None:
        """Nothing at the start (the lock object says the backup runs). At the end, a
        complete job gets its snapshot (index first, then manifest), named after its
        point in time; any other leaves only orphan chunks for gc, and no snapshot."""
        assert self.stamp is not None
        if reserve or record.status != "complete":
            return
        assert self.index is not None
        if self.repo.has_snapshot(self.image, self.stamp):  # a snapshot of the same second
            self.stamp = stamp_of(datetime.fromisoformat(record.point_in_time), True)
        record.target = self.name
        hashes = self.index.hashes
        data_bytes = sum(self.index.extent(i)[1] for i, h in enumerate(hashes) if h != ZERO_HASH)
        manifest = Manifest(
            image=self.image,
            snapshot=f"{self.image}@{self.stamp}",
            size=self.size,
            chunk_size=self.chunk_size,
            cluster_size=self.cluster_size,
            point_in_time=record.point_in_time,
            parent=None if self.parent is None else self.parent[0].snapshot,
            index=snapshot_key(self.image, self.stamp, ".index"),
            index_sha256="",
            chunks=self.index.count,
            zero_chunks=sum(1 for h in self.index.hashes if h == ZERO_HASH),
            new_chunks=self.new_chunks,
            new_bytes=self.new_bytes,
            data_bytes=data_bytes,
            shared_bytes=data_bytes - self.new_data,
            record=asdict(record),
        )
        self.repo.put_snapshot(manifest, self.index)
        self.repo.remember(self._uploaded)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
        if self._locked:
            self._locked = False
            try:
                self.repo.unlock_backup(self.lock_id)
            except RepoError as e:
                log.warning("removing the backup's lock: %s (gc takes it for dead later)", e)
        os.close(self.fd)
