"""Job control in-band, s3ql's way: extended attributes on the mount's root directory.

`user.cowfs.status` reads the job's status as JSON; writing a command to
`user.cowfs.control` acts on the job. No socket to clean up, and the kernel's
permission checks apply. The server half answers inside the daemon; the client
half is what the CLI calls. Never blocks the loop and never touches the source.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

from .errors import CowfsError
from .job import Job

STATUS_XATTR = "user.cowfs.status"
CONTROL_XATTR = "user.cowfs.control"
FSTYPE = "fuse.cowfs"


class ControlServer:
    """Answers status reads and control writes for one job."""

    def __init__(self, job: Job, mountpoint: str, on_cancel: Callable[[], None]) -> None:
        self.job = job
        self.mountpoint = mountpoint
        self.on_cancel = on_cancel

    def status(self) -> bytes:
        status = self.job.status()
        status["pid"] = os.getpid()
        status["mountpoint"] = self.mountpoint
        return json.dumps(status).encode()

    def command(self, value: bytes) -> None:
        """Run a control command; unknown commands raise ValueError."""
        match value.decode(errors="replace").strip():
            case "cancel":
                self.job.cancel("cancelled by the user")
                self.on_cancel()
            case other:
                raise ValueError(f"unknown control command {other!r}")


def find_mount(mountpoint: Path) -> Path:
    """The absolute mountpoint if a cowfs mount is there, else a clear error."""
    path = mountpoint.resolve()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4].encode().decode("unicode_escape")
            if mp == str(path) and right.split()[0] == FSTYPE:
                return path
    raise CowfsError(f"{mountpoint}: no cowfs mount there")


def read_status(mountpoint: Path) -> dict:
    """The live job's status, from the mount's root directory."""
    path = find_mount(mountpoint)
    try:
        return json.loads(os.getxattr(path, STATUS_XATTR))
    except OSError as e:
        raise CowfsError(f"{mountpoint}: cannot read the job's status: {e.strerror}") from None


def send_command(mountpoint: Path, command: str) -> None:
    path = find_mount(mountpoint)
    try:
        os.setxattr(path, CONTROL_XATTR, command.encode())
    except OSError as e:
        raise CowfsError(f"{mountpoint}: {command} refused: {e.strerror}") from None
