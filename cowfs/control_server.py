"""The daemon's half of job control: answers requests on the mount's control socket.

One request per connection (see control.py); each is answered in a task of its
own and never blocks the loop. A command that cannot act (on a job in its state,
or on bad input) is refused with the reason, which the client turns into exit 2.
"""

import contextlib
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .backup import TargetRequest
from .control import CLIENT_TIMEOUT_S
from .errors import CowfsError
from .group import Completion, Group
from .job import JobState
from .options import JobOptions
from .registry import Registry
from .repo.jobs import RepoRequest

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10
WAIT_MAX_S = CLIENT_TIMEOUT_S / 2
"""The longest a `wait` request holds its answer back: well within the client's timeout."""


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


class ControlEndpoint:
    """One request per connection, answered by `command` in a task of its own."""

    async def command(self, request: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def serve(self, sock: socket.socket) -> None:
        """Accept requests until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self._answer, [listener])

    async def _answer(self, stream: trio.SocketStream) -> None:
        """One request, one reply. A client that misbehaves or leaves costs it its answer,
        never the daemon (a bug here is logged, the jobs go on)."""
        async with stream:
            try:
                request = await _read_request(stream)
                reply = {"ok": True, "status": await self.command(request)}
            except (ValueError, TypeError, KeyError) as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            except CowfsError as e:
                reply = {"ok": False, "error": e.message}
            except (OSError, trio.BrokenResourceError):
                return
            except Exception as e:
                log.exception("internal error answering a control request")
                reply = {"ok": False, "error": f"internal error: {e!r}"}
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")


class ControlServer(ControlEndpoint):
    """Answers status requests and commands for the jobs of one mount."""

    def __init__(self, registry: Registry, stop_serving: Callable[[], None]) -> None:
        self.registry = registry
        self.stop_serving = stop_serving

    async def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request; returns the mount's status after it. Raises CowfsError with
        the reason when the command cannot act."""
        registry = self.registry
        match request.get("command"):
            case "status":
                pass
            case "backup":
                group = await registry.backup(_requests(request), _completion(request))
                return registry.status() | {"started": group.id}
            case "end":
                group = registry.end(request.get("job"))
                return registry.status() | {"ending": group.id}
            case "release" if _range(request):
                released, freed = await registry.release(
                    request["job"], request.get("image"), request["offset"], request["length"]
                )
                return registry.status() | {"released": released, "freed": freed}
            case "cancel":
                group = registry.find(request.get("job"))
                if not group.running:
                    raise CowfsError(f"job {group.id} has ended: there is nothing to cancel")
                for job in group.jobs:
                    job.cancel("cancelled by the user")
                if group.id in registry.unmount_on_cancel:
                    self.stop_serving()
            case "pause":
                _each(registry.find(request.get("job")), JobState.RUNNING, "pause", "running")
            case "resume":
                _each(registry.find(request.get("job")), JobState.PAUSED, "resume", "paused")
            case "set-speed" if isinstance(request.get("speed"), int) and request["speed"] >= 0:
                group = registry.find(request.get("job"))
                if not group.running:
                    raise CowfsError(f"job {group.id} has ended: there is no copier")
                for job in group.jobs:
                    job.set_speed(request["speed"])
            case "wait" if _seconds(request.get("timeout")):
                group = registry.find(request.get("job"))
                with trio.move_on_after(request["timeout"]):  # then a progress report
                    await group.ended.wait()
            case "bitmap":
                await registry.bitmap_command(
                    request["image"],
                    request["action"],
                    request.get("name", ""),
                    request.get("granularity") or 0,
                )
            case "unmount":
                refusal = registry.unmount_refusal()
                if refusal is not None:
                    raise CowfsError(refusal)
                self.stop_serving()
            case other:
                raise CowfsError(f"unknown control request {other!r}")
        return registry.status()


def _range(request: dict[str, Any]) -> bool:
    fields = (request.get("job"), request.get("offset"), request.get("length"))
    return all(isinstance(v, int) and not isinstance(v, bool) for v in fields)


def _seconds(value: Any) -> bool:
    return isinstance(value, int | float) and 0 <= value <= WAIT_MAX_S


def _each(group: Group, state: JobState, action: str, wanted: str) -> None:
    """Pause or resume every job of `group` that is `state`; none is a refusal."""
    jobs = [job for job in group.jobs if job.state is state]
    if not jobs:
        states = ", ".join(sorted({str(job.state) for job in group.jobs}))
        raise CowfsError(f"job {group.id} is {states}, not {wanted}: nothing to {action}")
    for job in jobs:
        if state is JobState.RUNNING:
            job.pause("user")
        else:
            job.resume()


def _requests(request: dict[str, Any]) -> dict[str, TargetRequest]:
    """The targets of a backup request, as the CLI sends them (absolute paths)."""
    out = {}
    for name, t in request["targets"].items():
        out[name] = TargetRequest(
            target=Path(t["target"]),
            options=JobOptions.from_json(t["options"]),
            fmt=t["fmt"],
            compress=bool(t["compress"]),
            backing=None if t["backing"] is None else Path(t["backing"]),
            force=bool(t["force"]),
            repo=None if t.get("repo") is None else RepoRequest.from_json(t["repo"]),
        )
    if not out:
        raise CowfsError("a backup needs at least one --target")
    return out


def _completion(request: dict[str, Any]) -> Completion:
    return Completion(request.get("completion", Completion.GROUPED))


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
        raise ValueError("a request is a JSON object")
    return request
