"""A repository opened: its config, snapshots, chunks, locks and the local cache of
known chunks, on top of an object store (store.py) in the format of FORMAT.md.

Everything a backup, a restore or a maintenance command asks of the repository goes
through here, so the rules live in one place: a snapshot exists once its manifest
does; a chunk is uploaded unless the repository is known to hold it intact; a gc and
a backup never run at once (each leaves a lock object, then looks for the other's).
"""

import hashlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..atomic import replace_file
from ..record import pid_alive
from .format import (
    BAD_KEY,
    CHUNK_PREFIX,
    CONFIG_KEY,
    DEFAULT_CHUNK,
    FORMAT_VERSION,
    GC_KEY,
    GC_LOCK,
    HASH,
    LOCK_PREFIX,
    SNAPSHOT_PREFIX,
    ZERO_HASH,
    Index,
    Manifest,
    chunk_key,
    decode_chunk,
    encode_chunk,
    lock_key,
    snapshot_key,
    split_snapshot,
)
from .store import MissingObject, ObjectInfo, RepoError, S3Access, Store, open_store


class ChunkLedger:
    """The chunks a process knows a repository holds, and those being uploaded now:
    shared by every backup into it, so that a chunk two images of one job hold is
    uploaded once, and a chunk counts as held only once its upload succeeded."""

    def __init__(self, known: set[bytes]) -> None:
        self._known = known
        self._lock = threading.Lock()
        self._uploading: dict[bytes, threading.Event] = {}

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._known

    def claim(self, digest: bytes, bad: bool) -> bool:
        """True: the caller uploads the chunk, then calls `uploaded`. False: the
        repository holds it (after waiting for anyone uploading it right now). A chunk
        the caller knows `bad` is always its to upload again."""
        while True:
            with self._lock:
                if digest in self._known and not bad:
                    return False
                busy = self._uploading.get(digest)
                if busy is None:
                    self._uploading[digest] = threading.Event()
                    return True
            busy.wait()

    def uploaded(self, digest: bytes, ok: bool) -> None:
        with self._lock:
            if ok:
                self._known.add(digest)
            self._uploading.pop(digest).set()


_LEDGERS: dict[str, tuple[int, ChunkLedger]] = {}
_LEDGERS_LOCK = threading.Lock()

STALE_LOCK = timedelta(minutes=10)
"""A lock not renewed for this long is a dead holder's (backups renew every minute)."""
HEARTBEAT_S = 60.0


class Repository:
    def __init__(self, store: Store, config: dict) -> None:
        self.store = store
        self.url = store.url
        self.id: str = config["id"]
        self.chunk_size: int = config["chunk_size"]

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, access: S3Access | None = None) -> "Repository":
        """Bad credentials, a missing bucket or no repository there: one clear error."""
        store = open_store(url, access)
        store.check()
        try:
            config = json.loads(store.get(CONFIG_KEY))
        except MissingObject:
            raise RepoError(
                f"{store.url} is no cowfs repository (`cowfs repo init` makes one)"
            ) from None
        except ValueError:
            raise RepoError(f"{store.url}/{CONFIG_KEY}: damaged") from None
        if config.get("format") != "cowfs-repo" or config.get("version") != FORMAT_VERSION:
            raise RepoError(f"{store.url}: not a cowfs repository of version {FORMAT_VERSION}")
        return cls(store, config)

    @classmethod
    def init(
        cls, url: str, access: S3Access | None = None, chunk_size: int = DEFAULT_CHUNK
    ) -> "Repository":
        store = open_store(url, access)
        store.create_bucket()
        store.check()
        if store.head(CONFIG_KEY) is not None:
            raise RepoError(f"{store.url} is a cowfs repository already")
        config = {
            "format": "cowfs-repo",
            "version": FORMAT_VERSION,
            "id": uuid.uuid4().hex,
            "chunk_size": chunk_size,
            "hash": "sha256",
            "compression": "zstd",
            "created": datetime.now(UTC).isoformat(),
        }
        store.put(CONFIG_KEY, json.dumps(config, indent=1).encode())
        return cls(store, config)

    # -- snapshots ---------------------------------------------------------------------

    def snapshot_url(self, image: str, stamp: str) -> str:
        return f"{self.url}/{image}@{stamp}"

    def manifest(self, name: str) -> Manifest:
        """The manifest of snapshot `name` (IMAGE@TIME)."""
        image, stamp = split_snapshot(name)
        key = snapshot_key(image, stamp, ".json")
        try:
            data = self.store.get(key)
        except MissingObject:
            raise RepoError(f"{self.url}: no snapshot {name}") from None
        return Manifest.decode(data, f"{self.url}/{key}")

    def has_snapshot(self, image: str, stamp: str) -> bool:
        return self.store.head(snapshot_key(image, stamp, ".json")) is not None

    def index(self, manifest: Manifest) -> Index:
        where = f"{self.url}/{manifest.index}"
        try:
            data = self.store.get(manifest.index)
        except MissingObject:
            raise RepoError(f"{where}: the index of {manifest.snapshot} is missing") from None
        if hashlib.sha256(data).hexdigest() != manifest.index_sha256:
            raise RepoError(f"{where}: the index of {manifest.snapshot} is damaged")
        index = Index.decode(data, where)
        if index.size != manifest.size or index.chunk_size != manifest.chunk_size:
            raise RepoError(f"{where}: does not match the manifest of {manifest.snapshot}")
        return index

    def snapshots(self) -> list[Manifest]:
        """Every snapshot, oldest first (lists the bucket: maintenance only)."""
        out = []
        for info in self.store.list(SNAPSHOT_PREFIX):
            if info.key.endswith(".json"):
                out.append(Manifest.decode(self.store.get(info.key), f"{self.url}/{info.key}"))
        return sorted(out, key=lambda m: (m.image, m.time))

    def put_snapshot(self, manifest: Manifest, index: Index) -> None:
        """Index, then manifest: a snapshot without its manifest does not exist."""
        data = index.encode()
        manifest.index_sha256 = hashlib.sha256(data).hexdigest()
        self.store.put(manifest.index, data)
        image, stamp = split_snapshot(manifest.snapshot)
        self.store.put(snapshot_key(image, stamp, ".json"), manifest.encode())

    def delete_snapshot(self, manifest: Manifest) -> None:
        """Manifest first: a snapshot half deleted no longer exists."""
        image, stamp = split_snapshot(manifest.snapshot)
        self.store.delete(snapshot_key(image, stamp, ".json"))
        self.store.delete(manifest.index)

    # -- chunks ------------------------------------------------------------------------

    def put_chunk(self, digest: bytes, data: bytes | memoryview) -> int:
        """Upload a chunk; returns the bytes stored."""
        obj = encode_chunk(data)
        self.store.put(chunk_key(digest), obj)
        return len(obj)

    def get_chunk(self, digest: bytes, length: int) -> bytes:
        """A chunk's bytes, checked against its name. Raises RepoError (MissingObject if
        absent) or ValueError (damaged)."""
        if digest == ZERO_HASH:
            return bytes(length)
        data = decode_chunk(self.store.get(chunk_key(digest)), digest, length)
        if len(data) != length:
            raise ValueError(f"{len(data)} bytes, the index says {length}")
        return data

    def chunk_infos(self) -> Iterator[ObjectInfo]:
        return self.store.list(CHUNK_PREFIX)

    def bad_chunks(self) -> set[bytes]:
        """Chunks the last verify found damaged or missing: never taken as present."""
        try:
            doc = json.loads(self.store.get(BAD_KEY))
        except MissingObject:
            return set()
        except ValueError:
            raise RepoError(f"{self.url}/{BAD_KEY}: damaged") from None
        return {bytes.fromhex(h) for h in doc.get("chunks", [])}

    def set_bad_chunks(self, bad: Iterable[bytes]) -> None:
        doc = {"chunks": sorted(h.hex() for h in bad)}
        self.store.put(BAD_KEY, json.dumps(doc).encode())

    # -- the cache of known chunks -----------------------------------------------------

    def generation(self) -> int:
        try:
            return int(json.loads(self.store.get(GC_KEY))["generation"])
        except MissingObject:
            return 0
        except (ValueError, KeyError, TypeError):
            raise RepoError(f"{self.url}/{GC_KEY}: damaged") from None

    def bump_generation(self) -> None:
        doc = {"generation": self.generation() + 1, "at": datetime.now(UTC).isoformat()}
        self.store.put(GC_KEY, json.dumps(doc).encode())

    def cache_path(self) -> Path:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "cowfs" / f"known-{self.id}"

    def known_chunks(self) -> ChunkLedger:
        """Chunks the repository holds, from the local cache; rebuilt from every index
        when the cache is missing or older than the newest gc (which may have deleted
        what it lists). One set per repository in a process, shared by its backups, so
        that two images of one job upload a chunk they share once."""
        generation = self.generation()
        with _LEDGERS_LOCK:
            shared = _LEDGERS.get(self.id)
            if shared is not None and shared[0] == generation:
                return shared[1]
            ledger = ChunkLedger(self._load_known(generation))
            _LEDGERS[self.id] = (generation, ledger)
            return ledger

    def _load_known(self, generation: int) -> set[bytes]:
        path = self.cache_path()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        if len(data) >= 8 and int.from_bytes(data[:8], "little") == generation:
            return {data[i : i + HASH] for i in range(8, len(data) - HASH + 1, HASH)}
        known: set[bytes] = set()
        for manifest in self.snapshots():
            known.update(self.index(manifest).hashes)
        known.discard(ZERO_HASH)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, generation.to_bytes(8, "little") + b"".join(known), mode=0o600)
        return known

    def remember(self, digests: Iterable[bytes]) -> None:
        """Add uploaded chunks to the local cache (appends: concurrent backups may)."""
        data = b"".join(digests)
        if not data:
            return
        path = self.cache_path()
        try:
            with open(path, "ab") as f:
                f.write(data)
        except FileNotFoundError:
            return  # rebuilt from the indexes next time

    # -- locks -------------------------------------------------------------------------

    def lock_backup(self, job: str) -> None:
        """Say a backup runs (its chunks must survive any gc), then make sure no gc does."""
        self.store.put(lock_key(job), _lock_body())
        gc = self._live_lock(GC_LOCK)
        if gc is not None:
            self.store.delete(lock_key(job))
            raise RepoError(f"{self.url}: a gc runs ({gc}); start the backup when it ends")

    def renew_backup(self, job: str) -> None:
        self.store.put(lock_key(job), _lock_body())

    def unlock_backup(self, job: str) -> None:
        self.store.delete(lock_key(job))

    def lock_gc(self) -> None:
        """Say a gc runs, then make sure no backup does (the mirror of lock_backup)."""
        other = self._live_lock(GC_LOCK)
        if other is not None:
            raise RepoError(f"{self.url}: another gc runs ({other})")
        self.store.put(GC_LOCK, _lock_body())
        for info in self.store.list(LOCK_PREFIX + "backup-"):
            holder = self._live_lock(info.key)
            if holder is not None:
                self.store.delete(GC_LOCK)
                raise RepoError(f"{self.url}: a backup runs ({holder}); gc when it ends")
            self.store.delete(info.key)  # a dead backup's: its chunks are orphans

    def unlock_gc(self) -> None:
        self.store.delete(GC_LOCK)

    def _live_lock(self, key: str) -> str | None:
        """Who holds the lock at `key`, if anyone alive does."""
        try:
            info = self.store.head(key)
            if info is None:
                return None
            doc = json.loads(self.store.get(key))
        except (MissingObject, ValueError):
            return None
        if doc.get("host") == socket.gethostname() and not pid_alive(int(doc.get("pid", 0))):
            return None
        if datetime.now(UTC) - info.modified > STALE_LOCK:
            return None
        return f"host {doc.get('host')}, pid {doc.get('pid')}, since {doc.get('started')}"


def _lock_body() -> bytes:
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": datetime.now(UTC)}
    return json.dumps(doc, default=str).encode()
