"""Wiring of `cowfs mount`: preflight, lock, mount, daemonize, serve, finish.

Owns the order of events, which is what the guarantee hangs on: the first job's
point in time (`mount --target`) is fixed before pyfuse3 serves the first request
and before the fork, so that a slow start can be interrupted and undone; after
the mount is gone, running jobs finish inside a shielded scope. Holds no backup
logic of its own: the registry runs jobs, backup.py starts them.
"""

import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from . import backup, preflight
from .backup import Prepared, TargetRequest, open_locked
from .barrier import Barrier
from .bitmap import BitmapStore
from .busypoll import BusyPoller
from .claims import Claim, image_entry
from .control_server import ControlServer, listen
from .daemon import Readiness, daemonize
from .disk import Disk
from .errors import EXIT_INCOMPLETE, EXIT_OK, CowfsError
from .fs import LiveFS
from .group import Completion
from .intent import REGION_SIZE, SAVE_PERIOD_S
from .job import JobState
from .log import setup_logging
from .progress import show_progress
from .record import log_path
from .registry import Registry
from .tracking import ChangeTracker
from .viewtree import NAME as VIEWS_NAME

VIEWS = VIEWS_NAME.decode()

log = logging.getLogger(__name__)

MAX_TASKS = 99
"""pyfuse3's default number of request tasks."""

MOUNT_OPTIONS = {"fsname=cowfs", "subtype=cowfs", "auto_unmount"}
"""auto_unmount: if the daemon dies (kill -9), fusermount3 removes the mount, so no
stale 'Transport endpoint is not connected' mount blocks the next job."""


@dataclass(frozen=True)
class MountRequest:
    sources: list[Path]
    mountpoint: Path
    first: TargetRequest | None = None
    """The job of `mount --target`, started with the mount (one source only)."""
    allow_other: bool = False
    writeback_cache: bool = False
    """Let the kernel cache buffered writes (faster for buffered writers; a daemon that dies
    loses what it had not sent yet, as a power cut loses a disk's cache)."""
    intent_region: int = REGION_SIZE
    save_period: float = SAVE_PERIOD_S
    foreground: bool = False
    progress: bool = False
    debug: bool = False


def run_mount(req: MountRequest) -> int:
    """Mount, serve until unmounted, let running jobs finish. Returns the exit code:
    with a first job, whether it completed; without, 0."""
    mountpoint = req.mountpoint.absolute()
    sources = [source.absolute() for source in req.sources]
    names = [source.name for source in sources]
    if len(set(names)) < len(names):
        raise CowfsError(f"two images have the same name: {', '.join(sorted(names))}")
    if VIEWS in names:
        raise CowfsError(f"an image may not be named {VIEWS}: the mount shows its views there")
    for source in sources:
        preflight.check_source(source)
    preflight.check_mountpoint(mountpoint)

    readiness: Readiness | None = None
    old_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.ExitStack() as undo:  # until the daemon runs, a failure undoes it all
            claim = Claim.take("mount", mountpoint, "mountpoint")
            undo.callback(claim.release)
            preflight.check_mountpoint(mountpoint)  # again, now that no cowfs can race for it
            barrier = Barrier(mountpoint, fence=req.writeback_cache)
            disks = []
            for source in sources:
                fd = open_locked(source, "source")
                undo.callback(os.close, fd)
                dirty = BitmapStore.load(source, holding_lock=True)
                tracker = ChangeTracker(dirty, fd, req.intent_region, req.save_period)
                disks.append(Disk(source, fd, tracker, barrier))
            registry = Registry(mountpoint, disks, barrier)
            first = None
            if req.first is not None:
                first = backup.prepare(disks[0], req.first, mountpoint, sources)
                undo.callback(first.undo.close)
            sock_path = claim.lock.with_suffix(".sock")
            sock = listen(sock_path)
            undo.callback(sock.close)
            undo.callback(sock_path.unlink, missing_ok=True)
            poller = BusyPoller()
            options = set(pyfuse3.default_options) | MOUNT_OPTIONS
            if req.allow_other:
                options.add("allow_other")
            try:
                fs = LiveFS(registry, poller, req.writeback_cache)
                pyfuse3.init(fs, str(mountpoint), options)
            except Exception as e:  # pyfuse3 raises RuntimeError with libfuse's reason
                raise CowfsError(f"cannot mount on {mountpoint}: {e}") from None
            undo.callback(pyfuse3.close, unmount=True)
            if first is not None:
                backup.begin(first)  # the point in time; nothing is served yet (slow if huge)

            if req.foreground:
                setup_logging(None, req.debug)
                readiness = Readiness(None)
            else:
                log_file = claim.lock.with_suffix(".log")
                if first is not None:
                    log_file = log_path(first.job.target.path)
                readiness = daemonize(log_file)
                setup_logging(log_file, req.debug)
            claim.held_by(os.getpid())
            if first is not None:
                backup.commit(first)
            for disk in disks:  # a crash from here on recovers from this mount's intent
                disk.tracker.arm()
                entry = image_entry(disk.path)  # where `cowfs bitmap` finds this mount
                entry.write_text(str(mountpoint))
                undo.callback(entry.unlink, missing_ok=True)
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

    stop = trio.Event()
    control = ControlServer(registry, stop_serving=stop.set)
    try:
        trio.run(_serve, registry, first, poller, control, sock, stop, readiness, req.progress)
    except BaseException as e:
        readiness.failed(f"cowfs daemon failed: {e!r}")
        raise
    finally:
        for disk in disks:
            _end_tracking(disk.tracker)
        for disk in disks:
            image_entry(disk.path).unlink(missing_ok=True)
        sock.close()
        sock_path.unlink(missing_ok=True)
        claim.release()
    if first is None:
        return EXIT_OK
    return EXIT_OK if first.job.state is JobState.COMPLETE else EXIT_INCOMPLETE


def _end_tracking(tracker: ChangeTracker) -> None:
    """Store the bitmaps at the end of a mount; a failure leaves them marked in use by
    this mount, which the next one recovers as after a crash."""
    try:
        tracker.close()
    except OSError as e:
        log.error("cannot save the dirty bitmaps of %s: %s", tracker.store.source, e)


async def _serve(
    registry: Registry,
    first: Prepared | None,
    poller: BusyPoller,
    control: ControlServer,
    sock: socket.socket,
    stop: trio.Event,
    readiness: Readiness,
    progress: bool,
) -> None:
    """Serve the live files until unmounted, then let running jobs finish; control goes
    on answering throughout, also after the mount is gone."""
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        if first is not None:
            group = registry.add_group([first], Completion.GROUPED)
            registry.unmount_on_cancel.add(group.id)  # as documented for `mount --target`
            if progress:
                nursery.start_soon(show_progress, first.job)
        nursery.start_soon(control.serve, sock)
        nursery.start_soon(_cancel_on_signals, registry, stop)
        readiness.ready()
        try:
            async with trio.open_nursery() as serving:
                serving.start_soon(_stop_serving_when, stop)
                serving.start_soon(poller.run)
                # room for one held fence fsync per image besides pyfuse3's usual tasks
                await pyfuse3.main(max_tasks=MAX_TASKS + len(registry.disks))
                serving.cancel_scope.cancel()
        finally:
            # No request is served from here on: the sources are quiet.
            pyfuse3.close(unmount=True)
            registry.mount_gone()
        with trio.CancelScope(shield=True):
            await registry.done.wait()
        nursery.cancel_scope.cancel()


async def _cancel_on_signals(registry: Registry, stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            for group in registry.groups.values():
                for job in group.jobs:
                    job.cancel(f"received {signal.Signals(signum).name}")
            stop.set()


async def _stop_serving_when(stop: trio.Event) -> None:
    """Leave pyfuse3.main() from a task of its own, so that the request asking for it
    (a cancel) is answered first. Cancelled as soon as main() returns: terminate()
    after close() would touch a freed session."""
    await stop.wait()
    pyfuse3.terminate()
