"""Live restores through real mounts: backup chains to restore from, `cowfs restore
--live` daemons that are always torn down, the image model that concurrent readers
and writers of the live file are checked against, and the checks of a finished DEST.

A chain is made the way a user makes one: `cowfs mount SRC MP`, `cowfs backup MP -t
full.qcow2 --format qcow2 --bitmap B --wait`, writes through the live file, then
incrementals (`--sync incremental --backing PREV`), then `cowfs unmount MP`. The test
keeps the image at each point in time in memory (the writes it made are all there is).
"""

import contextlib
import errno
import hashlib
import json
import mmap
import os
import random
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bitarray import bitarray

from cowfs.control import read_status
from cowfs.errors import CowfsError
from helpers.incremental import random_writes
from helpers.mounting import (
    COWFS,
    TIMEOUT,
    CowfsRunner,
    Mounted,
    daemon_pids,
    is_mounted,
    ok,
    pid_gone,
    run_cowfs,
    take_down,
    unmount_released,
    wait_until,
)
from helpers.mounts import info, record, write_live
from helpers.qemu import qemu_img
from helpers.sizes import KiB, MiB
from helpers.views import PAGE, read_direct

CLUSTER = 64 * KiB
"""The backups' cluster size (cowfs's default): the restore's unit."""
BITMAP = "nightly"
MAP_SUFFIX = ".cowfs-restore"
MAP_HEADER = struct.Struct("<8sIIQ32s")
"""The restored map beside DEST: magic, version, cluster size, image size, job id; then
one bit per cluster; then the SHA-256 of all that."""
WAIT_S = 30.0


# -- backups to restore from -------------------------------------------------------------------


@dataclass
class Chain:
    links: list[Path]
    """Full first, the top last."""
    images: list[bytes]
    """The image at each link's point in time."""

    @property
    def top(self) -> Path:
        return self.links[-1]

    @property
    def image(self) -> bytes:
        """The image at the top's point in time: what a restore of `top` gives."""
        return self.images[-1]


def make_chain(
    cowfs: CowfsRunner, source: Path, workdir: Path, links: int = 1, seed: int = 1
) -> Chain:
    """A full qcow2 backup of `source` and `links - 1` incrementals on top of it, with
    random writes through the live file before each incremental. No job runs while the
    test writes, so each backup's point in time is the image after the writes so far."""
    rng = random.Random(seed)
    image = bytearray(source.read_bytes())
    mountpoint = workdir / "src-mnt"
    m = cowfs.serve(mountpoint, source)  # torn down with the test's other daemons, whatever happens
    chain = Chain([], [])
    for n in range(links):
        target = workdir / ("full.qcow2" if n == 0 else f"inc{n}.qcow2")
        options = ["--bitmap", BITMAP]
        if n:
            size = len(image)
            for offset, data in random_writes(rng, size, size // CLUSTER // 20, most=30):
                write_live(m, data, offset)
                image[offset : offset + len(data)] = data
            options += ["--sync", "incremental", "--backing", str(chain.top)]
        done = ok("backup", mountpoint, "-t", target, "--format", "qcow2", *options, "--wait")
        assert "complete" in done.stdout, done.stdout
        chain.links.append(target)
        chain.images.append(bytes(image))
    ok("unmount", mountpoint)
    wait_until(lambda: pid_gone(m.pid), WAIT_S, "the source's daemon to exit")
    assert info(chain.top)[0] == 0, info(chain.top)
    return chain


def data_cluster(link: Path, lowest: int, image: bytes) -> tuple[int, int]:
    """(guest offset, host offset) of a cluster at or above `lowest` that the qcow2 `link`
    holds as data itself (from `qemu-img map`) and that is not all zeros in `image`."""
    result = qemu_img("map", "--output=json", link)
    assert result.returncode == 0, result.stderr
    for ext in json.loads(result.stdout):
        if not ext["data"] or ext["depth"] != 0 or "offset" not in ext:
            continue
        start = -(-max(ext["start"], lowest) // CLUSTER) * CLUSTER
        while start + CLUSTER <= ext["start"] + ext["length"]:
            if any(image[start : start + CLUSTER]):
                return start, ext["offset"] + start - ext["start"]
            start += CLUSTER
    raise AssertionError(f"{link} holds no data cluster above {lowest}")


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


# -- the live restore --------------------------------------------------------------------------


STOP_LIVE_RESTORE = ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0))
"""SIGTERM first: the daemon stops its copier and unmounts at once (DEST stays
resumable); `cowfs unmount` would wait for the whole copy."""


class LiveRestore(Mounted):
    """A `cowfs restore TARGET DEST --live MOUNTPOINT` daemon, serving DEST's name."""

    def __init__(self, target: Path, dest: Path, mountpoint: Path, pid: int, stdout: str) -> None:
        super().__init__(dest, mountpoint, target, stop=STOP_LIVE_RESTORE, pid=pid)
        self.dest = dest
        self.stdout = stdout
        self.commands: list[subprocess.Popen] = []
        """Commands started in the background, killed in teardown if still running."""

    def wait_state(self, *states: str, timeout: float = WAIT_S) -> dict:
        seen: list[dict] = []

        def reached() -> bool:
            seen.append(self.poll())
            return seen[-1]["state"] in states

        wait_until(reached, timeout, f"the restore to be {'/'.join(states)}")
        return seen[-1]

    def unmount(self) -> subprocess.CompletedProcess:
        """`cowfs unmount`, retried while the daemon has not yet seen the last RELEASE of
        the live file (the kernel sends it after close() returns). Then the daemon is
        gone and so is the mount."""
        result = unmount_released(
            self.mountpoint, lambda r: r.returncode == 2 and "is open" in r.stderr
        )
        assert "Traceback" not in result.stderr, result.stderr
        self.assert_gone()
        return result

    def start_unmount(self) -> subprocess.Popen:
        """`cowfs unmount` in the background, once it has been taken (retried while the
        daemon has not yet seen the last RELEASE): returns when the mount is gone, while
        the command waits for the daemon to finish the copy. The command is killed if
        the caller does not collect it."""
        deadline = time.monotonic() + 10
        while True:
            proc = subprocess.Popen(
                [*COWFS, "unmount", str(self.mountpoint)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.commands.append(proc)
            wait_until(
                lambda proc=proc: proc.poll() is not None or not self.is_mounted(),
                WAIT_S,
                "the unmount to be taken",
            )
            if self.is_mounted():
                out, err = proc.communicate()
                assert proc.returncode == 2 and "is open" in err, (proc.returncode, out, err)
                assert time.monotonic() < deadline, f"unmount refused for 10 s: {err}"
                continue
            return proc

    def kill9(self) -> None:
        """kill -9 the daemon; auto_unmount takes the mount away."""
        os.kill(self.pid, signal.SIGKILL)
        wait_until(lambda: pid_gone(self.pid), WAIT_S, "the killed daemon to die")
        try:
            wait_until(lambda: not self.is_mounted(), 5, "auto_unmount after kill -9")
        except TimeoutError:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        assert not self.is_mounted()

    def assert_gone(self) -> None:
        wait_until(lambda: pid_gone(self.pid), WAIT_S, f"the restore daemon {self.pid} to exit")
        assert not self.is_mounted(), f"{self.mountpoint} still mounted"
        assert self.mountpoint.is_dir() and not os.listdir(self.mountpoint)


class LiveRestores:
    """The live restores of one test; `teardown` ends every one, even after a failure
    (`STOP_LIVE_RESTORE`, then a lazy unmount of whatever is left), those whose pid no
    status told found by their command line."""

    def __init__(self) -> None:
        self.started: list[LiveRestore] = []
        self.mountpoints: set[Path] = set()

    def run(
        self,
        target: Path,
        dest: Path,
        mountpoint: Path,
        *options: str | os.PathLike,
        timeout: float = TIMEOUT,
    ) -> subprocess.CompletedProcess:
        """`cowfs restore TARGET DEST --live MOUNTPOINT OPTIONS`, whatever comes of it; a
        daemon it started is torn down with the test's (found by its command line if
        the command never said)."""
        self.mountpoints.add(mountpoint)
        result = run_cowfs("restore", target, dest, "--live", mountpoint, *options, timeout=timeout)
        if result.returncode == 0 or is_mounted(mountpoint):
            with contextlib.suppress(CowfsError):
                st = read_status(mountpoint)
                pid = int(st["pid"])
                if st.get("restore") and all(r.pid != pid for r in self.started):
                    self.started.append(LiveRestore(target, dest, mountpoint, pid, result.stdout))
        return result

    def start(
        self, target: Path, dest: Path, mountpoint: Path, *options: str | os.PathLike
    ) -> LiveRestore:
        """A live restore that must start: exit 0 and `live: MOUNTPOINT/<name> ...`."""
        mountpoint.mkdir(exist_ok=True)
        result = self.run(target, dest, mountpoint, *options)
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        live = mountpoint / dest.name
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"live: {live} "), result.stdout
        r = self.started[-1]
        assert r.dest == dest and r.mountpoint == mountpoint
        assert r.is_mounted() and live.is_file(), r
        return r

    def teardown(self) -> None:
        for proc in (p for r in self.started for p in r.commands):
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=TIMEOUT)
        left = []
        for mountpoint in self.mountpoints:
            pids = {r.pid for r in self.started if r.mountpoint == mountpoint}
            pids.update(daemon_pids(mountpoint, b"restore"))
            take_down(mountpoint, pids, STOP_LIVE_RESTORE)
            left += sorted(pid for pid in pids if not pid_gone(pid))
        assert not left, f"live restore daemons survived SIGKILL: {left}"


# -- DEST ---------------------------------------------------------------------------------------


def map_path(dest: Path) -> Path:
    return dest.with_name(dest.name + MAP_SUFFIX)


def read_map(dest: Path, size: int) -> bitarray:
    """The restored map beside DEST (checked: magic, sizes, checksum): one bit a cluster."""
    data = map_path(dest).read_bytes()
    body, check = data[:-32], data[-32:]
    assert hashlib.sha256(body).digest() == check, "damaged restored map"
    magic, _version, cluster, mapped_size, _job = MAP_HEADER.unpack_from(body)
    assert (magic, cluster, mapped_size) == (b"COWFSRST", CLUSTER, size), (magic, cluster, size)
    bits = bitarray()
    bits.frombytes(body[MAP_HEADER.size :])
    del bits[-(-size // CLUSTER) :]
    return bits


def cluster_bytes(bits: bitarray, size: int) -> int:
    """The bytes the clusters set in `bits` cover (the last one may be short)."""
    total = bits.count() * CLUSTER
    if bits and bits[-1]:
        total -= len(bits) * CLUSTER - size
    return total


def assert_restored(dest: Path, expected: bytes) -> None:
    """DEST alone is the image: its record says complete (`cowfs info` first line, exit 0),
    the map and temporary files are gone, and it equals `expected` byte for byte (and
    for `qemu-img compare`)."""
    code, first = info(dest)
    assert (code, first) == (0, "complete"), (code, first, record(dest))
    rec = record(dest)
    assert rec["status"] == "complete" and rec["sync"] == "restore", rec
    assert rec["bytes_done"] == rec["size"] == len(expected), rec
    assert not map_path(dest).exists(), "the restored map outlived the restore"
    leftovers = sorted(p.name for p in dest.parent.glob(f"{dest.name}*.tmp"))
    assert not leftovers, leftovers
    assert dest.stat().st_size == len(expected)
    got = dest.read_bytes()
    if got != expected:
        bad = first_differences(got, expected)
        raise AssertionError(f"{dest} differs from the expected image at {bad}")
    reference = dest.with_name(dest.name + ".expected")
    reference.write_bytes(expected)
    try:
        compared = qemu_img("compare", "-f", "raw", "-F", "raw", dest, reference)
        assert compared.returncode == 0, compared.stdout + compared.stderr
    finally:
        reference.unlink()


def first_differences(got: bytes, want: bytes, most: int = 5) -> list[tuple[int, str]]:
    """Where `got` differs from `want`, by 4 KiB block: offset and a short description."""
    bad = []
    for offset in range(0, max(len(got), len(want)), PAGE):
        a, b = got[offset : offset + PAGE], want[offset : offset + PAGE]
        if a != b:
            at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            bad.append((offset + at, f"got {a[at : at + 8].hex()} want {b[at : at + 8].hex()}"))
            if len(bad) >= most:
                break
    return bad


# -- the live file, read and written at once -------------------------------------------------


class ImageModel:
    """What the live file must read as: the image at the backup's point in time with
    every write that has returned applied. Readers and writers hold their range for the
    whole request (`hold`): a request never runs beside one that overlaps it, so each
    read has exactly one right answer, while requests on other ranges (and the
    restore's copier) run at once."""

    def __init__(self, image: bytes) -> None:
        self.pit = image
        self.data = bytearray(image)
        self.size = len(image)
        self._cond = threading.Condition()
        self._busy: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def hold(self, offset: int, length: int) -> Iterator[None]:
        end = offset + max(1, length)

        def free() -> bool:
            return all(e <= offset or end <= s for s, e in self._busy)

        with self._cond:
            assert self._cond.wait_for(free, WAIT_S), "a request held its range too long"
            self._busy.append((offset, end))
        try:
            yield
        finally:
            with self._cond:
                self._busy.remove((offset, end))
                self._cond.notify_all()

    def apply(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def expected(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : min(offset + length, self.size)])


SPOT = 256 * KiB
"""A region of a working set (`spots`)."""


def pick(
    rng: random.Random,
    size: int,
    reading: bool,
    hot: int | None = None,
    spots: list[int] | None = None,
) -> tuple[str, int, int]:
    """(kind, offset, length) of a random request: tiny and unaligned ones, ones that
    straddle a cluster boundary, whole clusters, O_DIRECT-aligned pages, large unaligned
    ones and (reads only) ones past the end of the image. Some near `hot` (where the
    copier is), most in the working set `spots` (SPOT bytes from each offset in it, as
    a guest reads and writes its hot data again and again) if there is one."""
    kinds = ["tiny", "unaligned", "straddle", "whole", "direct", "large"]
    kind = rng.choice([*kinds, "eof"] if reading else kinds)
    where = rng.random()
    if hot is not None and where < 0.2:
        base = max(0, min(size - 1, hot + rng.randrange(-MiB, MiB)))
    elif spots and where < 0.95:
        base = min(size - 1, rng.choice(spots) + rng.randrange(SPOT))
    else:
        base = rng.randrange(size)
    clusters = -(-size // CLUSTER)
    match kind:
        case "tiny":
            offset, length = base, rng.randint(1, 64)
        case "unaligned":
            offset, length = base, int(2 ** rng.uniform(0, 17))
        case "straddle":
            boundary = max(1, min(clusters - 1, base // CLUSTER + 1)) * CLUSTER
            offset = boundary - rng.randint(1, CLUSTER)
            length = boundary - offset + rng.randint(1, CLUSTER)
        case "whole":
            offset = min(base // CLUSTER, size // CLUSTER - 4) * CLUSTER
            length = rng.randint(1, 4) * CLUSTER
        case "direct":
            offset = min(base // PAGE, size // PAGE - 64) * PAGE
            length = rng.randint(1, 64) * PAGE
        case "large":
            offset, length = base, rng.randint(128 * KiB, 512 * KiB)
        case _:  # "eof"
            offset = size - rng.randint(1, 2 * CLUSTER)
            length = rng.randint(1, 4 * CLUSTER)
    if kind != "eof":
        length = max(1, min(length, size - offset))
    return kind, offset, length


@dataclass
class Workload:
    """Reader and writer threads on the live file, all at once and from the first moment.

    Readers check every read against the model (buffered reads of any size and
    alignment, O_DIRECT reads of pages, reads past the end); writers write random data
    or zeros (buffered of any size and alignment, O_DIRECT pages, whole clusters) and
    apply each write to the model once it returned. `hot` (set by the test, e.g. from
    the copier's progress) draws some requests near an offset; most go to a working
    set of `spots` random regions (so that they are many before copy on read has
    restored the whole image)."""

    live: Path
    model: ImageModel
    seed: int
    readers: int = 2
    writers: int = 1
    hot: int | None = None
    spots: int = 32
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> "Workload":
        rng = random.Random(self.seed)
        self._spots = [rng.randrange(self.model.size - SPOT) for _ in range(self.spots)]
        for i in range(self.readers):
            self.threads.append(threading.Thread(target=self._guard, args=(self._read, i)))
        for i in range(self.writers):
            self.threads.append(threading.Thread(target=self._guard, args=(self._write, i)))
        for t in self.threads:
            t.daemon = True
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in self.threads), "a reader or writer hangs"

    def check(self) -> None:
        assert not self.errors, self.errors

    def wait_for(self, condition, what: str) -> None:
        """Until `condition()` holds; fails at once on a reader's or writer's error."""

        def reached() -> bool:
            self.check()
            return condition()

        wait_until(reached, WAIT_S, what)

    def _guard(self, run, index: int) -> None:
        try:
            run(index)
        except Exception as e:  # an OSError from the live file, or a wrong read
            with self.lock:
                self.errors.append(f"{run.__name__} {index} (seed {self.seed}): {e!r}")
            self.stopping.set()

    def _count(self, kind: str, reading: bool, length: int) -> None:
        with self.lock:
            key = ("read " if reading else "write ") + kind
            self.kinds[key] = self.kinds.get(key, 0) + 1
            if reading:
                self.reads += 1
                self.read_bytes += length
            else:
                self.writes += 1

    def _read(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        fd = os.open(self.live, os.O_RDONLY)
        dfd = os.open(self.live, os.O_RDONLY | os.O_DIRECT)
        try:
            while not self.stopping.is_set():
                kind, offset, length = pick(rng, self.model.size, True, self.hot, self._spots)
                with self.model.hold(offset, length):
                    if kind == "direct":
                        got = read_direct(dfd, offset, length)
                    else:
                        got = pread_all(fd, offset, length)
                    want = self.model.expected(offset, length)
                if got != want:
                    raise AssertionError(self._describe(kind, offset, length, got, want))
                self._count(kind, True, len(got))
        finally:
            os.close(fd)
            os.close(dfd)

    def _describe(self, kind: str, offset: int, length: int, got: bytes, want: bytes) -> str:
        if len(got) != len(want):
            return f"{kind} read of {length} at {offset}: {len(got)} bytes, not {len(want)}"
        at = next(i for i in range(len(got)) if got[i] != want[i])
        where = offset + at
        pit = self.model.pit[where : where + 16]
        what = "the backup's bytes" if got[at : at + 16] == pit else "other bytes"
        if not any(got[at : at + 16]):
            what = "zeros"
        return (
            f"{kind} read of {length} at {offset}: wrong from {where} "
            f"(cluster {where // CLUSTER}): {what} {got[at : at + 16].hex()}, "
            f"not {want[at : at + 16].hex()}"
        )

    def _write(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + 50 + index)
        fd = os.open(self.live, os.O_WRONLY)
        dfd = os.open(self.live, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
        try:
            while not self.stopping.is_set():
                kind, offset, length = pick(rng, self.model.size, False, self.hot, self._spots)
                zeros = kind == "whole" and rng.random() < 0.3
                data = bytes(length) if zeros else rng.randbytes(length)
                with self.model.hold(offset, length):
                    if kind == "direct":
                        buf[:length] = data
                        with memoryview(buf)[:length] as payload:
                            written = os.pwrite(dfd, payload, offset)
                    else:
                        written = os.pwrite(fd, data, offset)
                    if written != length:
                        raise OSError(errno.EIO, f"short write: {written} of {length}")
                    self.model.apply(offset, data)
                self._count(kind + (" zeros" if zeros else ""), False, length)
                if rng.random() < 0.05:
                    os.fsync(fd)
        finally:
            os.close(fd)
            os.close(dfd)
            buf.close()


def pread_all(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, fewer only at the end of the file."""
    data = os.pread(fd, length, offset)
    while 0 < len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data
