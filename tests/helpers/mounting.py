"""Starting cowfs mounts and taking them down for sure: one module for the tests and the bench.

Why one module: the tests (conftest's runner, the long-lived mounts of the views tests,
live restores, VM runs) and the bench (scripts/benchkit) each started `cowfs mount`,
found its daemon, asked its status and ended it in their own way, with their own copies
of "is it mounted", "is that pid gone", the poll loop and the lazy-unmount-then-kill
fallback. A fix to one copy (an odd mountpoint name, a stacked mount, a daemon whose
pid no status told) reached only that copy. Here:

- how cowfs is run (`Cli`; `run_cowfs` runs this checkout's), and `ok`/`status` for
  the commands a test needs to succeed;
- what is mounted where (`/proc/self/mounts`, its escapes undone), whether a pid is
  gone, which processes serve a mountpoint, and the poll loop (`wait_for`,
  `wait_until`: real conditions, never a sleep standing in for one);
- `take_down`: the one way every mount ends -- steps of a lazy unmount or a signal, each
  followed by a bounded wait for the daemons to exit, then a lazy unmount of whatever
  is still mounted -- each owner's steps and timeouts given as data;
- `Mounted`: one `cowfs mount` daemon, with or without --target or in the foreground,
  usable when `start` returns, its status asked as a user asks it (the CLI) or cheaply
  (in-process), and a teardown that leaves no mount and no process behind;
- `CowfsRunner`: the mounts of one test (the `cowfs` fixture), all taken down.

Plain Python without pytest: the bench imports it too (it puts tests/ on sys.path).
A mount that does not start raises `MountError`; `ok` and `status` assert, for the
tests (pytest rewrites the asserts of `helpers`).
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cowfs.claims import claim_file
from cowfs.control import read_status, send_command
from cowfs.errors import CowfsError
from cowfs.record import FINAL_STATES

COWFS = [sys.executable, "-m", "cowfs"]
TIMEOUT = 60.0
"""How long a cowfs command, or a daemon's exit, may take before a caller gives up."""
POLL_S = 0.01
FSTYPE = "fuse.cowfs"


# -- running cowfs ---------------------------------------------------------------------------


class Cli:
    """How cowfs is run: this checkout's (`CURRENT`), or another tree's (the bench's
    --baseline-rev: its own argv and environment), with a default timeout per command."""

    def __init__(
        self,
        argv: Sequence[str] = COWFS,
        env: dict[str, str] | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.argv, self.env, self.timeout = list(argv), env, timeout

    def run(
        self, argv: Sequence[str], timeout: float | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Any command in this cowfs's environment, its output as text."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=self.timeout if timeout is None else timeout,
            check=check,
            env=self.env,
        )

    def cowfs(
        self, *args: str | os.PathLike, check: bool = False, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """One cowfs command as a user runs it; its exit code is the caller's to judge."""
        return self.run([*self.argv, *map(str, args)], timeout, check)


CURRENT = Cli()
run_cowfs = CURRENT.cowfs


def ok(*args: str | os.PathLike) -> subprocess.CompletedProcess[str]:
    """A cowfs command that must succeed: exit 0 and no traceback."""
    result = run_cowfs(*args)
    assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def status(mountpoint: Path) -> dict[str, Any]:
    """`cowfs status MOUNTPOINT --json`, as a user asks it; it must answer."""
    st: dict[str, Any] = json.loads(ok("status", mountpoint, "--json").stdout)
    return st


def unmount_released(
    mountpoint: Path,
    busy: Callable[[subprocess.CompletedProcess[str]], bool] = lambda r: r.returncode == 2,
) -> subprocess.CompletedProcess[str]:
    """`cowfs unmount MOUNTPOINT` once the caller has closed the live files. The kernel
    sends FUSE's RELEASE after close() returns, so the daemon may count a handle for a
    moment longer: retried for up to 10 s while `busy` says the refusal is that one (by
    default any refusal, exit 2). The last answer, for the caller to judge."""
    results: list[subprocess.CompletedProcess[str]] = []

    def answered() -> bool:
        results.append(run_cowfs("unmount", mountpoint))
        return not busy(results[-1])

    wait_until(answered, 10, "the daemon to see the live files closed")
    return results[-1]


# -- waiting, processes, the mount table ------------------------------------------------------


def wait_for(condition: Callable[[], object], timeout: float, interval: float = POLL_S) -> bool:
    """Poll a real condition (not a sleep as synchronisation) until it holds: False if
    it did not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(
    condition: Callable[[], object], timeout: float = TIMEOUT, what: str = "condition"
) -> None:
    """`wait_for`, for a condition that must come: TimeoutError naming `what` if not."""
    if not wait_for(condition, timeout):
        raise TimeoutError(f"timed out waiting for {what}")


def pid_gone(pid: int) -> bool:
    """Whether `pid` has exited. A zombie counts as gone: a child of ours not yet reaped,
    or a daemon whose parent reaps it in its own time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def daemon_pids(mountpoint: Path, command: bytes = b"mount") -> list[int]:
    """Processes of `cowfs COMMAND ... MOUNTPOINT`: a daemon whose pid no status told
    (a start that failed half-way, a mount that should have been refused)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cowfs" in args and command in args and os.fsencode(mountpoint) in args:
            pids.append(int(entry))
    return pids


def serving_pids(mountpoint: Path, command: bytes = b"mount") -> list[int]:
    """The daemon serving `mountpoint`: the pid its status tells, else the processes its
    command line names (one that does not answer; the path as the command spelled it)."""
    with contextlib.suppress(CowfsError, KeyError, ValueError):
        return [int(read_status(mountpoint)["pid"])]
    return daemon_pids(mountpoint, command)


def _unescape(field: bytes) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash in paths as \\ooo."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def mountpoints(fstype: str | None = FSTYPE) -> list[str]:
    """Where mounts of `fstype` (None: any) are, in mount order; a path twice is a mount
    stacked on another."""
    kind = None if fstype is None else os.fsencode(fstype)
    with open("/proc/self/mounts", "rb") as f:
        rows = [line.split(b" ") for line in f]
    return [_unescape(r[1]) for r in rows if kind is None or r[2] == kind]


def cowfs_mounts() -> set[str]:
    return set(mountpoints())


def mounts_at(path: Path, fstype: str | None = FSTYPE) -> int:
    """How many mounts of `fstype` are on `path` (2 or more: stacked). The path is made
    absolute, never resolved: resolving would ask a hung daemon about its mount's root."""
    return mountpoints(fstype).count(os.path.abspath(path))


def is_mounted(path: Path, fstype: str | None = FSTYPE) -> bool:
    return mounts_at(path, fstype) > 0


def lazy_unmount(path: Path, fstype: str | None = FSTYPE) -> bool:
    """`fusermount3 -u -z` (it works with files still open) while a mount of `fstype` is
    on `path`: stacked mounts come off one at a time. True if there was one."""
    found = False
    for _ in range(8):
        if not is_mounted(path, fstype):
            break
        found = True
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
    return found


# -- taking a mount down ------------------------------------------------------------------------

UNMOUNT = "unmount"
"""A step of `take_down`: unmount lazily, if still mounted."""
Step = tuple[str | signal.Signals | None, float]
"""(action, seconds): UNMOUNT, a signal for the daemons still alive, or None (only wait);
then up to `seconds` for every daemon to exit."""

STOP_TEST: tuple[Step, ...] = ((UNMOUNT, 20.0), (signal.SIGKILL, 10.0))
"""A test's mounts: unmounted at once (a failed test may still hold a live file open),
20 s for the daemon to end what the unmount leaves it (a job copies on after it), then
SIGKILL."""


def take_down(
    mountpoint: Path,
    pids: Iterable[int],
    steps: Sequence[Step],
    settle: float = 0.0,
    fstype: str | None = FSTYPE,
) -> bool:
    """End the daemons `pids` of `mountpoint` and leave nothing mounted there.

    Each step runs while one of them lives: its action, then up to its seconds for them
    all to exit. Then, whatever the steps achieved, up to `settle` s for the mount to go
    by itself (auto_unmount follows a daemon's exit) and a lazy unmount of what is left.
    True if nothing was forced: no SIGKILL was sent and nothing was left to unmount."""
    pids = [p for p in pids if p > 1 and p != os.getpid()]  # never our group, init or self
    killed = False
    for action, seconds in steps:
        alive = [p for p in pids if not pid_gone(p)]
        if not alive:
            break
        if action == UNMOUNT:
            lazy_unmount(mountpoint, fstype)
        elif isinstance(action, signal.Signals):
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, action)
            killed = killed or action == signal.SIGKILL
        wait_for(lambda: all(map(pid_gone, alive)), seconds)  # noqa: B023 (called at once)
    if settle:
        wait_for(lambda: not is_mounted(mountpoint, fstype), settle)
    return not lazy_unmount(mountpoint, fstype) and not killed


# -- one mount --------------------------------------------------------------------------------


class MountError(RuntimeError):
    """A mount that was to start did not (whatever came up of it is taken down)."""


class Mounted:
    """One `cowfs mount IMAGES... MOUNTPOINT [--target TARGET] OPTIONS` daemon.

    `start()` returns once the mount is usable -- the command returned 0 (it returns once
    the live files are served) and the daemon answers on its control socket, which
    tells its pid -- and otherwise takes down whatever came up and raises. `teardown()`
    (also a context manager's exit) ends the daemon for sure: `wind_down()` first while
    it serves, then `take_down` with `stop`. Without a known pid, the daemon is found by
    its command line."""

    def __init__(
        self,
        images: Path | Sequence[Path],
        mountpoint: Path,
        target: Path | None = None,
        options: Sequence[str] = (),
        *,
        cli: Cli = CURRENT,
        stop: Sequence[Step] = STOP_TEST,
        pid: int = 0,
        proc: subprocess.Popen | None = None,
    ) -> None:
        self.images = [images] if isinstance(images, os.PathLike) else list(images)
        self.mountpoint, self.target, self.options = mountpoint, target, list(options)
        self.cli, self.stop = cli, stop
        self.pid = pid
        self.proc = proc
        """The daemon itself when it runs in the foreground (or under a wrapper)."""
        self.down = False
        """Taken down: a second teardown does nothing (the pid may be another process's
        by then)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid {self.pid} on {self.mountpoint}>"

    @property
    def source(self) -> Path:
        return self.images[0]

    @property
    def live(self) -> Path:
        return self.mountpoint / self.source.name

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    # starting

    def argv(self) -> list[str]:
        args = ["mount", *map(str, self.images), str(self.mountpoint)]
        if self.target is not None:
            args += ["--target", str(self.target)]
        return args + self.options

    def start(self, timeout: float | None = None) -> Self:
        """`cowfs mount` as a user runs it, in the background."""
        self.down = False
        self.mountpoint.mkdir(exist_ok=True)
        try:
            done = self.cli.cowfs(*self.argv(), timeout=timeout)
            if done.returncode or "Traceback" in done.stderr:
                raise MountError(f"cowfs mount failed: {done.stderr.strip()}")
            try:
                self.pid = self.read_pid()
            except (CowfsError, KeyError, ValueError) as e:
                why = f"cowfs mount returned 0 but: {e}; log: {self.log_tail()}"
                raise MountError(why) from e
            if self.target is None and not self.is_mounted():  # nothing ends it by itself
                raise MountError(f"cowfs mount returned 0 but {self.mountpoint} is not mounted")
        except BaseException:
            self.teardown()
            raise
        return self

    def start_foreground(self) -> Self:
        """`cowfs mount ... --foreground`: the daemon is this process's child; usable once
        it is mounted and its job answers."""
        self.down = False
        self.mountpoint.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [*self.cli.argv, *self.argv(), "--foreground"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.cli.env,
        )
        self.pid = self.proc.pid
        try:
            wait_until(self.is_mounted, what="the foreground mount")
            wait_until(self.answers, what="the job to start")
        except BaseException:
            self.teardown()
            raise
        return self

    def read_pid(self) -> int:
        return int(self.poll()["pid"])

    # asking

    def status(self) -> dict[str, Any]:
        """`cowfs status --json`, as a user asks it."""
        return status(self.mountpoint)

    def poll(self) -> dict[str, Any]:
        """The same status, asked in-process: cheap enough to poll, and no process start
        in what the bench times."""
        return read_status(self.mountpoint)

    def answers(self) -> bool:
        try:
            self.poll()
        except CowfsError:
            return False
        return True

    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def job(self, job_id: int) -> dict[str, Any]:
        return next(j for j in self.poll()["jobs"] if j["id"] == job_id)

    def running_jobs(self) -> set[int]:
        return {j["id"] for j in self.poll()["jobs"] if j["state"] not in FINAL_STATES}

    def log_path(self) -> Path:
        """The daemon's log: beside the target, or for a mount without one in the run
        directory."""
        if self.target is None:
            return claim_file("mount", self.mountpoint, ".log")
        return Path(f"{self.target}.cowfs.log")

    def log_tail(self) -> str:
        try:
            return self.log_path().read_text(errors="replace")[-2000:]
        except OSError as e:
            return str(e)

    # ending

    def finish(self) -> subprocess.CompletedProcess[str]:
        """`cowfs finish MOUNTPOINT` as a user runs it."""
        return self.cli.cowfs("finish", self.mountpoint)

    def end(self, command: str, wait: float = TIMEOUT) -> int:
        """`cowfs finish|cancel|unmount MOUNTPOINT`, then, unless it was refused (exit 2),
        up to `wait` s for the daemon to exit; the command's exit code."""
        done = self.cli.cowfs(command, self.mountpoint)
        if done.returncode != 2:
            wait_for(lambda: pid_gone(self.pid), wait)
        return done.returncode

    def wait_exit(self, timeout: float = TIMEOUT) -> None:
        wait_until(lambda: pid_gone(self.pid), timeout, f"cowfs pid {self.pid} to exit")
        if self.proc is not None:
            self.proc.wait(timeout)

    def cancel_jobs(self) -> None:
        """Cancel every job still running (in-process; a daemon already ending may not
        answer, and need not)."""
        with contextlib.suppress(CowfsError):
            for job_id in sorted(self.running_jobs()):
                with contextlib.suppress(CowfsError):
                    send_command(self.mountpoint, "cancel", job=job_id)

    def wind_down(self) -> None:
        """What teardown asks first while the daemon lives: a mount without --target has
        its running jobs cancelled (a paced copier would copy on after the unmount and
        hold the daemon up); a job's mount is ended by the steps alone."""
        if self.target is None:
            self.cancel_jobs()

    def pids(self) -> list[int]:
        return [self.pid] if self.pid else serving_pids(self.mountpoint)

    def teardown(self) -> bool:
        """End the daemon and its mount whatever state they are in; True if nothing had
        to be forced. Safe to call again."""
        if self.down:
            return True
        try:
            if self.pid and not pid_gone(self.pid):
                self.wind_down()
        finally:
            clean = take_down(self.mountpoint, self.pids(), self.stop)
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.kill()  # our own child, by its pid
                self.proc.communicate(timeout=TIMEOUT)
        self.down = True
        return clean


# -- the mounts of one test -------------------------------------------------------------------


class CowfsRunner:
    """Starts daemons for one test and tears every one of them down. Each is registered
    before its command runs, so that teardown ends whatever came of it."""

    def __init__(self, workdir: Path, stop: Sequence[Step] = STOP_TEST) -> None:
        self.workdir = workdir
        self.stop = stop
        """How this test's mounts are taken down (a module may choose its own)."""
        self.started: list[Mounted] = []

    def add(self, m: Mounted) -> Mounted:
        self.started.append(m)
        return m

    def mount(
        self,
        source: Path,
        target: Path | None = None,
        *options: str,
        mountpoint: Path | None = None,
        foreground: bool = False,
    ) -> Mounted:
        """A job's mount: `cowfs mount SOURCE MP --target TARGET OPTIONS` (by default MP
        is workdir/mnt and TARGET workdir/target.img)."""
        mountpoint = mountpoint or self.workdir / "mnt"
        target = target or self.workdir / "target.img"
        m = self.add(Mounted(source, mountpoint, target, options, stop=self.stop))
        return m.start_foreground() if foreground else m.start()

    def serve(self, mountpoint: Path, *images: Path, options: Sequence[str] = ()) -> Mounted:
        """A mount without --target (`cowfs mount IMAGES... MP`): jobs start and end on it."""
        return self.add(Mounted(images, mountpoint, None, options, stop=self.stop)).start()

    def adopt(self, mountpoint: Path, source: Path, target: Path | None = None) -> Mounted | None:
        """Whatever daemon serves `mountpoint` now (a mount that should have been refused
        but came up: the bug the test is about to report) goes to teardown; None if
        there is none."""
        pids = serving_pids(mountpoint)
        if not pids and not is_mounted(mountpoint):
            return None
        pid = pids[0] if len(pids) == 1 else 0  # else found again at teardown
        return self.add(Mounted(source, mountpoint, target, stop=self.stop, pid=pid))

    def teardown(self) -> None:
        """Every daemon, in the order they started, then forgets them (so that calling
        it again, as the faulty and small_fs fixtures do first, is harmless)."""
        failure: BaseException | None = None
        while self.started:
            try:
                self.started.pop(0).teardown()
            except BaseException as e:  # the others still go down
                failure = failure or e
        if failure is not None:
            raise failure
