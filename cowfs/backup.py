"""Starting a job: from a request to a target in place and a point in time fixed.

Shared by `cowfs mount --target` (the first job, started before the daemon forks)
and `cowfs backup` (jobs started inside a running daemon). Three steps, so that bad
input changes nothing: `prepare` checks everything and creates the target under a
temporary name, holding the target's claim and locks (blocking: run it in a thread
inside the daemon); `begin` anchors the bitmap and fixes the point in time (under
the barrier, or before anything is served; it never awaits); `commit` writes the
record and gives the target its name. Until `commit` returns, `abort` takes
everything back.
"""

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bitarray import bitarray

from . import preflight
from .bitmap import BitmapStore, DirtyBitmap, to_clusters
from .claims import Claim, rename_noreplace
from .disk import Disk
from .errors import CowfsError
from .extents import DataScan
from .imagelock import Role, lock_image
from .job import Job
from .options import JobOptions, SyncMode
from .record import Record, read_record, record_path
from .repo.jobs import RepoRequest, open_repo_target
from .sums import ALGORITHM, sums_path
from .target import Target, create_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetRequest:
    """What a job command asks for one image."""

    target: Path
    options: JobOptions
    fmt: str = "raw"
    compress: bool = False
    backing: Path | None = None
    force: bool = False
    repo: RepoRequest | None = None
    """Into a repository instead of a file (then `target` is unused)."""


@dataclass
class Prepared:
    """One image's job, ready to begin: its target exists under a temporary name."""

    disk: Disk
    request: TargetRequest
    job: Job
    claim: Claim | None
    """A file target's claim; a repository needs none (each snapshot has its own name)."""
    tmp: Path | None
    replaced_fd: int | None
    """The existing target (--force), locked until the new one replaces it."""
    undo: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


def prepare(disk: Disk, req: TargetRequest, mountpoint: Path, sources: list[Path]) -> Prepared:
    """Check the request for `disk` and create its target under a temporary name.
    `sources`: every image the mount serves (none may be the target)."""
    if req.repo is not None:
        snapshot = open_repo_target(disk, req.repo, req.options)
        undo = contextlib.ExitStack()
        undo.callback(snapshot.close)
        job = Job(disk.fd, str(disk.path), snapshot, req.options)
        return Prepared(disk, req, job, None, None, None, undo)
    target_path = preflight.canonical_target(req.target)
    preflight.check_cluster_size(req.options.cluster_size)
    source_st = os.fstat(disk.fd)
    _check(disk, req, target_path, source_st, mountpoint, sources)
    with contextlib.ExitStack() as undo:
        claim = Claim.take("target", target_path, "target")
        undo.callback(claim.release)
        # Again, now that no other cowfs can race for the name:
        _check(disk, req, target_path, source_st, mountpoint, sources)
        replaced_fd = None
        if target_path.exists():  # --force: never replace a file another job is using
            replaced_fd = open_locked(target_path, "target")
            undo.callback(os.close, replaced_fd)
        tmp = target_path.with_name(f".{target_path.name}.cowfs-{os.getpid()}.tmp")
        target = _create_target(tmp, target_path, source_st.st_size, req)
        undo.callback(tmp.unlink, missing_ok=True)
        undo.callback(target.close)
        target.path = target_path  # what the record and status name; tmp is ours alone
        job = Job(disk.fd, str(disk.path), target, req.options)
        prepared = Prepared(disk, req, job, claim, tmp, replaced_fd, undo.pop_all())
    return prepared


def _check(
    disk: Disk,
    req: TargetRequest,
    target: Path,
    source_st: os.stat_result,
    mountpoint: Path,
    sources: list[Path],
) -> None:
    preflight.check_target(target, disk.path, source_st, mountpoint, req.force)
    if target.exists():
        for source in sources:
            if os.path.samefile(source, target):
                raise CowfsError(f"target {target} is the served image {source}")
    if req.backing is not None:
        preflight.check_backing(req.backing, source_st, target)
    if req.options.sync is SyncMode.INCREMENTAL:
        assert req.options.bitmap is not None
        bitmap = disk.dirty.get(req.options.bitmap)
        if not bitmap.consistent:
            raise CowfsError(
                f"bitmap {bitmap.name!r} of {disk.path} is inconsistent ({bitmap.reason}); "
                f"take a full backup with --sync full --bitmap {bitmap.name}"
            )
        if req.backing is not None:
            _check_anchor(bitmap, req.backing)


def _check_anchor(bitmap: DirtyBitmap, backing: Path) -> None:
    """An incremental holds the writes since the bitmap's anchor: over any other backing
    (an older link, a failed one) the chain would restore wrong data."""
    name = bitmap.name
    if bitmap.anchor is None:
        raise CowfsError(
            f"bitmap {name!r} counts writes since no backup (it was added or cleared by hand), "
            f"so it cannot extend {backing}; take a full backup with --sync full --bitmap {name}"
        )
    if read_record(backing).job != bitmap.anchor["job"]:
        raise CowfsError(
            f"bitmap {name!r} counts writes since {bitmap.anchor['target']} "
            f"(point in time {bitmap.anchor['point_in_time']}), not since {backing}; "
            f"use --backing {bitmap.anchor['target']}"
        )


def begin(prepared: Prepared, at: datetime | None = None, scan: DataScan | None = None) -> None:
    """Fix the point in time (`at`, the group's; `scan`, the data clusters scanned before
    it): anchor the bitmap, fill the done map, protect the image. Never awaits: the
    caller holds the barrier (then the copier tells the target about zero clusters) or
    serves nothing yet (then it is done here, where Ctrl-C can still undo it)."""
    job, disk = prepared.job, prepared.disk
    job.incremental = _start_bitmap(disk.dirty, job.options, disk.size)
    if job.incremental is not None:
        job.incremental = job.target.needs(job.incremental, disk.size)
    job.start(at, scan, zeroes_now=scan is None)
    disk.jobs.append(job)


def _start_bitmap(dirty: BitmapStore, options: JobOptions, size: int) -> bitarray | None:
    """The bitmap restarts empty at the point in time; for an incremental, the clusters
    it held are the ones to copy."""
    if options.bitmap is None:
        return None
    bitmap = dirty.start_job(options.bitmap, options.cluster_size, size)
    if options.sync is not SyncMode.INCREMENTAL:
        return None
    assert bitmap.before_job is not None
    return to_clusters(bitmap.before_job, bitmap.granularity, options.cluster_size)


def commit(prepared: Prepared) -> None:
    """Write the record, then give the target its name (a crash in between leaves a
    record that says running beside whatever was there: never a lie)."""
    if prepared.claim is None or prepared.tmp is None:  # a repository: names its snapshot
        write_job_record(prepared.job, reserve=True)
        prepared.undo.pop_all()
        return
    prepared.claim.held_by(os.getpid())
    write_job_record(prepared.job, reserve=True)  # no record, no backup
    path = prepared.job.target.path
    prepared.undo.callback(record_path(path).unlink, missing_ok=True)
    sums_path(path).unlink(missing_ok=True)  # a replaced target's: never beside the new one
    replaced = None if prepared.replaced_fd is None else os.fstat(prepared.replaced_fd)
    _place_target(prepared.tmp, path, replaced)
    prepared.undo.pop_all()  # nothing to undo any more: the claim lasts as long as the job
    if prepared.replaced_fd is not None:
        os.close(prepared.replaced_fd)  # the file it named is gone


def abort(prepared: Prepared) -> None:
    """Take back a job that began but could not be committed: the bitmap gets its bits
    back, the image is no longer protected, the target files go."""
    job, disk = prepared.job, prepared.disk
    if job in disk.jobs:
        disk.jobs.remove(job)
    if job.options.bitmap is not None and job.point_in_time is not None:
        disk.dirty.end_job(job.options.bitmap, None)
    job.cancel("the start failed")
    prepared.undo.close()


def anchor(job: Job) -> dict:
    """What a bitmap remembers of the complete job it restarted at (bitmap.py)."""
    assert job.point_in_time is not None
    return {
        "job": job.id,
        "target": job.target.name,
        "point_in_time": job.point_in_time.isoformat(),
    }


def write_job_record(job: Job, reserve: bool) -> None:
    if job.point_in_time is None:
        return  # the job never started: no backup, no record
    status = job.status()
    record = Record(
        status=str(job.state),
        source=job.source,
        target=job.target.name,
        format=job.target.format,
        size=job.size,
        cluster_size=job.cluster_size,
        sync=str(job.options.sync),
        point_in_time=job.point_in_time.isoformat(),
        pid=os.getpid(),
        started=job.point_in_time.isoformat(),
        finished=datetime.now(UTC).isoformat() if job.finished_mono else None,
        bytes_total=status.bytes_total,
        bytes_done=status.bytes_done,
        bytes_copier=status.bytes_copier,
        bytes_cbw=status.bytes_cbw,
        bytes_written=status.bytes_written,
        duration_s=status.elapsed_s,
        errors=list(job.errors),
        bitmap=job.options.bitmap,
        backing=None if job.target.backing is None else str(job.target.backing),
        job=job.id,
        group=job.group,
        peers=list(job.peers),
        checksums=job.sums_sha256,
        checksum_algorithm=ALGORITHM if job.sums_sha256 else None,
    )
    job.target.write_record(record, reserve)


def _create_target(tmp: Path, final: Path, size: int, req: TargetRequest) -> Target:
    """A new target at `tmp` (renamed to `final` at commit), locked like the source."""
    backing = None
    if req.backing is not None:  # relative to the target, as QEMU reads it: chains can move
        backing = Path(os.path.relpath(req.backing.absolute(), final.parent))
    try:
        target = create_target(tmp, size, req.fmt, req.options.cluster_size, backing, req.compress)
    except OSError as e:
        raise CowfsError(f"cannot create target {final}: {e.strerror}") from None
    try:  # a new file: nobody else can hold it
        fcntl.flock(target.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock_image(target.fd, final, "target")
    except (OSError, CowfsError) as e:
        target.close()
        tmp.unlink()
        raise CowfsError(f"cannot lock target {final}: {e}") from None
    return target


def _place_target(tmp: Path, final: Path, replaced: os.stat_result | None) -> None:
    """Give the new target its name. Only the file this job locked (--force) is replaced;
    one that appeared meanwhile from outside cowfs is not, and the start fails."""
    try:
        st = os.stat(final)
    except FileNotFoundError:
        st = None
    try:
        if st is None or replaced is None:
            rename_noreplace(tmp, final)
        elif (st.st_dev, st.st_ino) == (replaced.st_dev, replaced.st_ino):
            os.replace(tmp, final)
        else:
            raise FileExistsError
    except FileExistsError:
        raise CowfsError(f"target {final} was created from outside cowfs meanwhile") from None
    except OSError as e:
        raise CowfsError(f"cannot name the target {final}: {e.strerror}") from None


def open_locked(path: Path, role: Role) -> int:
    """Open `path` read-write holding its locks for the job's whole life: flock against
    other cowfs jobs (for a clear message), QEMU's lock bytes against QEMU (imagelock)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise CowfsError(f"cannot open {role} {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CowfsError(f"{role} {path} is in use by another cowfs job") from None
    try:
        lock_image(fd, path, role)
    except CowfsError:
        os.close(fd)
        raise
    return fd
