"""Job control in-band, s3ql's way: a hidden control file in the mount's root.

Reading `MOUNTPOINT/.cowfs-control` returns the job's status as JSON; writing a
command to it acts on the job. The file is not listed, the kernel's permission
checks apply (root only), and there is no socket to clean up. Not xattrs: a
filesystem that answers getxattr gets a GETXATTR round trip for
security.capability before every single write, which doubled the cost of a
4 KiB write. The server half answers inside the daemon; the client half is what
the CLI calls. Never blocks the loop and never touches the source.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CowfsError

if TYPE_CHECKING:  # the CLI's client half must start without importing trio
    from .job import Job

CONTROL_NAME = ".cowfs-control"
FSTYPE = "fuse.cowfs"


class ControlServer:
    """Answers status reads and control writes for one job."""

    def __init__(self, job: "Job", mountpoint: str, stop_serving: Callable[[], None]) -> None:
        self.job = job
        self.mountpoint = mountpoint
        self.stop_serving = stop_serving
        self._stop_when_closed = False

    def status(self) -> bytes:
        status = self.job.status()
        status["pid"] = os.getpid()
        status["mountpoint"] = self.mountpoint
        return json.dumps(status).encode()

    def closed(self) -> None:
        """The control file was closed. Only now may a cancel take the mount away: the
        client's close() must still be answered, or it fails with ECONNABORTED."""
        if self._stop_when_closed:
            self.stop_serving()

    def command(self, value: bytes) -> None:
        """Run a control command; unknown commands raise ValueError."""
        match value.decode(errors="replace").split():
            case ["cancel"]:
                self.job.cancel("cancelled by the user")
                self._stop_when_closed = True
            case ["pause"]:
                self.job.pause("user")
            case ["resume"]:
                self.job.resume()
            case ["set-speed", speed] if speed.isdigit():
                self.job.set_speed(int(speed))
            case other:
                raise ValueError(f"unknown control command {' '.join(other)!r}")


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
    """The live job's status, from the mount's control file."""
    path = find_mount(mountpoint) / CONTROL_NAME
    try:
        with open(path, "rb", buffering=0) as f:
            return json.loads(f.read())
    except OSError as e:
        raise CowfsError(f"{mountpoint}: cannot read the job's status: {e.strerror}") from None


def send_command(mountpoint: Path, command: str) -> None:
    path = find_mount(mountpoint) / CONTROL_NAME
    try:
        with open(path, "wb", buffering=0) as f:
            f.write(command.encode())
    except OSError as e:
        raise CowfsError(f"{mountpoint}: {command} refused: {e.strerror}") from None
