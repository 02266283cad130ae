"""Job control over a unix socket beside the mountpoint's claim in the run directory: the client.

Not a file inside the mount: a name there can be taken by an image (a source
called `.cowfs-control` once received the commands into the guest's disk), and
it goes away with the mount while the job may still be copying. The socket lives
as long as the daemon, is found from the mountpoint alone (claims.py's key, which
every spelling of the path shares) and is private to its user (the run
directory is 0700). One request per connection: a JSON line in, a JSON line out.
This is the half the CLI calls, without trio; control_server.py answers.
"""

import json
import os
import socket
from pathlib import Path
from typing import Any

from .claims import claim_file
from .errors import CowfsError

FSTYPE = "fuse.cowfs"
CLIENT_TIMEOUT_S = 30.0


def socket_path(mountpoint: Path) -> Path:
    return claim_file("mount", mountpoint, ".sock")


def request(mountpoint: Path, command: str, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon of `mountpoint`; returns the job's status after it."""
    try:
        path = socket_path(mountpoint)
    except OSError:
        raise CowfsError(f"{mountpoint}: no cowfs mount there") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise CowfsError(f"{mountpoint}: no cowfs mount there") from None
        try:
            sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        except OSError as e:
            raise CowfsError(f"{mountpoint}: the cowfs daemon did not answer: {e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise CowfsError(f"{mountpoint}: the cowfs daemon went away during {command}") from None
    if not reply.get("ok"):
        raise CowfsError(f"{mountpoint}: {command} refused: {reply.get('error')}")
    return reply["status"]


def read_status(mountpoint: Path) -> dict[str, Any]:
    """The job's status, mounted or not, while its daemon lives."""
    return request(mountpoint, "status")


def send_command(mountpoint: Path, command: str, **args: Any) -> dict[str, Any]:
    return request(mountpoint, command, **args)


def is_mounted(mountpoint: Path) -> bool:
    """Whether a cowfs mount is on `mountpoint` (any spelling of it)."""
    path = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            if _unescape(left.split()[4]) == path and right.split()[0] == FSTYPE.encode():
                return True
    return False


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...);
    every other byte, UTF-8 included, is as the path has it."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)
