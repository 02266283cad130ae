"""Shared fixtures: images, real cowfs daemons, and teardown that never leaves a mount.

Every daemon a test starts is tracked; teardown finishes it if it can, then kills
it and lazily unmounts whatever is left, even when the test failed. The session
fails if a fuse.cowfs mount survives it.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

COWFS = [sys.executable, "-m", "cowfs"]
TIMEOUT = 60.0


def cowfs_mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f if line.split()[2] == "fuse.cowfs"}


def run_cowfs(*args: str | os.PathLike, check: bool = False, timeout: float = TIMEOUT):
    """Run the CLI as a user would; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [*COWFS, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=check
    )


def wait_until(condition, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll a real condition (not a sleep as synchronisation) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def make_image(path: Path, size: int, seed: int, holes: bool = True) -> Path:
    """A source image with random data, explicit zero runs and (optionally) holes,
    so that zero-skipping, SEEK_HOLE and the last partial cluster all get exercised."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            length = min(size - pos, rng.choice([4096, 65536, 100_000, 1 << 20]))
            kind = rng.random()
            if kind < 0.6:
                f.seek(pos)
                f.write(rng.randbytes(length))
            elif kind < 0.75 or not holes:
                f.seek(pos)
                f.write(bytes(length))
            pos += length
    return path


def files_equal(a: Path, b: Path, limit: int | None = None) -> bool:
    """Byte comparison of the first `limit` bytes (all if None), in 1 MiB chunks."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        done = 0
        while limit is None or done < limit:
            n = 1 << 20 if limit is None else min(1 << 20, limit - done)
            ca, cb = fa.read(n), fb.read(n)
            if ca != cb:
                return False
            if not ca:
                return True
            done += len(ca)
    return True


@dataclass
class Mounted:
    """A running cowfs daemon and its mount."""

    source: Path
    mountpoint: Path
    target: Path
    pid: int
    proc: subprocess.Popen | None = None  # set for foreground daemons
    finished: bool = field(default=False)

    @property
    def live(self) -> Path:
        return self.mountpoint / self.source.name

    def status(self) -> dict:
        return json.loads(run_cowfs("status", self.mountpoint, "--json", check=True).stdout)

    def finish(self) -> subprocess.CompletedProcess:
        result = run_cowfs("finish", self.mountpoint)
        if result.returncode != 2:
            self.finished = True
        return result

    def wait_exit(self, timeout: float = TIMEOUT) -> None:
        wait_until(lambda: pid_gone(self.pid), timeout, f"cowfs pid {self.pid} to exit")
        if self.proc is not None:
            self.proc.wait(timeout)

    def is_mounted(self) -> bool:
        return str(self.mountpoint) in cowfs_mounts()


class CowfsRunner:
    """Starts daemons for one test and tears every one of them down."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Mounted] = []

    def mount(
        self,
        source: Path,
        target: Path | None = None,
        *options: str,
        mountpoint: Path | None = None,
        foreground: bool = False,
    ) -> Mounted:
        mountpoint = mountpoint or self.workdir / "mnt"
        mountpoint.mkdir(exist_ok=True)
        target = target or self.workdir / "target.img"
        args = [*COWFS, "mount", str(source), str(mountpoint), "--target", str(target), *options]
        if foreground:
            proc = subprocess.Popen(
                [*args, "--foreground"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            mounted = Mounted(source, mountpoint, target, proc.pid, proc)
            self.started.append(mounted)
            wait_until(mounted.is_mounted, what="the foreground mount")
            wait_until(lambda: _status_readable(mountpoint), what="the job to start")
            return mounted
        result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, f"mount failed: {result.stderr}"
        pid = json.loads(run_cowfs("status", mountpoint, "--json", check=True).stdout)["pid"]
        mounted = Mounted(source, mountpoint, target, pid)
        self.started.append(mounted)
        return mounted

    def teardown(self) -> None:
        for m in self.started:
            if m.is_mounted() and not pid_gone(m.pid):
                subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)], check=False)
            if not pid_gone(m.pid):
                try:
                    wait_until(lambda m=m: pid_gone(m.pid), 20, "daemon exit after unmount")
                except TimeoutError:
                    os.kill(m.pid, signal.SIGKILL)
            if m.proc is not None:
                m.proc.kill()
                m.proc.communicate(timeout=TIMEOUT)
            if m.is_mounted():
                subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)], check=False)


def _status_readable(mountpoint: Path) -> bool:
    return run_cowfs("status", mountpoint, "--json").returncode == 0


@pytest.fixture
def cowfs(tmp_path: Path) -> Iterator[CowfsRunner]:
    runner = CowfsRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.teardown()


@pytest.fixture(autouse=True, scope="session")
def no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Only mounts under this session's temporary directory count: other sessions
    (other test runs, benchmarks) may have mounts of their own at the same time."""
    base = str(tmp_path_factory.getbasetemp()) + os.sep
    yield
    left = {mp for mp in cowfs_mounts() if mp.startswith(base)}
    for mp in left:
        subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
    assert not left, f"tests left cowfs mounts behind: {sorted(left)}"
