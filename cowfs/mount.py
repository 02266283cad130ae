"""Wiring of `cowfs mount`: preflight, lock, create, mount, daemonize, serve, finish.

Owns the order of events, which is what the guarantee hangs on: the point in
time is fixed before pyfuse3 serves the first request; after the mount is gone
the copier finishes inside a shielded scope; the record says complete only
after the target is durable. Holds no backup logic of its own.
"""

import contextlib
import fcntl
import logging
import os
import signal
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyfuse3
import trio
from bitarray import bitarray

from . import preflight
from .bitmap import BitmapStore, DirtyBitmap, to_clusters
from .busypoll import BusyPoller
from .claims import Claim, rename_noreplace
from .control_server import ControlServer, listen
from .copier import copy_in_background
from .daemon import Readiness, daemonize
from .errors import EXIT_INCOMPLETE, EXIT_OK, CowfsError
from .fs import LiveFS
from .imagelock import Role, lock_image
from .job import Job, JobOptions, JobState, SyncMode
from .log import setup_logging
from .progress import show_progress
from .record import Record, log_path, read_record, record_path, write_record
from .target import Target, create_target

log = logging.getLogger(__name__)

MOUNT_OPTIONS = {"fsname=cowfs", "subtype=cowfs", "auto_unmount"}
"""auto_unmount: if the daemon dies (kill -9), fusermount3 removes the mount, so no
stale 'Transport endpoint is not connected' mount blocks the next job."""


@dataclass(frozen=True)
class MountRequest:
    source: Path
    mountpoint: Path
    target: Path
    options: JobOptions
    fmt: str = "raw"
    compress: bool = False
    backing: Path | None = None
    force: bool = False
    allow_other: bool = False
    foreground: bool = False
    progress: bool = False
    debug: bool = False


def run_mount(req: MountRequest) -> int:
    """Mount, serve until unmounted, finish the backup. Returns the exit code."""
    source, mountpoint = req.source.absolute(), req.mountpoint.absolute()
    target_path = preflight.canonical_target(req.target)
    preflight.check_cluster_size(req.options.cluster_size)
    source_st = preflight.check_source(source)
    preflight.check_mountpoint(mountpoint)
    preflight.check_target(target_path, source, source_st, mountpoint, req.force)
    if req.backing is not None:
        preflight.check_backing(req.backing, source_st, target_path)

    readiness: Readiness | None = None
    claims: list[Claim] = []
    old_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.ExitStack() as undo:  # until the daemon runs, a failure undoes it all
            for kind, path, what in (
                ("mount", mountpoint, "mountpoint"),
                ("target", target_path, "target"),
            ):
                claims.append(Claim.take(kind, path, what))
                undo.callback(claims[-1].release)
            # Again, now that no other cowfs can race for these names:
            preflight.check_mountpoint(mountpoint)
            preflight.check_target(target_path, source, source_st, mountpoint, req.force)

            source_fd = _open_locked(source, "source")
            undo.callback(os.close, source_fd)
            replaced = None
            if target_path.exists():  # --force: never replace a file another job is using
                replaced_fd = _open_locked(target_path, "target")
                undo.callback(os.close, replaced_fd)
                replaced = os.fstat(replaced_fd)
            dirty = BitmapStore.load(source, holding_lock=True)
            incremental = _start_bitmap(dirty, req, source_st.st_size)
            tmp = target_path.with_name(f".{target_path.name}.cowfs-{os.getpid()}.tmp")
            target = _create_target(tmp, target_path, source_st.st_size, req)
            undo.callback(tmp.unlink, missing_ok=True)
            undo.callback(target.close)
            target.path = target_path  # what the record and status name; tmp is ours alone

            job = Job(source_fd, str(source), target, req.options, incremental)
            sock_path = claims[0].lock.with_suffix(".sock")
            sock = listen(sock_path)
            undo.callback(sock.close)
            undo.callback(sock_path.unlink, missing_ok=True)
            stop = trio.Event()
            poller = BusyPoller()
            fs = LiveFS(job, source.name, poller, dirty)
            options = set(pyfuse3.default_options) | MOUNT_OPTIONS
            if req.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(fs, str(mountpoint), options)
            except Exception as e:  # pyfuse3 raises RuntimeError with libfuse's reason
                raise CowfsError(f"cannot mount on {mountpoint}: {e}") from None
            undo.callback(pyfuse3.close, unmount=True)
            job.start()  # the point in time; nothing is served before it (slow on huge sources)

            if req.foreground:
                setup_logging(None, req.debug)
                readiness = Readiness(None)
            else:
                readiness = daemonize(log_path(target_path))
                setup_logging(log_path(target_path), req.debug)
            for claim in claims:
                claim.held_by(os.getpid())
            _write_record(job, reserve=True)  # no record, no backup: this one must succeed
            undo.callback(record_path(target_path).unlink, missing_ok=True)
            _place_target(tmp, target_path, replaced)
            if dirty.bitmaps:  # a crash from here on leaves them marked in use: inconsistent
                dirty.save(os.getpid(), os.fstat(source_fd))
            undo.pop_all()
    except BaseException as e:
        error = e
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM: a failed start like any other
            error = CowfsError("interrupted before the mount was ready; nothing was changed")
        if readiness is not None:
            readiness.failed(error.message if isinstance(error, CowfsError) else repr(error))
        raise error from None
    finally:
        signal.signal(signal.SIGTERM, old_sigterm)
    if replaced is not None:
        os.close(replaced_fd)  # the file it named is gone: replaced by the new target

    control = ControlServer(job, str(mountpoint), stop_serving=stop.set)
    try:
        trio.run(_serve, job, poller, control, sock, stop, readiness, req.progress)
    except BaseException as e:
        readiness.failed(f"cowfs daemon failed: {e!r}")
        raise
    finally:
        if req.options.bitmap is not None:
            complete = job.state is JobState.COMPLETE
            dirty.end_job(req.options.bitmap, _anchor(job) if complete else None)
        bitmaps_saved = _save_bitmaps(dirty, None, source_fd)
        saved = _save_record(job, reserve=False) and bitmaps_saved
        sock.close()
        sock_path.unlink(missing_ok=True)
        for claim in claims:
            claim.release()
    log.info("backup %s: %s", job.state, target_path)
    return EXIT_OK if job.state is JobState.COMPLETE and saved else EXIT_INCOMPLETE


def _start_bitmap(dirty: BitmapStore, req: MountRequest, size: int) -> bitarray | None:
    """Anchor or use the job's bitmap at the point in time; for an incremental, return
    the clusters to copy. Refuses a bitmap that cannot be trusted, and a backing that is
    not the backup the bitmap's writes are counted from."""
    name = req.options.bitmap
    if name is None:
        return None
    cluster_size = req.options.cluster_size
    if req.options.sync is SyncMode.INCREMENTAL:
        bitmap = dirty.get(name)
        if not bitmap.consistent:
            raise CowfsError(
                f"bitmap {name!r} of {dirty.source} is inconsistent ({bitmap.reason}); "
                f"take a full backup with --sync full --bitmap {name}"
            )
        if req.backing is not None:
            _check_anchor(bitmap, req.backing)
    bitmap = dirty.start_job(name, cluster_size, size)
    if req.options.sync is not SyncMode.INCREMENTAL:
        return None
    assert bitmap.before_job is not None
    return to_clusters(bitmap.before_job, bitmap.granularity, cluster_size)


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


def _create_target(tmp: Path, final: Path, size: int, req: MountRequest) -> Target:
    """A new target at `tmp` (renamed to `final` once mounted), locked like the source."""
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


def _anchor(job: Job) -> dict:
    """What a bitmap remembers of the complete job it restarted at (bitmap.py)."""
    assert job.point_in_time is not None
    return {
        "job": job.id,
        "target": str(job.target.path),
        "point_in_time": job.point_in_time.isoformat(),
    }


def _save_bitmaps(dirty: BitmapStore, in_use_by: int | None, source_fd: int) -> bool:
    """Store the bitmaps at the end of a mount; a failure leaves them marked in use, which
    reads as inconsistent: the next incremental is refused, never wrong."""
    if not dirty.bitmaps and not dirty.path.exists():
        return True
    try:
        dirty.save(in_use_by, os.fstat(source_fd))
    except OSError as e:
        log.error("cannot save the dirty bitmaps of %s: %s", dirty.source, e)
        return False
    return True


def _open_locked(path: Path, role: Role) -> int:
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


async def _serve(
    job: Job,
    poller: BusyPoller,
    control: ControlServer,
    sock: socket.socket,
    stop: trio.Event,
    readiness: Readiness,
    progress: bool,
) -> None:
    """Serve the live file until unmounted, then finish the job; control goes on
    answering throughout, also after the mount is gone and the copier still copies."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy_in_background, job)
        nursery.start_soon(control.serve, sock)
        nursery.start_soon(_cancel_on_signals, job, stop)
        nursery.start_soon(_record_when_ended, job)
        if progress:
            nursery.start_soon(show_progress, job)
        readiness.ready()
        try:
            async with trio.open_nursery() as serving:
                serving.start_soon(_stop_serving_when, stop)
                serving.start_soon(poller.run)
                await pyfuse3.main()
                serving.cancel_scope.cancel()
        finally:
            # No request is served from here on: the source is quiet.
            pyfuse3.close(unmount=True)
            control.mounted = False
        with trio.CancelScope(shield=True):
            await job.complete()
        nursery.cancel_scope.cancel()


async def _cancel_on_signals(job: Job, stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            job.cancel(f"received {signal.Signals(signum).name}")
            stop.set()


async def _stop_serving_when(stop: trio.Event) -> None:
    """Leave pyfuse3.main() from a task of its own, so that the request asking for it
    (a cancel) is answered first. Cancelled as soon as main() returns: terminate()
    after close() would touch a freed session."""
    await stop.wait()
    pyfuse3.terminate()


async def _record_when_ended(job: Job) -> None:
    """A job that fails or is cancelled while mounted says so at once, not at unmount
    (a complete one is recorded once, at the very end)."""
    await job.ended.wait()
    if job.state is not JobState.COMPLETE:
        await trio.to_thread.run_sync(_save_record, job, True)


def _save_record(job: Job, reserve: bool) -> bool:
    """Write the record; a failure is logged, and the record left behind (which does not
    say complete) stays the truth a reader sees."""
    try:
        _write_record(job, reserve)
    except OSError as e:
        log.error("cannot write the record beside %s: %s", job.target.path, e)
        return False
    return True


def _write_record(job: Job, reserve: bool) -> None:
    if job.point_in_time is None:
        return  # the job never started: no backup, no record
    status = job.status()
    record = Record(
        status=str(job.state),
        source=job.source,
        target=str(job.target.path),
        format=job.target.format,
        size=job.size,
        cluster_size=job.cluster_size,
        sync=str(job.options.sync),
        point_in_time=job.point_in_time.isoformat(),
        pid=os.getpid(),
        started=job.point_in_time.isoformat(),
        finished=datetime.now(UTC).isoformat() if job.finished_mono else None,
        bytes_total=int(status["bytes_total"]),  # type: ignore[call-overload]
        bytes_done=int(status["bytes_done"]),  # type: ignore[call-overload]
        bytes_copier=job.bytes_copier,
        bytes_cbw=job.bytes_cbw,
        bytes_written=job.bytes_written,
        duration_s=float(status["elapsed_s"]),  # type: ignore[arg-type]
        errors=list(job.errors),
        bitmap=job.options.bitmap,
        backing=None if job.target.backing is None else str(job.target.backing),
        job=job.id,
    )
    write_record(record_path(Path(job.target.path)), record, reserve)
