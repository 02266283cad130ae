"""The daemon's half of job control: answers requests on the mount's control socket.

One request per connection (see control.py); each is answered in a task of its
own and never blocks the loop. A command that cannot act on the job in its
state is refused with the reason, which the client turns into exit 2.
"""

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .control import CLIENT_TIMEOUT_S
from .errors import CowfsError
from .job import Job

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10


def listen(path: Path) -> socket.socket:
    """The daemon's listening socket at `path` (bound before the mount is served: a
    failure here is a failed start). A stale socket of a dead daemon is replaced: the
    caller holds the mountpoint's claim, so no live daemon owns it."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise CowfsError(f"cannot create the control socket {path}: {e.strerror}") from None
    return sock


class CommandRefused(Exception):
    """A command that cannot act on the job in its state; the client exits 2 with it."""


class ControlServer:
    """Answers status requests and commands for one job."""

    def __init__(self, job: Job, mountpoint: str, stop_serving: Callable[[], None]) -> None:
        self.job = job
        self.mountpoint = mountpoint
        self.stop_serving = stop_serving
        self.mounted = True

    def status(self) -> dict[str, Any]:
        status = self.job.status()
        status["pid"] = os.getpid()
        status["mountpoint"] = self.mountpoint
        status["mounted"] = self.mounted
        return status

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request; returns the status it led to. Raises CommandRefused."""
        job = self.job
        state = str(job.state)
        match request.get("command"):
            case "status":
                pass
            case "cancel":
                job.cancel("cancelled by the user")
                self.stop_serving()
            case "pause":
                if state == "paused":
                    raise CommandRefused("the job is already paused")
                if state != "running":
                    raise CommandRefused(f"the job is {state}: there is nothing to pause")
                job.pause("user")
            case "resume":
                if state != "paused":
                    raise CommandRefused(f"the job is {state}, not paused: nothing to resume")
                job.resume()
            case "set-speed" if isinstance(request.get("speed"), int) and request["speed"] >= 0:
                if job.ended.is_set():
                    raise CommandRefused(f"the job has ended ({state}): there is no copier")
                job.set_speed(request["speed"])
            case other:
                raise CommandRefused(f"unknown control request {other!r}")
        return self.status()

    async def serve(self, sock: socket.socket) -> None:
        """Accept requests until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self._answer, [listener])

    async def _answer(self, stream: trio.SocketStream) -> None:
        """One request, one reply. A client that misbehaves or leaves costs it its answer,
        never the daemon (a bug here is logged, the job goes on)."""
        async with stream:
            try:
                request = await _read_request(stream)
                reply = {"ok": True, "status": self.command(request)}
            except (ValueError, CommandRefused) as e:
                reply = {"ok": False, "error": str(e)}
            except (OSError, trio.BrokenResourceError):
                return
            except Exception as e:
                log.exception("internal error answering a control request")
                reply = {"ok": False, "error": f"internal error: {e!r}"}
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    with trio.move_on_after(CLIENT_TIMEOUT_S):
        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    request = json.loads(data)
    if not isinstance(request, dict):
        raise CommandRefused("a request is a JSON object")
    return request
