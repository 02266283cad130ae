"""Crash-safe change tracking of one served source: its write-intent record kept ahead
of its writes, and its bitmaps saved from time to time.

Linux md's write-intent bitmap, applied to cowfs's dirty bitmaps. The bitmaps are
precise in memory; a crash loses what changed since their last durable save. So
before a write reaches a *region* whose bit is not durable in the intent record
(intent.py), the bit is written and made durable first; after a crash, each bitmap
is its last save plus those regions (bitmap.py): a superset of the writes since.
Writes into marked regions pay nothing; first writes that arrive together share one
record write (group commit).

The intent stays small because the bitmaps are saved every `period` seconds
(`--save-period`, 10 by default) while
writes come (and whenever a job fixes or ends its point in time): a save's writes
need no intent any more, so after it the regions not written since its snapshot are
cleared. After a crash the superset is therefore the writes of about the last one or
two periods, rounded out to regions.

Region size (`--intent-region`, 64 MiB by default, as md's bitmap chunks): a write that
finds its region's intent missing waits for one `fdatasync` of a one-page record,
about a millisecond. A writer streaming through the image at 1 GB/s crosses a region
every 64 ms and so waits about 1.5 % of its time, once per period; random writers
cover every region within moments and then wait no more. Smaller regions tighten the
superset and cost a streaming writer proportionally more.

Each record carries a *lease*: a wall-clock time that no write of this mount is later
than (writes wait for a renewal when it nears; renewals happen in the background while
writes come). After a crash, a source whose mtime or ctime is past the lease was
written outside cowfs: the bitmaps are not trusted then.

If the record cannot be written (ENOSPC, EIO), the write still proceeds: change
tracking fails instead, every bitmap becomes inconsistent and the record is removed,
so that a crash cannot recover from a record that misses the write. A later save
tries again (a full backup then makes its bitmap trustworthy again).
"""

import logging
import os
import secrets
import time

import trio
from bitarray import bitarray
from bitarray.util import zeros

from .bitmap import BitmapStore
from .intent import (
    ENDED,
    REGION_SIZE,
    SAVE_PERIOD_S,
    STARTED,
    WRITE_BOUND_NS,
    IntentFile,
    IntentRecord,
    intent_path,
    remove_intent,
)

log = logging.getLogger(__name__)

LEASE_NS = 5_000_000_000
"""How far ahead of a record's write its lease reaches."""
LEASE_MARGIN_NS = 1_000_000_000
"""Writes stop relying on a lease this long before it ends: a write checked just before
must have updated the source's times well within it."""
RENEW_AHEAD_NS = 2_000_000_000
"""While writes come, the lease is renewed in the background when less than this is left."""
TICK_S = 0.5


class ChangeTracker:
    def __init__(
        self,
        store: BitmapStore,
        source_fd: int,
        region_size: int = REGION_SIZE,
        period: float = SAVE_PERIOD_S,
    ) -> None:
        self.store = store
        self.fd = source_fd
        self.region_size = region_size
        self.period = period
        self.session = secrets.token_hex(16)
        self.broken: str | None = None
        """Why change tracking failed (the bitmaps are inconsistent), or None."""
        self.intent_writes = 0
        self.saves = 0
        self._intent = IntentFile(intent_path(store.source))
        self._seq = 0
        self._want = bitarray()
        """Regions whose intent must be durable: written since the last save's snapshot,
        or before it and not cleared yet."""
        self._limit = os.fstat(source_fd).st_size
        """The size limit to record: the source's largest size since the last clear."""
        self._safe = bitarray()
        """Regions marked in every record that may be on disk (a record in flight may or
        may not have landed)."""
        self._safe_limit = 0
        self._lease_ok = 0
        self._touched = bitarray()
        """Regions written since the snapshot of the save under way or last made."""
        self._writes = 0
        self._writing: trio.Event | None = None
        self._saving = trio.Lock()

    @property
    def tracking(self) -> bool:
        """Whether writes must wait for their intent: there are bitmaps, and it works."""
        return bool(self.store.bitmaps) and self.broken is None

    # -- the write path ------------------------------------------------------------------

    async def ensure(self, offset: int, end: int) -> None:
        """Before a change of [offset, end) reaches the source (a write, or the range a
        resize changes): its regions' intent, and `end` as the size limit, are durable.
        Call `mark` right after, with no await in between."""
        if not self.tracking or end <= offset:
            return
        first, last = offset // self.region_size, (end - 1) // self.region_size
        while not self._covered(first, last, end):
            self._fit(last + 1)
            self._want[first : last + 1] = 1
            self._limit = max(self._limit, end)
            await self._commit()
            if not self.tracking:
                return

    def _covered(self, first: int, last: int, end: int) -> bool:
        if end > self._safe_limit or last >= len(self._safe) or time.time_ns() > self._lease_ok:
            return False
        return bool(self._safe[first]) if first == last else self._safe[first : last + 1].all()

    def mark(self, offset: int, length: int) -> None:
        """Record a change about to reach the source in every bitmap (and as written since
        the last snapshot); `written` once it has, whether it failed or not."""
        self.changing()
        if length <= 0:
            return
        self.store.mark(offset, length)
        first, last = offset // self.region_size, (offset + length - 1) // self.region_size
        if last >= len(self._touched):
            self._fit(last + 1)
        # Wanted again, even where a record still marks it: a save may have cleared it
        # from `_want` while that record was in flight, and the next one must keep it.
        if first == last:
            self._touched[first] = self._want[first] = 1
        else:
            self._touched[first : last + 1] = 1
            self._want[first : last + 1] = 1
        self._writes += 1

    def changing(self) -> None:
        """Before any change of the source that moves its ctime (data, size, mode, owner,
        times): the alive page says a change of ours runs; `written` after it."""
        alive = self._intent.alive
        if alive is not None:
            alive[STARTED] = time.time_ns() + WRITE_BOUND_NS

    def written(self) -> None:
        alive = self._intent.alive
        if alive is not None:
            alive[ENDED], alive[STARTED] = time.time_ns(), 0

    def _fit(self, nregions: int) -> None:
        for bits in (self._want, self._safe, self._touched):
            if len(bits) < nregions:
                bits.extend(zeros(nregions - len(bits)))

    async def _commit(self) -> None:
        """Write the wanted record. While one write is in flight, requests wait for it and
        then go together in the next (group commit)."""
        if self._writing is not None:
            await self._writing.wait()
            return
        self._writing = done = trio.Event()
        try:
            record = self._record()
            self._safe &= record.regions  # old or new may be on disk until it is durable
            self._safe_limit = min(self._safe_limit, record.size_limit)
            try:
                await trio.to_thread.run_sync(self._intent.write, record)
            except OSError as e:
                self._fail(f"its intent record could not be written ({e.strerror})")
                return
            self._intent.adopt()
            self._safe = record.regions.copy()
            self._fit(len(self._want))
            self._safe_limit = record.size_limit
            self._lease_ok = record.lease_ns - LEASE_MARGIN_NS
            self.intent_writes += 1
        finally:
            self._writing = None
            done.set()

    def _record(self) -> IntentRecord:
        self._seq += 1
        return IntentRecord(
            self.session, self._seq, time.time_ns() + LEASE_NS,
            self.region_size, self._limit, self._want.copy(),
        )  # fmt: skip

    def _fail(self, reason: str) -> None:
        """Change tracking failed: no bitmap is trusted, and no record may outlive this
        (a recovery from it would miss the write about to proceed). Blocks for an unlink
        and a directory fsync: rare, and the write must wait for it anyway."""
        self.broken = reason
        self.store.distrust(f"change tracking failed: {reason}")
        log.error("change tracking of %s failed: %s", self.store.source, reason)
        self._safe.setall(0)
        self._intent.close()
        try:
            remove_intent(self._intent.path)
        except OSError as e:
            log.critical(
                "cannot remove the intent record of %s (%s): if the daemon dies before its "
                "bitmaps are saved, they may miss writes; remove them",
                self.store.source,
                e.strerror,
            )

    # -- saves ---------------------------------------------------------------------------

    async def save(self) -> bool:
        """Store the bitmaps durably now (in use by this mount); then the intent of every
        region not written since this save's snapshot goes. After a failure, also where
        change tracking tries to work again. False if the bitmaps could not be stored."""
        async with self._saving:
            if self.broken is not None:
                if not await self._write_bitmaps(f"change tracking failed: {self.broken}"):
                    return False
                if not self.store.bitmaps:
                    return True
                self.broken = None  # from here on, writes wait for their intent again
                await self._commit()
                if self.broken is not None:  # bitmaps a job restarted since: no trust either
                    self.store.distrust(f"change tracking failed: {self.broken}")
                    return True
            if not await self._write_bitmaps(None):
                return False
            if self.tracking and not self._intent.made:
                await self._commit()  # the file now: first writes then pay one fdatasync
            elif self.tracking and (self._want & ~self._touched).any():
                self._want &= self._touched
                self._limit = os.fstat(self.fd).st_size
                await self._commit()
            return True

    async def _write_bitmaps(self, untrusted: str | None) -> bool:
        doc = self.store.snapshot(os.getpid(), self.session, os.fstat(self.fd), untrusted)
        self._touched.setall(0)
        try:
            await trio.to_thread.run_sync(self.store.write, doc)
        except OSError as e:
            log.error("cannot save the bitmaps of %s: %s", self.store.source, e.strerror)
            return False
        self.saves += 1
        return True

    def arm(self) -> None:
        """Before the mount serves: the bitmap file names this session (and holds what a
        recovery added), so that a crash from now on recovers from this session's record,
        which is made now too. If either cannot be written, the mount serves with
        tracking failed (a crash then finds the old file: its identity check refuses)."""
        if not self.store.bitmaps:
            return
        try:
            self.store.write(self.store.snapshot(os.getpid(), self.session, os.fstat(self.fd)))
            self._intent.write(self._record())
        except OSError as e:
            self._fail(f"its bitmaps or intent record could not be written ({e.strerror})")
            return
        self._intent.adopt()
        self.intent_writes += 1
        self._lease_ok = 0  # the record's lease is for a session that serves nothing yet

    def close(self) -> None:
        """After the mount served its last request: a clean end, no intent needed."""
        self._intent.close()
        self.store.close(os.fstat(self.fd))

    async def run(self) -> None:
        """Renew the lease while writes come; save every `period` seconds of writes."""
        last_save, writes = time.monotonic(), self._writes
        while True:
            await trio.sleep(TICK_S)
            if not self.store.bitmaps:
                continue
            writing, writes = self._writes != writes, self._writes
            if self.broken is None and writing and self._lease_ok - time.time_ns() < RENEW_AHEAD_NS:
                await self._commit()
            due = time.monotonic() - last_save >= self.period
            if due and (self._touched.any() or self._want.any() or self.broken is not None):
                await self.save()
                last_save = time.monotonic()

    def status(self) -> dict:
        return {
            "intent_region": self.region_size,
            "save_period": self.period,
            "intent_regions": self._want.count(),
            "intent_writes": self.intent_writes,
            "saves": self.saves,
            "failed": self.broken,
        }
