"""Views through real mounts: the CLI's answers about them, concurrent writers on a live
file that log what they are about to touch, and readers of a view (shuffled, buffered
and O_DIRECT) that compare it with a point-in-time copy.

The long-lived mounts these run on are the `cowfs` runner's (`serve`, helpers/mounting.py),
so the `small_fs` and `faulty` fixtures stop them before their filesystems go.
"""

import contextlib
import errno
import mmap
import os
import random
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from helpers.mounting import TIMEOUT, ok, status

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB
"""O_DIRECT alignment of offsets, lengths and buffers used here."""
MAX_WRITE = MiB
WAIT_S = 30.0
"""How long a writer or reader may take for progress the test waits on."""


# -- the CLI -------------------------------------------------------------------------------


def jobs_of(mountpoint: Path, job: int) -> dict[str, dict]:
    """`status --json`'s jobs of command `job`, by image name."""
    return {j["image"]: j for j in status(mountpoint)["jobs"] if j["id"] == job}


def backup_view(mountpoint: Path, *args: str | os.PathLike) -> tuple[int, list[Path]]:
    """`cowfs backup MP ... --view`: the job id (first line), then one view path per line."""
    result = ok("backup", mountpoint, *args, "--view")
    lines = result.stdout.splitlines()
    assert lines and lines[0].isdigit(), f"no job id alone on the first line: {result.stdout!r}"
    job = int(lines[0])
    paths = [Path(line) for line in lines[1:]]
    for path in paths:
        assert path.is_absolute(), result.stdout
        assert path.parent == mountpoint / ".views" / str(job), result.stdout
    return job, paths


def assert_refused(result: subprocess.CompletedProcess, what: str = "") -> str:
    """Exit 2 with one line `cowfs: error: ...` and nothing on stdout; returns the line."""
    assert result.returncode == 2, (what, result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: error: "), (what, result.stderr)
    assert result.stdout.strip() == "", (what, result.stdout)
    return lines[0]


# -- writers ---------------------------------------------------------------------------------


def clusters(extents: Iterable[tuple[int, int]], cluster_size: int) -> set[int]:
    """The clusters that byte ranges (offset, length) touch."""
    out: set[int] = set()
    for offset, length in extents:
        if length > 0:
            out.update(range(offset // cluster_size, (offset + length - 1) // cluster_size + 1))
    return out


class Writers:
    """Threads overwriting a live file with random data until stopped: one per entry of
    `kinds` ("direct": O_DIRECT, page-aligned, 4 KiB to 1 MiB; "buffered": any offset,
    1 B to 1 MiB), lengths log-uniform, so most writes are small and some are large,
    and they overlap each other. With `hot`, half the writes land near the offset it
    returns (where a reader is reading now). Each write's range is logged in `intended`
    before it is issued: a superset of what reached the file at any moment."""

    def __init__(
        self,
        live: Path,
        size: int,
        seed: int,
        kinds: Iterable[str] = ("direct", "buffered", "buffered"),
        hot: Callable[[], int | None] | None = None,
        pick: Callable[[random.Random], tuple[int, int] | None] | None = None,
        paced: bool = False,
    ) -> None:
        """`pick(rng)`: the next (offset, length) instead of random ones (None: stop).
        `paced`: each write waits for a grant (`grant`), so that a reader spreads the
        writes over its whole read instead of the writers racing through the image."""
        self.live = live
        self.size = size
        self.seed = seed
        self.hot = hot
        self.pick = pick
        self.cond = threading.Condition()
        self.done = 0
        self.intended: list[tuple[int, int]] = []
        self.errors: list[str] = []
        self.tokens = threading.Semaphore(0) if paced else None
        self.granted = 0
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i, kind), daemon=True)
            for i, kind in enumerate(kinds)
        ]

    def __enter__(self) -> "Writers":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self, rng: random.Random, direct: bool) -> tuple[int, int] | None:
        if self.pick is not None:
            return self.pick(rng)
        length = max(1, int(2 ** rng.uniform(0, 20)))
        hot = self.hot() if self.hot is not None and rng.random() < 0.5 else None
        if hot is None:
            offset = rng.randrange(self.size)
        else:
            offset = max(0, min(self.size - 1, hot + rng.randrange(-256 * KiB, 256 * KiB)))
        if direct:
            top = self.size // PAGE * PAGE
            length = max(PAGE, length // PAGE * PAGE)
            offset = min(offset // PAGE * PAGE, top - length)
        return offset, min(length, self.size - offset)

    def _run(self, index: int, kind: str) -> None:
        direct = kind == "direct"
        rng = random.Random(self.seed * 1000 + index)
        fd = os.open(self.live, os.O_WRONLY | (os.O_DIRECT if direct else 0))
        buf = mmap.mmap(-1, MAX_WRITE)  # page-aligned, as O_DIRECT wants
        try:
            while not self.stopping.is_set():
                if self.tokens is not None:
                    self.tokens.acquire()
                    if self.stopping.is_set():
                        return
                chosen = self._next(rng, direct)
                if chosen is None:
                    return
                offset, length = chosen
                data = rng.randbytes(length)
                with self.cond:
                    self.intended.append((offset, length))
                if direct:
                    buf[:length] = data
                    with memoryview(buf)[:length] as payload:
                        written = os.pwrite(fd, payload, offset)
                else:
                    written = os.pwrite(fd, data, offset)
                if written != length:
                    raise OSError(errno.EIO, f"short write: {written} of {length}")
                with self.cond:
                    self.done += 1
                    self.cond.notify_all()
        except OSError as e:
            with self.cond:
                self.errors.append(f"writer {index} ({kind}, seed {self.seed}): {e}")
                self.cond.notify_all()
        finally:
            os.close(fd)
            buf.close()

    def grant(self, writes: int) -> None:
        """Let paced writers do `writes` more writes (together)."""
        assert self.tokens is not None, "grants are for paced writers"
        with self.cond:
            self.granted += writes
        self.tokens.release(writes)

    def settle(self) -> None:
        """Until every granted write has returned."""
        with self.cond:
            ok = self.cond.wait_for(lambda: self.done >= self.granted or self.errors, WAIT_S)
            assert not self.errors, self.errors
            assert ok, f"{self.granted - self.done} granted writes not done in {WAIT_S} s"

    def wait_for(self, more: int) -> None:
        """Until `more` writes beyond now have returned (all writers together)."""
        with self.cond:
            goal = self.done + more
            ok = self.cond.wait_for(lambda: self.done >= goal or self.errors, WAIT_S)
            assert not self.errors, self.errors
            assert ok, f"the writers did not do {more} more writes in {WAIT_S} s"

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Until no write is in flight and `condition()` holds (checked after each write)."""
        with self.cond:

            def settled() -> bool:
                return bool(self.errors) or (len(self.intended) == self.done and condition())

            ok = self.cond.wait_for(settled, WAIT_S)
            assert not self.errors, self.errors
            assert ok, f"the writers did not get to {what} in {WAIT_S} s"

    def touched(self, cluster_size: int) -> set[int]:
        with self.cond:
            return clusters(list(self.intended), cluster_size)

    def stop(self) -> None:
        self.stopping.set()
        if self.tokens is not None:
            self.tokens.release(len(self.threads))  # wake writers waiting for a grant
        for thread in self.threads:
            if thread.ident is not None:
                thread.join(TIMEOUT)
        assert not any(t.is_alive() for t in self.threads), "a writer hangs"


# -- readers ---------------------------------------------------------------------------------


def read_direct(fd: int, offset: int, length: int) -> bytes:
    """An O_DIRECT read of [offset, offset+length) (offset page-aligned), short at EOF."""
    span = -(-length // PAGE) * PAGE
    with contextlib.closing(mmap.mmap(-1, span)) as buf:
        got = os.preadv(fd, [buf], offset)
        return bytes(buf[: min(got, length)])


def read_errno(
    where: Path | int, offset: int, length: int = PAGE, direct: bool = False
) -> int | None:
    """The errno a read of a view fails with, or None if it returned data. `where`: an
    open fd (O_DIRECT already if `direct`), or a path to open for this read."""
    fd = where
    try:
        if isinstance(where, Path):
            fd = os.open(where, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        assert isinstance(fd, int)
        try:
            if direct:
                read_direct(fd, offset, length)
            else:
                os.pread(fd, length, offset)
        finally:
            if isinstance(where, Path):
                os.close(fd)
    except OSError as e:
        return e.errno
    return None


def partition(size: int, rng: random.Random, smallest: int = PAGE, largest: int = 2 * MiB):
    """[0, size) cut into page-aligned pieces of random length, in random order."""
    pieces = []
    pos = 0
    while pos < size:
        length = max(smallest, int(2 ** rng.uniform(12, largest.bit_length() - 1)))
        length = min(length // PAGE * PAGE, size - pos)
        pieces.append((pos, length))
        pos += length
    rng.shuffle(pieces)
    return pieces


def read_view(
    view: Path,
    size: int,
    rng: random.Random,
    before: Callable[[int, int], None] | None = None,
    after: Callable[[int, int], None] | None = None,
) -> bytes:
    """The whole view, read in shuffled pieces, each buffered or O_DIRECT at random;
    `before`/`after` run around each piece (to aim writers at it, to wait for them)."""
    out = bytearray(size)
    fd = os.open(view, os.O_RDONLY)
    dfd = os.open(view, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset, length in partition(size, rng):
            if before is not None:
                before(offset, length)
            if rng.random() < 0.4:
                data = read_direct(dfd, offset, length)
            else:
                data = os.pread(fd, length, offset)
                while len(data) < length:
                    more = os.pread(fd, length - len(data), offset + len(data))
                    assert more, f"the view ended at {offset + len(data)}, not {size}"
                    data += more
            assert len(data) == length, (offset, length, len(data))
            out[offset : offset + length] = data
            if after is not None:
                after(offset, length)
        assert os.pread(fd, 1, size) == b"", "the view is longer than the image"
    finally:
        os.close(fd)
        os.close(dfd)
    return bytes(out)


def differences(got: bytes, want: bytes, unit: int = PAGE, most: int = 8) -> list[int]:
    """Offsets of the first `most` units of `unit` bytes where `got` and `want` differ."""
    assert len(got) == len(want), (len(got), len(want))
    bad = []
    for offset in range(0, len(want), unit):
        if got[offset : offset + unit] != want[offset : offset + unit]:
            bad.append(offset)
            if len(bad) >= most:
                break
    return bad


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512
