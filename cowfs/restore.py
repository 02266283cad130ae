"""Restoring a backup: the image at a chain's point in time, written to DEST and verified.

Owns DEST while it fills: which clusters are restored (the *restored map*), one copy
per cluster (claims, as block copy's), the copier that fills the rest, and the
record beside DEST that says when DEST alone is the image. The live restore's FUSE
side (restorefs.py) reads and writes through it: a read of a cluster not yet
restored restores it first (copy on read); a write restores the clusters it covers
only in part, and claims the ones it covers whole, so no copy of the backup can land
over a guest's write. Every cluster comes through chainread, checked against its
checksum, or the restore stops there and says where.

Crash safety: the restored map beside DEST is saved (after an fdatasync of DEST)
every second while the copier runs and on every fsync of the live file. A cluster
the saved map calls restored is durable in DEST, so `restore` again resumes from
it and never copies it twice; what was restored after the last save is restored
again, which can only undo writes nobody had fsynced.
"""

import errno
import hashlib
import logging
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio
from bitarray import bitarray
from bitarray.util import zeros

from .atomic import replace_file
from .chainread import BackupChain, CorruptCluster
from .errors import CowfsError
from .locks import ClusterClaims
from .preflight import OWN_FILE
from .ratelimit import RateLimiter
from .record import Record, read_record, record_path, verdict, write_record
from .repo.snapshot import RepoSnapshot, is_snapshot
from .repo.store import S3Access
from .target import Qcow2Target, RawTarget
from .target.qcow2 import MAX_CLUSTER
from .target.raw import punch_hole
from .transfer import write_nonzero

log = logging.getLogger(__name__)

SYNC = "restore"
"""The record's sync field for a restore: what `cowfs info DEST` shows."""
MAP_SUFFIX = ".cowfs-restore"
MAP_MAGIC = b"COWFSRST"
MAP_HEADER = struct.Struct("<8sIIQ32s")
BATCH_BYTES = 1 << 20
"""The copier's unit with nobody waiting: big enough to amortise a thread hop."""
LIVE_BATCH_BYTES = 256 << 10
"""The copier's unit under a live file: a guest read behind a batch waits for it (and for
the GIL it holds), so smaller batches keep the p99 of reads about 1 ms instead of 2-3
(bench j), for some throughput."""
SAVE_PERIOD_S = 1.0
COPIERS = 2
QCOW2_CLUSTER = 64 << 10


def map_path(dest: Path) -> Path:
    return dest.with_name(dest.name + MAP_SUFFIX)


class ResumedRaw(RawTarget):
    """DEST of a restore that resumes: a cluster restored after the last map save may
    hold data, or a guest's unsynced write: zero clusters are punched, not skipped."""

    def write_zeroes(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)


@dataclass(frozen=True)
class RestoreRequest:
    top: str
    """A backup chain's top file, or a repository snapshot (REPO/IMAGE@TIME)."""
    dest: Path
    fmt: str = "raw"
    force: bool = False
    speed: int = 0
    """The copier's limit in bytes/s (0: none); reads and writes on demand are not limited."""
    access: S3Access | None = None
    """How to reach an S3 repository (None: from the environment)."""


class Restore:
    """One chain into one DEST. `prepare` (blocking) opens both; the rest runs in trio."""

    def __init__(
        self,
        chain: BackupChain | RepoSnapshot,
        dest: Path,
        out: RawTarget | Qcow2Target,
        restored: bitarray,
        resumed: bool,
        speed: int = 0,
    ) -> None:
        self.chain = chain
        self.dest = dest
        self.out = out
        self.cluster_size = chain.cluster_size
        self.size = chain.size
        self.restored = restored
        self.resumed = resumed
        self.resumed_bytes = self._bytes(restored)
        self.claims = ClusterClaims()
        self.state = "running"
        self.errors: list[str] = []
        self.bytes_copier = 0
        self.bytes_on_demand = 0
        """Restored because the guest read or partly wrote them first (copy on read)."""
        self.started = datetime.now(UTC)
        self.started_mono = time.monotonic()
        self.finished_mono: float | None = None
        self.done = trio.Event()
        self._saved = restored.copy()
        self._copiers = trio.CapacityLimiter(COPIERS)
        self._saving = trio.Lock()
        self.limiter = RateLimiter(speed)
        self._cursor = 0
        self.batch_bytes = BATCH_BYTES
        """Where the copiers take their next batch: they go through DEST in order."""

    # -- starting ----------------------------------------------------------------------

    @classmethod
    def prepare(cls, req: RestoreRequest) -> "Restore":
        """Open the chain (every link complete, its checksums intact) and DEST: new, or
        replaced with --force, or resumed when it is this chain's unfinished restore."""
        chain = open_source(req.top, req.access)
        try:
            dest = req.dest
            links = {os.path.realpath(link.path) for link in chain.links}
            if os.path.realpath(dest) in links:
                raise CowfsError(f"{dest} is a link of the backup chain it would restore")
            if OWN_FILE.fullmatch(os.path.basename(os.path.realpath(dest))):
                raise CowfsError(f"{dest} is named like a file of cowfs's own; choose another")
            if not dest.parent.is_dir():
                raise CowfsError(f"destination directory {dest.parent} does not exist")
            restored = _resumable(chain, dest, req)
            if restored is not None:
                out: RawTarget | Qcow2Target = ResumedRaw(dest, _open_dest(dest, 0))
                return cls(chain, dest, out, restored, resumed=True, speed=req.speed)
            if dest.exists() or dest.is_symlink():
                if not req.force:
                    raise CowfsError(f"destination {dest} exists; --force replaces it")
                if not dest.is_file():
                    raise CowfsError(f"destination {dest} is not a regular file")
                dest.unlink()
            map_path(dest).unlink(missing_ok=True)
            if req.fmt == "qcow2":
                cluster = min(chain.cluster_size, QCOW2_CLUSTER, MAX_CLUSTER)
                out = Qcow2Target.create(dest, chain.size, cluster)
            else:
                out = RawTarget(dest, _open_dest(dest, os.O_CREAT | os.O_EXCL))
                os.ftruncate(out.fd, chain.size)
            count = -(-chain.size // chain.cluster_size)
            return cls(chain, dest, out, zeros(count), resumed=False, speed=req.speed)
        except BaseException:
            chain.close()
            raise

    def begin(self) -> None:
        """Blocking: the record says running (and the map exists) before DEST is used."""
        self.write_record()
        if self.out.format == "raw":
            self._save_map(self.restored)

    # -- restoring clusters -------------------------------------------------------------

    def clusters(self, offset: int, length: int) -> tuple[int, int]:
        """First and last cluster of [offset, offset+length), clipped to the image."""
        end = min(offset + length, self.size)
        return offset // self.cluster_size, (end - 1) // self.cluster_size

    async def fill(self, first: int, last: int) -> None:
        """Restore clusters first..last not yet restored: copy the ones nobody copies,
        wait for the rest. Raises OSError (EIO for a corrupt backup cluster)."""
        self._check_usable()
        while True:
            runs, busy = self._claim_runs(first, last)
            if runs:
                copied = await self._copy(runs, None)  # not `+= await`: that reads the count
                self.bytes_on_demand += copied  # before the await, losing others' additions
            if busy is None:
                return
            await self.claims.wait(busy)
            self._check_usable()

    async def write(self, offset: int, data: bytes) -> int:
        """A guest write: clusters it covers in part are restored first; the ones it
        covers whole are claimed (after any copy of them has landed) and become restored
        with the guest's bytes, never with the backup's. Writes land in the page cache
        inline, as the live mount's do."""
        first, last = self.clusters(offset, len(data))
        if self.restored.find(0, first, last + 1) < 0:
            return os.pwrite(self.out.fd, data, offset)
        cs = self.cluster_size
        end = offset + len(data)
        whole_first = first + (offset % cs != 0)
        whole_last = last - (end % cs != 0 and end < self.size)
        for partial in {first, last} - set(range(whole_first, whole_last + 1)):
            await self.fill(partial, partial)
        while (busy := self._claimed_unrestored(whole_first, whole_last)) is not None:
            await self.claims.wait(busy)
        # No await from the last look to the mark: no copy of these clusters is under way,
        # and none can start before they say restored.
        written = os.pwrite(self.out.fd, data, offset)
        if whole_first <= whole_last:
            self.restored[whole_first : whole_last + 1] = 1
        return written

    def _claimed_unrestored(self, first: int, last: int) -> int | None:
        cluster = self.restored.find(0, first, last + 1)
        while cluster >= 0:
            if self.claims.is_claimed(cluster):
                return cluster
            cluster = self.restored.find(0, cluster + 1, last + 1)
        return None

    async def run_copier(self) -> None:
        """Fill every cluster not yet restored, in batches, two at a time (one reads the
        backup while the other writes DEST); then make DEST durable and say complete. A
        failure ends the restore as failed, with its reason."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(COPIERS):
                    nursery.start_soon(self._copy_batches)
            if self.running:
                await self._finish()
        except OSError as e:
            self._fail(str(e))

    async def _copy_batches(self) -> None:
        batch = max(1, self.batch_bytes // self.cluster_size)
        try:
            while self.running:
                cluster = self.restored.find(0, self._cursor)
                if cluster < 0:
                    cluster = self.restored.find(0)
                    if cluster < 0:
                        return
                last = min(len(self.restored), cluster + batch) - 1
                self._cursor = last + 1
                runs, busy = self._claim_runs(cluster, last)
                if runs:
                    copied = await self._copy(runs, self._copiers)
                    self.bytes_copier += copied
                    await self.limiter.account(copied)
                elif busy is not None:  # all claimed by readers: let them finish
                    await self.claims.wait(busy)
        except OSError as e:
            self._fail(str(e))

    def _claim_runs(self, first: int, last: int) -> tuple[list[tuple[int, int]], int | None]:
        """Claim the clusters of first..last that are neither restored nor claimed, as
        runs (first, count); also returns one that someone else is copying, or None."""
        runs: list[tuple[int, int]] = []
        busy = None
        cluster = self.restored.find(0, first, last + 1)
        while cluster >= 0:
            if self.claims.claim(cluster):
                if runs and runs[-1][0] + runs[-1][1] == cluster:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((cluster, 1))
            elif busy is None:
                busy = cluster
            cluster = self.restored.find(0, cluster + 1, last + 1)
        return runs, busy

    async def _copy(self, runs: list[tuple[int, int]], limiter: trio.CapacityLimiter | None) -> int:
        """Restore the claimed runs in a worker thread and mark them restored; returns the
        bytes. The claims always go back; a corrupt cluster fails the whole restore.
        `limiter`: the copiers' threads; a guest's read waits for none of them."""
        try:
            copied, length, error = await trio.to_thread.run_sync(
                self._copy_runs, runs, limiter=limiter
            )
        except BaseException:
            for first, count in runs:
                self.claims.release(first, count)
            raise
        for i, (first, count) in enumerate(runs):
            if i < copied:
                self.restored[first : first + count] = 1
            self.claims.release(first, count)
        if isinstance(error, CorruptCluster):
            self._fail(error.message)
            raise OSError(errno.EIO, error.message)
        if error is not None:
            raise error
        return length

    def _copy_runs(
        self, runs: list[tuple[int, int]]
    ) -> tuple[int, int, OSError | CorruptCluster | None]:
        """Blocking: read each run from the chain, verified, and write it to DEST.
        Returns (runs copied, bytes, the error that stopped it or None)."""
        total = 0
        for i, (first, count) in enumerate(runs):
            offset = first * self.cluster_size
            length = min(count * self.cluster_size, self.size - offset)
            try:
                data = self.chain.read(offset, length)
                write_nonzero(self.out, data, offset, length, self.cluster_size)
            except (OSError, CorruptCluster) as e:
                return i, total, e
            total += length
        return len(runs), total, None

    # -- durability ---------------------------------------------------------------------

    async def save(self) -> None:
        """Make DEST durable, then the map that says which clusters it holds (a guest's
        fsync: its writes survive a crash and a resume)."""
        async with self._saving:
            snapshot = self.restored.copy()
            map_too = self.running and self.out.format == "raw" and snapshot != self._saved
            await trio.to_thread.run_sync(self._sync_and_save, snapshot if map_too else None)

    def _sync_and_save(self, snapshot: bitarray | None) -> None:
        os.fdatasync(self.out.fd)
        if snapshot is not None:
            self._save_map(snapshot)
            self._saved = snapshot

    async def run_saver(self) -> None:
        """Save the map every second while the restore runs."""
        while not self.done.is_set():
            with trio.move_on_after(SAVE_PERIOD_S):
                await self.done.wait()
            if not self.done.is_set():
                try:
                    await self.save()
                except OSError as e:
                    log.warning("cannot save the restored map of %s: %s", self.dest, e)

    def _save_map(self, bits: bitarray) -> None:
        header = MAP_HEADER.pack(
            MAP_MAGIC, 1, self.cluster_size, self.size, _job_id(self.chain).encode()
        )
        body = header + bits.tobytes()
        data = body + hashlib.sha256(body).digest()
        replace_file(map_path(self.dest), data, 0o600)

    async def _finish(self) -> None:
        async with self._saving:  # no map save after this: the record says complete
            await trio.to_thread.run_sync(self.out.fsync)
            self.finished_mono = time.monotonic()
            # Complete only once the record says so: until then status says running, a
            # crash leaves a restore to resume, and a failed write fails it.
            await trio.to_thread.run_sync(self.write_record, "complete")
            map_path(self.dest).unlink(missing_ok=True)
            self.state = "complete"
        log.info("restore complete: %s", self.dest)
        self.done.set()

    def _fail(self, reason: str) -> None:
        if self.state != "running":
            return
        log.error("restore failed: %s", reason)
        self.state = "failed"
        self.errors.append(reason)
        self.finished_mono = time.monotonic()
        try:
            self.write_record()
        except OSError as e:
            log.error("cannot write the record beside %s: %s", self.dest, e)
        self.done.set()

    def _check_usable(self) -> None:
        if self.state == "failed":
            raise OSError(errno.EIO, f"the restore failed: {self.errors[-1]}")

    def close(self) -> None:
        self.chain.close()
        self.out.close()

    @property
    def running(self) -> bool:
        return self.state == "running"

    # -- figures ------------------------------------------------------------------------

    def _bytes(self, bits: bitarray) -> int:
        total = bits.count() * self.cluster_size
        if bits and bits[-1]:
            total -= len(bits) * self.cluster_size - self.size
        return total

    def status(self) -> dict:
        done = self._bytes(self.restored)
        elapsed = (self.finished_mono or time.monotonic()) - self.started_mono
        copied = self.bytes_copier + self.bytes_on_demand
        rate = copied / elapsed if elapsed > 0 else 0.0
        return {
            "restore": True,
            "state": self.state,
            "source": str(self.chain.top),
            "dest": str(self.dest),
            "format": self.out.format,
            "point_in_time": self.chain.record.point_in_time,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "bytes_total": self.size,
            "bytes_done": done,
            "bytes_resumed": self.resumed_bytes,
            "bytes_copier": self.bytes_copier,
            "bytes_on_demand": self.bytes_on_demand,
            "rate": round(rate),
            "eta_s": round((self.size - done) / rate, 1)
            if rate and self.state == "running"
            else None,
            "errors": list(self.errors),
        }

    def write_record(self, status: str | None = None) -> None:
        """The record beside DEST says `status` (the restore's state by default), with this
        process as its owner: the daemon writes it again after the fork."""
        st = self.status()
        record = Record(
            status=status or self.state,
            source=str(self.chain.top),
            target=str(self.dest),
            format=self.out.format,
            size=self.size,
            cluster_size=self.cluster_size,
            sync=SYNC,
            point_in_time=self.chain.record.point_in_time,
            pid=os.getpid(),
            started=self.started.isoformat(),
            finished=datetime.now(UTC).isoformat() if self.finished_mono else None,
            bytes_total=self.size,
            bytes_done=st["bytes_done"],
            bytes_copier=self.bytes_copier,
            bytes_cbw=self.bytes_on_demand,
            bytes_written=self.bytes_copier + self.bytes_on_demand,
            duration_s=round(time.monotonic() - self.started_mono, 3),
            errors=list(self.errors),
            job=_job_id(self.chain),
        )
        write_record(record_path(self.dest), record, reserve=False)


def open_source(top: str, access: S3Access | None) -> BackupChain | RepoSnapshot:
    """The backup to restore: a repository snapshot, or a chain of files."""
    if is_snapshot(top):
        return RepoSnapshot.open(top, access)
    return BackupChain.open(Path(top))


def _job_id(chain: BackupChain | RepoSnapshot) -> str:
    """What ties a restore to its backup: the top link's job id (32 hex digits)."""
    return (chain.record.job or "").ljust(32, "0")[:32]


def _open_dest(dest: Path, flags: int) -> int:
    try:
        return os.open(dest, os.O_RDWR | os.O_CLOEXEC | flags, 0o600)
    except OSError as e:
        raise CowfsError(f"cannot open destination {dest}: {e.strerror}") from None


def _resumable(
    chain: BackupChain | RepoSnapshot, dest: Path, req: RestoreRequest
) -> bitarray | None:
    """The restored map of DEST if DEST is an unfinished restore of this chain (and not
    --force); None to start afresh."""
    if req.force or not dest.is_file():
        return None
    try:
        record = read_record(dest)
    except CowfsError:
        return None
    if record.sync != SYNC or record.job != _job_id(chain) or verdict(record) == "complete":
        return None
    if req.fmt != "raw":
        raise CowfsError(f"{dest} is an unfinished restore; only a raw one resumes (--force)")
    try:
        data = map_path(dest).read_bytes()
    except FileNotFoundError:
        raise CowfsError(
            f"{dest} is an unfinished restore without its map {map_path(dest)}; --force starts over"
        ) from None
    body, check = data[:-32], data[-32:]
    count = -(-chain.size // chain.cluster_size)
    if hashlib.sha256(body).digest() != check or len(body) < MAP_HEADER.size:
        raise CowfsError(f"{map_path(dest)}: damaged restored map; --force starts over")
    magic, _version, cluster_size, size, _job = MAP_HEADER.unpack_from(body)
    if magic != MAP_MAGIC or cluster_size != chain.cluster_size or size != chain.size:
        raise CowfsError(f"{map_path(dest)}: not this restore's map; --force starts over")
    bits = bitarray()
    bits.frombytes(body[MAP_HEADER.size :])
    del bits[count:]
    if os.path.getsize(dest) != chain.size:
        raise CowfsError(f"{dest} changed size since the restore stopped; --force starts over")
    return bits


async def restore_all(restore: Restore, progress: Callable[[int, int], None]) -> bool:
    """Run the copier to the end (no mount): `cowfs restore` without --live. Ctrl-C or
    SIGTERM stop it with the map saved, so that the next restore resumes; returns False
    then."""
    interrupted = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(restore.run_saver)

        async def report() -> None:
            while not restore.done.is_set():
                st = restore.status()
                progress(st["bytes_done"], st["bytes_total"])
                with trio.move_on_after(0.2):
                    await restore.done.wait()

        async def stop_on_signals(copier: trio.CancelScope) -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    interrupted = True
                    copier.cancel()
                    return

        with trio.CancelScope() as copier:
            nursery.start_soon(stop_on_signals, copier)
            nursery.start_soon(report)
            await restore.run_copier()
        if restore.running:
            await restore.save()
        restore.done.set()
        nursery.cancel_scope.cancel()
    st = restore.status()
    progress(st["bytes_done"], st["bytes_total"])
    return not interrupted
