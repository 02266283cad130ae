"""Shared fixtures: images, real cowfs daemons, and teardown that never leaves a mount.

Every daemon a test starts is tracked; teardown finishes it if it can, then kills
it and lazily unmounts whatever is left, even when the test failed (how: the `cowfs`
runner of helpers/mounting.py, which the bench shares). The session fails if a
fuse.cowfs mount survives it.
"""

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# The shared helpers (tests/helpers) assert too: explain their failures as a test's.
pytest.register_assert_rewrite("helpers")

from helpers.mounting import (  # noqa: E402 (after the rewrite is registered)
    TIMEOUT,
    CowfsRunner,
    is_mounted,
    lazy_unmount,
    mountpoints,
    wait_until,
)
from helpers.radosgw_fixture import radosgw  # noqa: E402, F401 (one radosgw for the session)

if TYPE_CHECKING:
    from helpers.live_restore import LiveRestores


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


@pytest.fixture
def cowfs(tmp_path: Path) -> Iterator[CowfsRunner]:
    runner = CowfsRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.teardown()


@pytest.fixture
def restores(cowfs: CowfsRunner) -> Iterator["LiveRestores"]:
    """The test's live restores; torn down before the source mounts (`cowfs`)."""
    from helpers.live_restore import LiveRestores  # it imports this module

    started = LiveRestores()
    try:
        yield started
    finally:
        started.teardown()


@pytest.fixture(autouse=True, scope="session")
def no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Only mounts under this session's temporary directory count: other sessions
    (other test runs, benchmarks) may have mounts of their own at the same time."""
    base = str(tmp_path_factory.getbasetemp()) + os.sep
    yield
    left = {mp for mp in mountpoints() if mp.startswith(base)}
    for mp in left:
        lazy_unmount(Path(mp))
    assert not left, f"tests left cowfs mounts behind: {sorted(left)}"


# -- faults: the EIO layer and a small filesystem (issue 4) -------------------------------
#
# Teardown order matters: a cowfs daemon whose source lies on faultfs, or whose target
# lies on small_fs, must be gone before that filesystem goes. pytest tears fixtures down
# in reverse order of setup, so a fixture that merely depended on `cowfs` would be torn
# down *before* it. Both fixtures therefore depend on `cowfs` and stop its daemons
# themselves, first thing in their teardown (the runner forgets what it took down).

FAULTFS = Path(__file__).with_name("faultfs.py")
FAULTFS_FSTYPE = "fuse.faultfs"
EIO = 5


class FaultyFS:
    """A running faultfs (tests/faultfs.py) over `backing`, mounted on `mountpoint`."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.proc: subprocess.Popen | None = None
        self.log = mountpoint.with_name(mountpoint.name + ".log")

    def start(self) -> None:
        # Output to a file, not a pipe nobody reads: a full pipe would block faultfs.
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(FAULTFS), str(self.backing), str(self.mountpoint)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                why = self.log.read_text(errors="replace")
                raise RuntimeError(f"faultfs exited with {self.proc.returncode}: {why}")
            return self.is_mounted() and (self.mountpoint / ".faultfs").exists()

        wait_until(ready, 20, "the faultfs mount")

    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint, FAULTFS_FSTYPE)

    def path(self, name: str) -> Path:
        """The file `name` as seen through the fault mount (what cowfs should use)."""
        return self.mountpoint / name

    def backing_path(self, name: str) -> Path:
        """The file `name` itself, beside the faults (to create or check it directly)."""
        return self.backing / name

    def _command(self, command: dict) -> None:
        fd = os.open(self.mountpoint / ".faultfs", os.O_WRONLY)
        try:
            data = json.dumps(command).encode()
            assert os.write(fd, data) == len(data)
        finally:
            os.close(fd)

    def fail(
        self,
        name: str,
        op: str = "read",
        offset: int = 0,
        length: int = 1 << 62,
        times: int | None = None,
        errno: int = EIO,
        delay: float = 0.0,
    ) -> None:
        """Fail requests of `op` ("read", "write" or "fsync") on `name` that overlap
        [offset, offset+length): the first `times` of them, or all if None. A `delay`
        (seconds) slows each matching request first; errno 0 with a delay only slows."""
        fault = {"name": name, "op": op, "offset": offset, "length": length}
        fault |= {"times": times, "errno": errno, "delay": delay}
        self._command({"add": [fault]})

    def clear(self) -> None:
        """Remove every fault: from now on the files behave."""
        self._command({"clear": True})

    def state(self) -> dict:
        """faultfs's own view: faults with `hits`/`remaining`, request counts per
        operation, and the last failed requests (name, op, offset, size, errno)."""
        return json.loads((self.mountpoint / ".faultfs").read_bytes())

    def hits(self) -> int:
        """How many requests the faults have matched so far (a real condition to wait on)."""
        return sum(f["hits"] for f in self.state()["faults"])

    def unmount(self) -> int:
        """Unmount cleanly and return faultfs's exit code."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True)
        return self.proc.wait(TIMEOUT)

    def teardown(self) -> None:
        if self.is_mounted():
            with contextlib.suppress(OSError):
                self.clear()  # a delay fault must not hold up the unmount
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        lazy_unmount(self.mountpoint, FAULTFS_FSTYPE)


@pytest.fixture
def faulty(cowfs: CowfsRunner, tmp_path: Path) -> Iterator[FaultyFS]:
    """faultfs over a fresh, empty backing directory. Files created in `backing` (or
    through the mount) appear at `path(name)`. Torn down after the test's cowfs daemons."""
    backing, mountpoint = tmp_path / "faultfs-backing", tmp_path / "faultfs"
    backing.mkdir()
    mountpoint.mkdir()
    fs = FaultyFS(backing, mountpoint)
    try:
        fs.start()
        yield fs
    finally:
        try:
            cowfs.teardown()  # the daemons first
        finally:
            fs.teardown()


class SmallFS:
    """A tmpfs of a few MiB on `path`, with a filler file to take and give back space."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.filler = path / ".filler"

    def resize(self, size: int) -> None:
        """Grow or shrink the filesystem (tmpfs remount; shrinking below use fails)."""
        subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True
        )
        self.size = size

    def available(self) -> int:
        vfs = os.statvfs(self.path)
        return vfs.f_bavail * vfs.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take all free space but `leave` bytes (rounded to pages) with the filler."""
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 20, 4096):
                try:
                    while self.available() - chunk >= leave:
                        f.write(bytes(chunk))
                except OSError as e:
                    if e.errno != 28:  # ENOSPC
                        raise

    def free(self, nbytes: int | None = None) -> None:
        """Give back `nbytes` of the filler (all of it if None)."""
        if not self.filler.exists():
            return
        size = self.filler.stat().st_size
        os.truncate(self.filler, 0 if nbytes is None else max(0, size - nbytes))


SMALL_FS_SIZE = 8 << 20


@pytest.fixture
def small_fs(cowfs: CowfsRunner, tmp_path: Path) -> Iterator[SmallFS]:
    """An 8 MiB tmpfs for ENOSPC tests (`resize` to change it). Unmounted after the
    test's cowfs daemons, whatever happened."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_SIZE},mode=0755", "small-tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield SmallFS(path, SMALL_FS_SIZE)
    finally:
        try:
            cowfs.teardown()  # the daemons first
        finally:
            if subprocess.run(["umount", str(path)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(autouse=True, scope="session")
def no_leftover_fault_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No faultfs or small tmpfs of this session may outlive it."""
    base = str(tmp_path_factory.getbasetemp()) + os.sep
    yield
    left = {mp for mp in mountpoints(FAULTFS_FSTYPE) if mp.startswith(base)}
    for mp in left:
        lazy_unmount(Path(mp), FAULTFS_FSTYPE)
    tmpfs = {mp for mp in mountpoints("tmpfs") if mp.startswith(base)}
    for mp in tmpfs:
        subprocess.run(["umount", "-l", mp], check=False)
    assert not left | tmpfs, f"tests left fault mounts behind: {sorted(left | tmpfs)}"
