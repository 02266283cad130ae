"""Wiring of `cowfs restore --live`: open, mount, daemonize, serve while the copier fills.

The command returns once MOUNTPOINT/<name of DEST> is usable. The daemon serves it
until unmounted (`cowfs unmount`, which waits for the copy to finish, as `finish`
does for backups: the rest comes from the quiet backup), answers `cowfs status` on
the mount's control socket all along, and exits when DEST is whole or the restore
failed.
"""

import argparse
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import preflight
from .claims import Claim
from .control_server import ControlEndpoint, listen
from .daemon import Readiness, daemonize
from .errors import EXIT_INCOMPLETE, EXIT_OK, CowfsError
from .log import setup_logging
from .mount import MOUNT_OPTIONS
from .record import log_path
from .restore import LIVE_BATCH_BYTES, Restore, RestoreRequest
from .restorefs import RestoreFS

log = logging.getLogger(__name__)


class RestoreControl(ControlEndpoint):
    """`cowfs status` and `cowfs unmount` for a live restore."""

    def __init__(self, restore: Restore, fs: RestoreFS, mountpoint: Path) -> None:
        self.restore = restore
        self.fs = fs
        self.mountpoint = mountpoint
        self.mounted = True
        self.stop = trio.Event()
        self.interrupted = False
        """SIGINT/SIGTERM: stop at once; DEST stays resumable."""

    def status(self) -> dict[str, Any]:
        return self.restore.status() | {
            "pid": os.getpid(),
            "mountpoint": str(self.mountpoint),
            "mounted": self.mounted,
            "live": str(self.mountpoint / self.restore.dest.name),
        }

    async def command(self, request: dict[str, Any]) -> dict[str, Any]:
        match request.get("command"):
            case "status":
                pass
            case "unmount":
                if self.fs.open_files:
                    raise CowfsError(
                        f"the live file is open ({self.fs.open_files} handles): close it first"
                    )
                self.stop.set()
            case other:
                raise CowfsError(f"a live restore does not take {other!r}")
        return self.status()


def run_live_restore(req: RestoreRequest, mountpoint: Path, args: argparse.Namespace) -> int:
    """Mount DEST as it fills; return once usable (the daemon goes on). Exit 0 then; in
    the foreground, when the restore has ended: 0 iff DEST is whole."""
    preflight.check_mountpoint(mountpoint)
    if req.dest.absolute().is_relative_to(mountpoint) or (
        req.dest.parent.exists() and req.dest.parent.resolve().is_relative_to(mountpoint.resolve())
    ):
        raise CowfsError(f"destination {req.dest} lies inside the mountpoint {mountpoint}")
    readiness: Readiness | None = None
    with contextlib.ExitStack() as undo:  # until the daemon serves, a failure undoes it all
        claim = Claim.take("mount", mountpoint, "mountpoint")
        undo.callback(claim.release)
        preflight.check_mountpoint(mountpoint)
        dest_claim = Claim.take("target", req.dest, "destination")
        undo.callback(dest_claim.release)
        restore = Restore.prepare(req)
        restore.batch_bytes = LIVE_BATCH_BYTES
        undo.callback(restore.close)
        restore.begin()
        sock_path = claim.lock.with_suffix(".sock")
        sock = listen(sock_path)
        undo.callback(sock.close)
        undo.callback(sock_path.unlink, missing_ok=True)
        fs = RestoreFS(restore)
        options = set(pyfuse3.default_options) | MOUNT_OPTIONS
        if args.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(fs, str(mountpoint), options)
        except Exception as e:  # pyfuse3 raises RuntimeError with libfuse's reason
            raise CowfsError(f"cannot mount on {mountpoint}: {e}") from None
        undo.callback(pyfuse3.close, unmount=True)
        if args.foreground:
            setup_logging(None, args.debug)
            readiness = Readiness(None)
        else:
            live = mountpoint / req.dest.name
            ready = (
                f"live: {live} (restoring {req.dest}; `cowfs status {mountpoint}` shows how far)"
            )
            readiness = daemonize(log_path(req.dest), ready)
            setup_logging(log_path(req.dest), args.debug)
        claim.held_by(os.getpid())
        dest_claim.held_by(os.getpid())
        restore.write_record()  # owned by the daemon now: `cowfs info` sees it alive
        undo.pop_all()
    if restore.resumed:
        log.info("resuming %s: %d bytes already restored", req.dest, restore.resumed_bytes)
    control = RestoreControl(restore, fs, mountpoint)
    try:
        trio.run(_serve, restore, control, sock, readiness)
    except BaseException as e:
        readiness.failed(f"cowfs daemon failed: {e!r}")
        raise
    finally:
        restore.close()
        sock.close()
        sock_path.unlink(missing_ok=True)
        dest_claim.release()
        claim.release()
    return EXIT_OK if restore.state == "complete" else EXIT_INCOMPLETE


async def _serve(
    restore: Restore, control: RestoreControl, sock: socket.socket, readiness: Readiness
) -> None:
    """Serve until unmounted while the copier fills DEST; then let it finish."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(restore.run_saver)
        nursery.start_soon(control.serve, sock)
        copier = trio.CancelScope()
        nursery.start_soon(_stop_on_signals, control, copier)

        async def run_copier() -> None:
            with copier:
                await restore.run_copier()

        nursery.start_soon(run_copier)
        readiness.ready()
        log.info("live restore of %s served at %s", restore.dest, control.status()["live"])
        try:
            async with trio.open_nursery() as serving:
                serving.start_soon(_stop_serving_when, control.stop)
                await pyfuse3.main()
                serving.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            control.mounted = False
        if not control.interrupted:
            with trio.CancelScope(shield=True):
                await restore.done.wait()
        if restore.running:  # interrupted: the map says what is restored, a resume goes on
            await restore.save()
        nursery.cancel_scope.cancel()


async def _stop_on_signals(control: RestoreControl, copier: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning("%s: stopping; restore again resumes", signal.Signals(signum).name)
            control.interrupted = True
            copier.cancel()
            control.stop.set()


async def _stop_serving_when(stop: trio.Event) -> None:
    """Leave pyfuse3.main() from a task of its own (see mount.py)."""
    await stop.wait()
    pyfuse3.terminate()
