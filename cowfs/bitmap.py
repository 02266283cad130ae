"""Dirty bitmaps: named, persistent records of the clusters written to a source.

Owns the bitmaps of one source, their file (`.NAME.cowfs-bitmaps.json` beside the
source) and the rules that keep them honest:
- a mount marks the file *in use* by its session before serving, and saves the bits
  from time to time (tracking.py); a clean end of the mount stores them as not in
  use, with the source's identity (device, inode, size, mtime, ctime: nobody can set
  a ctime back, so an outside write that restores the mtime is seen too).
- a mount that died leaves *in use*: each bitmap is then its last save plus every
  region of the dead session's write-intent record (intent.py), a superset of the
  writes since — consistent, and marked as recovered with how much it grew. Without
  a usable intent record, or with signs of a write outside cowfs since, every bitmap
  is inconsistent.
- a source whose identity changed since a clean end (written outside cowfs) makes
  every bitmap inconsistent, since writes may have been missed.
- a bitmap used by a job (anchored or copied by an incremental) restarts empty at
  the point in time and collects the writes after it (QEMU's successor); when the
  job fails, the bits it started from are merged back (reclaim), so the next
  incremental misses nothing. While the job runs, saves store that merge (what a
  crash would leave). When it completes, the bitmap names that job as its *anchor*:
  the one backup the next incremental may name as its backing.
A damaged file is a clear error, never an empty bitmap. Never touches the source's
data; callers hold the source's lock while they change bitmaps.
"""

import base64
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from bitarray import bitarray
from bitarray.util import zeros

from .errors import CowfsError
from .intent import IntentRecord, intent_path, read_intent, remove_intent
from .record import pid_alive

log = logging.getLogger(__name__)

VERSION = 2
DEFAULT_GRANULARITY = 64 << 10


@dataclass
class DirtyBitmap:
    name: str
    granularity: int
    bits: bitarray
    consistent: bool = True
    reason: str | None = None
    """Why the bitmap cannot be trusted (when not consistent)."""
    before_job: bitarray | None = field(default=None, repr=False)
    """The bits a running job started from; merged back if the job fails."""
    before_reason: str | None = None
    """Why the bitmap was not to be trusted when the job started (None if it was): a
    job that fails leaves it untrusted again."""
    new: bool = False
    """Created for the running job: if its job fails, nothing anchors it."""
    anchor: dict | None = None
    """The backup whose point in time the bits start from: {"job", "target",
    "point_in_time"} of its record; None for a bitmap added or cleared by hand."""
    recovered: dict | None = None
    """After a crash since its anchor: {"pid", "grew_bytes"} of the latest recovery."""

    def dirty_bytes(self, size: int) -> int:
        return min(self.bits.count() * self.granularity, size)

    def mark(self, offset: int, length: int) -> None:
        first, last = offset // self.granularity, (offset + length - 1) // self.granularity
        if last >= len(self.bits):
            self.bits.extend(zeros(last + 1 - len(self.bits)))
        self.bits[first : last + 1] = 1

    def distrust(self, reason: str) -> None:
        if self.consistent:
            self.consistent, self.reason = False, reason

    def durable_view(self) -> tuple[bitarray, bool, str | None]:
        """What a save stores: while a job runs, what its failure would leave (the bits
        it started from merged back; a bitmap it created anchors nothing)."""
        if self.before_job is None:
            return self.bits, self.consistent, self.reason
        bits = _union(self.bits, self.before_job)
        if self.new:
            return bits, False, "the full backup that was to anchor it did not complete"
        if self.before_reason is not None:
            return bits, False, self.before_reason
        return bits, self.consistent, self.reason

    def recover(self, intent: IntentRecord, pid: int, size: int) -> None:
        """Add every region the dead mount's intent marks (clipped to the source)."""
        before = self.bits.count()
        for region in intent.regions.search(1):
            start = region * intent.region_size
            if start < size:
                self.mark(start, min(intent.region_size, size - start))
        grew = (self.bits.count() - before) * self.granularity
        self.recovered = {"pid": pid, "grew_bytes": grew}


def store_path(source: Path) -> Path:
    """Beside the real file: a source named through a symlink has the same bitmaps."""
    source = source.resolve()
    return source.with_name(f".{source.name}.cowfs-bitmaps.json")


def identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class BitmapStore:
    """All bitmaps of one source, loaded from and saved to its bitmap file."""

    def __init__(self, source: Path, bitmaps: dict[str, DirtyBitmap]) -> None:
        self.source = source
        self.path = store_path(source)
        self.bitmaps = bitmaps
        self.in_use_by: int | None = None

    # -- loading and saving ----------------------------------------------------------

    @classmethod
    def load(cls, source: Path, holding_lock: bool) -> "BitmapStore":
        """The source's bitmaps (none if it has no file); a damaged file is a CowfsError.

        `holding_lock`: the caller holds the source's flock, so no mount can be live and
        an *in use* mark means one died. Without it a live pid is taken for a live mount
        (for display only: a pid may have been reused since)."""
        path = store_path(source)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(source, {})
        except OSError as e:
            raise CowfsError(f"cannot read the bitmap file {path}: {e.strerror}") from None
        try:
            doc = json.loads(raw)
            content = doc["content"]
            if doc["sha256"] != _digest(content):
                raise ValueError("checksum mismatch")
            bitmaps = {b["name"]: _decode(b) for b in content["bitmaps"]}
            in_use, stored_identity = content["in_use_by"], content["identity"]
            session = content.get("session")  # version 1 files have none
        except (ValueError, KeyError, TypeError, zlib.error) as e:
            why = f"no field {e}" if isinstance(e, KeyError) else str(e)
            raise CowfsError(
                f"the bitmap file {path} is damaged ({why}); remove it and take a full backup"
            ) from None
        store = cls(source, bitmaps)
        if in_use is not None and not holding_lock and pid_alive(in_use):
            store.in_use_by = in_use  # a live mount owns them; it holds the source's lock
        elif in_use is not None:
            store._recover(in_use, session, stored_identity)
        elif stored_identity != identity(os.stat(source)):
            store.distrust("the source changed outside cowfs")
        return store

    def _recover(self, pid: int, session: str | None, stored: list[int]) -> None:
        """The mount `pid` (`session`) died while serving: its last save plus its intent
        record, unless the source shows a change that the record cannot explain."""
        died = f"a mount of the source died (pid {pid})"
        st = os.stat(self.source)
        try:
            intent = read_intent(intent_path(self.source)) if session else None
        except CowfsError as e:
            self.distrust(f"{died} and {e.message}: writes may be missed")
            return
        if intent is None or intent.session != session:
            # It wrote nothing through its intent record: nothing at all, or (with the
            # record lost or never written) writes that only the identity can show.
            if stored != identity(st):
                self.distrust(f"{died} and left no intent record: writes may be missed")
            return
        changed = _outside_change(intent, stored, st)
        if changed:
            self.distrust(f"{died}, and {changed}: writes may be missed")
            return
        for bitmap in self.bitmaps.values():
            bitmap.recover(intent, pid, st.st_size)

    def snapshot(
        self,
        in_use_by: int | None,
        session: str | None,
        source_st: os.stat_result,
        untrusted: str | None = None,
    ) -> bytes:
        """The file's content now. `in_use_by` and `session` mark a live mount (a crash
        then leaves them); `source_st` is the source as this save leaves it; `untrusted`
        stores every bitmap as inconsistent for that reason."""
        content = {
            "version": VERSION,
            "in_use_by": in_use_by,
            "session": session,
            "identity": identity(source_st),
            "bitmaps": [_encode(b, untrusted) for b in self.bitmaps.values()],
        }
        doc = {"sha256": _digest(content), "content": content}
        return json.dumps(doc, indent=1).encode()

    def write(self, doc: bytes) -> None:
        """Replace the file with `doc` atomically and durably (blocking)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(doc)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def save(self, in_use_by: int | None, source_st: os.stat_result) -> None:
        """Save with no session: by a command holding the source's lock, not a mount."""
        self.write(self.snapshot(in_use_by, None, source_st))

    def close(self, source_st: os.stat_result) -> None:
        """Store the bitmaps as not in use (a clean end): no intent record is needed after
        that, so it goes (a crash in between leaves one no save names: ignored)."""
        if not self.bitmaps and not self.path.exists():
            return
        self.save(None, source_st)
        remove_intent(intent_path(self.source))

    def distrust(self, reason: str) -> None:
        for bitmap in self.bitmaps.values():
            bitmap.distrust(reason)

    # -- the bitmap command ------------------------------------------------------------

    def get(self, name: str) -> DirtyBitmap:
        try:
            return self.bitmaps[name]
        except KeyError:
            raise CowfsError(
                f"{self.source} has no bitmap {name!r}; create it with a full backup: "
                f"--sync full --bitmap {name}"
            ) from None

    def add(self, name: str, granularity: int, size: int) -> DirtyBitmap:
        if name in self.bitmaps:
            raise CowfsError(f"{self.source} already has a bitmap {name!r}")
        if not name or "/" in name or not name.isprintable():
            raise CowfsError(f"bad bitmap name {name!r}")
        bitmap = DirtyBitmap(name, granularity, zeros(-(-size // granularity)))
        self.bitmaps[name] = bitmap
        return bitmap

    def remove(self, name: str) -> None:
        self.get(name)
        del self.bitmaps[name]

    def clear(self, name: str) -> None:
        bitmap = self.get(name)
        bitmap.bits.setall(0)
        bitmap.anchor = None  # from now on: no backup's point in time
        bitmap.recovered = None

    # -- a mount ------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Record a write (or a truncate's changed range) in every bitmap."""
        if length > 0:
            for bitmap in self.bitmaps.values():
                bitmap.mark(offset, length)

    def start_job(self, name: str, granularity: int, size: int) -> DirtyBitmap:
        """At the point in time: `name` (created if missing) restarts empty to collect the
        writes after it; what it held is kept aside for `end_job`."""
        bitmap = self.bitmaps.get(name)
        if bitmap is None:
            bitmap = self.add(name, granularity, size)
            bitmap.new = True
        bitmap.before_job = bitmap.bits.copy()
        bitmap.before_reason = None if bitmap.consistent else bitmap.reason
        bitmap.bits.setall(0)
        bitmap.consistent, bitmap.reason = True, None
        return bitmap

    def end_job(self, name: str, anchor: dict | None) -> None:
        """`anchor`: the record fields of the job, if it completed. Then the bitmap holds
        the writes since its point in time. Otherwise the writes it held before come
        back (a new bitmap anchors nothing: distrusted), and so does its old anchor."""
        bitmap = self.bitmaps[name]
        if anchor is not None:
            bitmap.anchor, bitmap.recovered = anchor, None
        elif bitmap.before_job is not None:
            bitmap.bits, bitmap.consistent, bitmap.reason = bitmap.durable_view()
        bitmap.before_job, bitmap.before_reason, bitmap.new = None, None, False


def bitmap_rows(store: BitmapStore, size: int, in_use_by: int | None) -> list[dict]:
    """What `cowfs bitmap list` and `cowfs status` show of each bitmap."""
    return [
        {
            "name": b.name,
            "consistent": b.consistent,
            "reason": b.reason,
            "granularity": b.granularity,
            "dirty_clusters": b.bits.count(),
            "dirty_bytes": b.dirty_bytes(size),
            "in_use_by": in_use_by,
            "recovered": b.recovered,
        }
        for b in store.bitmaps.values()
    ]


def _digest(content: dict) -> str:
    """A checksum over everything stored (names, sizes, states and bits), so that any
    damage that still parses is caught too."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _union(a: bitarray, b: bitarray) -> bitarray:
    size = max(len(a), len(b))
    return (a + zeros(size - len(a))) | (b + zeros(size - len(b)))


def _outside_change(intent: IntentRecord, stored: list[int], st: os.stat_result) -> str | None:
    """Why the source cannot be only what the dead mount left, or None. Its changes all
    came before the record's lease (and before the alive page's bound) and within its
    size limit, to the same file. The ctime tells: the mtime can be set at will (also
    through the mount), the ctime of any change is the time it was made."""
    if [st.st_dev, st.st_ino] != stored[:2]:
        return "the source is another file now"
    if st.st_size > intent.size_limit:
        return "the source grew beyond what the mount could have written"
    last = intent.lease_ns
    if intent.written_before_ns is not None:
        last = min(last, intent.written_before_ns)
    if st.st_ctime_ns > last:  # any change moves it to "now"; nobody can set it back
        return "the source was changed after the mount died (outside cowfs)"
    return None


def _encode(bitmap: DirtyBitmap, untrusted: str | None) -> dict:
    bits, consistent, reason = bitmap.durable_view()
    if untrusted is not None and consistent:
        consistent, reason = False, untrusted
    return {
        "name": bitmap.name,
        "granularity": bitmap.granularity,
        "nbits": len(bits),
        "consistent": consistent,
        "reason": reason,
        "anchor": bitmap.anchor,
        "recovered": bitmap.recovered,
        "bits": base64.b64encode(zlib.compress(bits.tobytes())).decode(),
    }


def _decode(doc: dict) -> DirtyBitmap:
    packed = base64.b64decode(doc["bits"], validate=True)
    bits = bitarray()
    bits.frombytes(zlib.decompress(packed))
    nbits = int(doc["nbits"])
    if nbits > len(bits):
        raise ValueError(f"bitmap {doc['name']!r} is short")
    granularity = int(doc["granularity"])
    if granularity <= 0 or granularity & (granularity - 1):
        raise ValueError(f"bitmap {doc['name']!r} has a bad granularity")
    anchor = doc["anchor"]
    if anchor is not None and not isinstance(anchor.get("job"), str):
        raise ValueError(f"bitmap {doc['name']!r} has a bad anchor")
    return DirtyBitmap(
        str(doc["name"]),
        granularity,
        bits[:nbits],
        bool(doc["consistent"]),
        doc["reason"],
        anchor=anchor,
        recovered=doc.get("recovered"),  # version 1 files have none
    )


def to_clusters(bits: bitarray, granularity: int, cluster_size: int) -> bitarray:
    """The job clusters (of `cluster_size`) that overlap any set bit (of `granularity`)."""
    if granularity == cluster_size:
        return bits.copy()
    if granularity > cluster_size:  # each bit covers several clusters
        per = granularity // cluster_size
        out = bitarray()
        for bit in bits:
            out.extend([bit] * per)
        return out
    per = cluster_size // granularity  # several bits per cluster
    padded = bits + zeros(-len(bits) % per)
    return bitarray(padded[i : i + per].any() for i in range(0, len(padded), per))
