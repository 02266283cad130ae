"""Daemonizing late: fork after the mount exists and before any thread does.

The parent waits on a pipe until the child says the live file is usable (the
point in time is fixed), then exits 0; if the child fails first, the parent
prints the child's reason and exits non-zero. The parent never returns: what is
left to undo is the child's. By the fork everything slow is done (the point in
time is fixed), so the parent waits only for the child to put the target in
place; Ctrl-C cannot interrupt that half-way, and the child undoes a start that
fails. Threads do not survive fork(), so this must run before trio starts its
worker threads.
"""

import logging
import os
import signal
import sys
from pathlib import Path

from .errors import EXIT_ERROR

log = logging.getLogger(__name__)

READY = b"ok"


class Readiness:
    """The child's end of the pipe: say `ready()` once, or `failed(reason)`."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, message: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, message)
        except BrokenPipeError:  # the parent was killed: nobody to tell, the job goes on
            log.warning("the mount command went away before it heard the outcome")
        os.close(self._fd)
        self._fd = None

    def ready(self) -> None:
        self._send(READY)

    def failed(self, reason: str) -> None:
        self._send(reason.encode())


def daemonize(log_file: Path, ready_message: str | None = None) -> Readiness:
    """Fork. In the parent: wait for the child's word, then exit (printing
    `ready_message` if the child is ready). In the child: detach from the terminal,
    send output to `log_file`, and return the readiness pipe."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        message = b"".join(chunks).decode(errors="replace")
        if message == READY.decode():
            if ready_message is not None:
                print(ready_message, flush=True)
            os._exit(0)
        reason = message or f"the cowfs daemon died before the mount was ready; see {log_file}"
        print(f"cowfs: error: {reason}", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)
    os.close(read_fd)
    os.setsid()
    os.chdir("/")  # hold no directory busy: every path is absolute by now
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    return Readiness(write_fd)
