"""Crash-safe change tracking (issue 9): dirty bitmaps through kill -9, real mounts.

Why: a mount keeps its bitmaps in memory and saves them now and then; what keeps them
honest through a crash is the write-intent record beside the source, made durable
before a write reaches a region it does not cover (DESIGN.md, "Crash-safe change
tracking"). After kill -9 each bitmap is its last save plus the intent's regions, and
the next incremental must be *correct*, not refused. That promise fails silently: a
recovered bitmap that misses one write looks consistent, the incremental completes,
and the chain restores wrong data. Nothing short of killing real daemons at random
moments under real writers, then restoring every link with QEMU's tools and comparing
it with a copy of the source at that link's point in time, can show it holds. So:

- many seeded rounds of writers (buffered and O_DIRECT) through a long-lived mount with
  small intent regions and a short save period (saves and clears really happen), each
  ended by kill -9 at a random moment (while writing, just after a save cleared the
  intent, while an incremental copies, after one completed, inside the backup command);
  after each, the recovered bitmap must be consistent and hold every cluster written
  since its anchor, and the incremental after the remount must restore exactly;
- kill -9 while saving the bitmaps or writing the intent record, made slow by faultfs;
- an intent record that cannot be written (a full filesystem, EIO): guest writes still
  succeed, every bitmap is inconsistent and the incremental refused, also after kill -9;
- what recovery must not trust: the source written after the death, replaced or grown,
  a damaged intent record, a damaged bitmap file;
- the moments in between, made to last by faultfs: a job's end (bitmap anchored, record
  not yet complete), a save that ends while a write's intent is still being written, a
  write in flight when the daemon dies.

faultfs serves the intent record through the page cache here (MAPPABLE_FAULTFS says why).

The rule under all of it: after a crash, never a consistent bitmap that misses a write.
"""

import contextlib
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FAULTFS, FaultyFS, SmallFS, make_image
from helpers.incremental import (
    BITMAP,
    CLUSTER,
    assert_restores,
    bitmaps,
    bitmaps_file,
    changed_clusters,
    snapshot,
)
from helpers.mounting import (
    COWFS,
    TIMEOUT,
    CowfsRunner,
    Mounted,
    pid_gone,
    run_cowfs,
    unmount_released,
    wait_until,
)
from helpers.mounts import assert_one_error_line, record, write_live
from helpers.sizes import KiB, MiB

from cowfs.bitmap import BitmapStore

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

REGION = 1 * MiB
"""Intent region of these mounts: an image of a few MiB has several, so the intent is
a real superset of the writes, not the whole image."""
TRACKING = ("--intent-region", "1M", "--save-period", "0.2")
"""Saves (and the clears after them) every tick of the tracker while writes come."""
PAGE = 4096
"""The intent file's alive page; its two slots follow."""
MAX_WRITE = 128 * KiB


def intent_file(source: Path) -> Path:
    return source.with_name(f".{source.name}.cowfs-intent")


# -- a long-lived mount, its jobs, and its death -------------------------------------------


def serve(cowfs: CowfsRunner, source: Path, *options: str) -> Mounted:
    """`cowfs mount SOURCE MP` with no job (the VM's mount); torn down by the fixture."""
    return cowfs.serve(cowfs.workdir / "mnt", source, options=(*TRACKING, *options))


def tracking(m: Mounted) -> dict:
    """`status --json`'s tracking figures of the mount's one image."""
    return m.status()["images"][0]["tracking"]


def tracking_failure(m: Mounted) -> str:
    """Why change tracking failed (a save retries it now and then: for that moment the
    mount may say it works)."""
    seen: list[str | None] = []

    def failed() -> bool:
        seen.append(tracking(m)["failed"])
        return seen[-1] is not None

    wait_until(failed, 10, "change tracking to say it failed")
    return str(seen[-1])


def job(m: Mounted, target: Path, *options: str, wait: bool = False) -> int:
    """`cowfs backup MP --target TARGET OPTIONS` that must start (with `wait`: complete);
    returns the job's id."""
    args = ["backup", m.mountpoint, "--target", target, *options] + (["--wait"] if wait else [])
    result = run_cowfs(*args)
    assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
    return int(result.stdout.split()[0])


def job_state(m: Mounted, job_id: int) -> str:
    return next(j["state"] for j in m.status()["jobs"] if j["id"] == job_id)


def incremental(backing: Path) -> list[str]:
    return ["--sync", "incremental", "--bitmap", BITMAP, "--backing", str(backing)]


def assert_incremental_refused(m: Mounted, target: Path, backing: Path) -> str:
    """The incremental is refused with one line that says why and gives the fix."""
    result = run_cowfs("backup", m.mountpoint, "--target", target, *incremental(backing))
    assert_one_error_line(result)
    message = result.stderr.strip()
    assert "inconsistent" in message and f"--sync full --bitmap {BITMAP}" in message, message
    assert not target.exists()
    return message


def kill9(m: Mounted) -> None:
    """kill -9 the daemon; wait until it is dead (a zombie will do: init reaps it in its
    own time) and its mount is gone."""
    os.kill(m.pid, signal.SIGKILL)
    wait_until(lambda: pid_gone(m.pid), 30, "the killed daemon to die")
    try:
        wait_until(lambda: not m.is_mounted(), 5, "auto_unmount after kill -9")
    except TimeoutError:
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], capture_output=True)
    assert not m.is_mounted()


def unmount(m: Mounted) -> None:
    """`cowfs unmount`, retried while the kernel still delivers the last RELEASE."""
    result = unmount_released(m.mountpoint)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: pid_gone(m.pid), TIMEOUT, "the daemon to exit")


# -- what the bitmaps hold -------------------------------------------------------------------


def clusters(writes: list[tuple[int, int]]) -> set[int]:
    """The clusters that writes of (offset, length) touch."""
    touched: set[int] = set()
    for offset, length in writes:
        if length:
            touched.update(range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1))
    return touched


def dirty_clusters(source: Path) -> set[int]:
    """The clusters of BITMAP as the next mount will load them (recovered, if a mount
    died), read without changing anything."""
    bits = BitmapStore.load(source, holding_lock=False).bitmaps[BITMAP].bits
    return set(bits.search(1))


def anchored_to(source: Path) -> Path:
    """The backup BITMAP counts writes since (as the next mount will load it), which must
    be a link whose record says complete: the only backing an incremental may name."""
    anchor = BitmapStore.load(source, holding_lock=False).bitmaps[BITMAP].anchor
    assert anchor is not None, "BITMAP anchors no backup"
    target = Path(anchor["target"])
    status = record(target)["status"]
    assert status == "complete", f"BITMAP is anchored to {target}, whose record says {status}"
    return target


def assert_nothing_missed(source: Path, written: set[int], anchor_pit: Path, where: str) -> dict:
    """BITMAP says consistent and holds every cluster written since its anchor: those of
    the writes that returned, and any in which the source differs from the anchor's
    point in time (writes in flight at the kill may have landed). Returns its listing."""
    listed = bitmaps(source)[BITMAP]
    assert listed["consistent"] is True, (where, listed)
    dirty = dirty_clusters(source)
    missed = (written | changed_clusters(source, anchor_pit)) - dirty
    assert not missed, f"{where}: the bitmap misses clusters {sorted(missed)} ({listed})"
    return listed


def assert_recovered(source: Path, listed: dict, pid: int, where: str) -> None:
    """BITMAP's listing says it was recovered after the crash of `pid`, and so does
    `bitmap list` in words."""
    assert listed["recovered"] is not None, (where, listed)
    assert listed["recovered"]["pid"] == pid and listed["recovered"]["grew_bytes"] >= 0, listed
    text = run_cowfs("bitmap", "list", source).stdout
    assert f"recovered after a crash of pid {pid}, grew by" in text, (where, text)


# -- writers through the live file -----------------------------------------------------------


class Writers:
    """Threads writing random data through the live file until stopped, or until the mount
    dies under them: one with O_DIRECT (aligned sizes), the others buffered (any size and
    alignment). Most writes go to a few hot regions, some anywhere. Every write that
    returned is logged; errors are kept with the time they came."""

    def __init__(self, live: Path, size: int, seed: int, hot: list[int], threads: int = 3):
        self.live = live
        self.size = size
        self.seed = seed
        self.hot = hot
        self.done: list[tuple[int, int]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def start(self) -> "Writers":
        for t in self._threads:
            t.start()
        return self

    @property
    def count(self) -> int:
        return len(self.done)

    def wait_for(self, writes: int) -> None:
        """Until `writes` writes returned (or a writer failed)."""
        wait_until(lambda: self.count >= writes or bool(self.errors), 30, f"{writes} writes")

    def stop(self) -> list[tuple[int, int]]:
        """Stop them (if they ever started); the writes that returned."""
        self._stop.set()
        for t in self._threads:
            if t.ident is not None:
                t.join(TIMEOUT)
                assert not t.is_alive(), "a writer hangs"
        return list(self.done)

    def errors_before(self, when: float) -> list[str]:
        return [text for at, text in self.errors if at < when]

    def _pick(self, rng: random.Random, direct: bool) -> tuple[int, int]:
        if rng.random() < 0.85:
            start = rng.choice(self.hot) * REGION
            offset = start + rng.randrange(REGION)
        else:
            offset = rng.randrange(self.size)
        if direct:
            offset -= offset % PAGE
            length = rng.randrange(1, MAX_WRITE // PAGE + 1) * PAGE
        else:
            length = int(2 ** rng.uniform(0, 17))
        return offset, max(1, min(length, self.size - offset))

    def _run(self, index: int) -> None:
        rng = random.Random(f"{self.seed}/{index}")
        direct = index == 0
        try:
            fd = os.open(self.live, os.O_RDWR | (os.O_DIRECT if direct else 0))
        except OSError as e:
            self.errors.append((time.monotonic(), f"open: {e}"))
            return
        buf = mmap.mmap(-1, MAX_WRITE)  # page-aligned, as O_DIRECT needs
        try:
            while not self._stop.is_set():
                offset, length = self._pick(rng, direct)
                data = rng.randbytes(length)
                try:
                    if direct:
                        buf[:length] = data
                        with memoryview(buf) as view:
                            n = os.pwrite(fd, view[:length], offset)
                    else:
                        n = os.pwrite(fd, data, offset)
                except OSError as e:
                    self.errors.append((time.monotonic(), f"pwrite at {offset}: {e}"))
                    return
                if n != length:
                    self.errors.append((time.monotonic(), f"short write at {offset}: {n}"))
                    return
                with self._lock:
                    self.done.append((offset, length))
        finally:
            buf.close()
            with contextlib.suppress(OSError):  # the mount died under it
                os.close(fd)


# -- a. many rounds of kill -9 under writers -------------------------------------------------


@dataclass
class Link:
    """A backup of the chain and the copy of the source at its point in time."""

    target: Path
    pit: Path


@dataclass
class Chain:
    """The chain so far, and what BITMAP must hold: every cluster written since the point
    in time of the last link that anchored it."""

    links: list[Link]
    written: set[int] = field(default_factory=set)

    @property
    def anchor(self) -> Link:
        return self.links[-1]

    def anchored(self, link: Link) -> None:
        self.links.append(link)
        self.written = set()


ROUND_SIZE = 16 * MiB
ROUNDS = 10
KINDS = (
    "while writing",
    "after a save cleared the intent",
    "while an incremental copies",
    "after an incremental completed",
    "inside the backup command",
)


def crash_round(
    cowfs: CowfsRunner, m: Mounted, chain: Chain, rng: random.Random, r: int, kind: str
) -> None:
    """One round on the live mount `m`: writers, maybe an incremental, kill -9 as `kind`
    says. Afterwards `chain` knows what BITMAP must hold."""
    source, tmp = m.source, cowfs.workdir
    hot = rng.sample(range(ROUND_SIZE // REGION), 3)
    writers = Writers(m.live, ROUND_SIZE, rng.randrange(1 << 30), hot)
    candidate: Link | None = None
    if kind in ("while an incremental copies", "after an incremental completed"):
        candidate = Link(tmp / f"inc{r}a.qcow2", snapshot(source, tmp / f"inc{r}a.pit"))
        speed = "256K" if kind == "while an incremental copies" else "0"
        job_id = job(m, candidate.target, *incremental(chain.anchor.target), "--speed", speed)
        writers.start()  # after `backup` returned: every write is after its point in time
        if kind == "after an incremental completed":
            wait_until(lambda: job_state(m, job_id) == "complete", 30, "the job to complete")
        writers.wait_for(rng.randrange(1, 400))
    elif kind == "inside the backup command":
        writers.start()  # something to copy, or nothing: then the job ends at once
        writers.wait_for(rng.randrange(0, 200))
        written = writers.stop()
        chain.written |= clusters(written)
        writers = Writers(m.live, ROUND_SIZE, 0, hot)  # none after the point in time
        candidate = Link(tmp / f"inc{r}a.qcow2", snapshot(source, tmp / f"inc{r}a.pit"))
        args = [*incremental(chain.anchor.target), "--wait"]
        command = ["backup", str(m.mountpoint), "--target", str(candidate.target), *args]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cowfs", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            rec = candidate.target.with_name(candidate.target.name + ".cowfs.json")
            wait_until(lambda: rec.exists() or proc.poll() is not None, 30, "the job's record")
        except BaseException:
            proc.kill()
            raise
    else:
        writers.start()
        writers.wait_for(rng.randrange(1, 600))
        if kind == "after a save cleared the intent":
            writers.stop()
            # Only a save can clear the regions of the writes made before its snapshot.
            wait_until(lambda: tracking(m)["intent_regions"] == 0, 10, "a save that clears")
            writers = Writers(m.live, ROUND_SIZE, rng.randrange(1 << 30), hot).start()
            writers.wait_for(rng.randrange(0, 20))
    killed = time.monotonic()
    kill9(m)
    written = writers.stop()
    if kind == "inside the backup command":
        proc.wait(TIMEOUT)
    early = writers.errors_before(killed)
    assert not early, f"writers failed before the kill: {early}"
    anchor = anchored_to(source)
    if candidate is not None and record(candidate.target)["status"] == "complete":
        assert_restores(candidate.target, candidate.pit)  # whether it anchors BITMAP or not
    if candidate is not None and anchor == candidate.target:
        chain.anchored(candidate)
    assert anchor == chain.anchor.target, (anchor, chain.anchor.target)
    chain.written |= clusters(written)


@pytest.mark.parametrize("seed", [901, 902])
def test_kill9_rounds_lose_no_write(cowfs: CowfsRunner, tmp_path: Path, seed: int) -> None:
    """A full anchors the chain; then rounds of writers, kill -9 at a random moment,
    remount, and an incremental into the chain: every recovered bitmap is consistent and
    holds every cluster written since its anchor, and every link restores exactly its
    point in time (zero refusals, zero differences)."""
    rng = random.Random(seed)
    source = make_image(tmp_path / "disk.img", ROUND_SIZE, seed=seed)
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    chain = Chain([full])
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(ROUNDS - len(KINDS))]
    rng.shuffle(kinds)
    grew = 0
    for r, kind in enumerate(kinds):
        where = f"seed {seed}, round {r} ({kind})"
        try:
            crash_round(cowfs, m, chain, rng, r, kind)
            listed = assert_nothing_missed(source, chain.written, chain.anchor.pit, kind)
            assert_recovered(source, listed, m.pid, kind)
            grew += listed["recovered"]["grew_bytes"]
            m = serve(cowfs, source)
            link = Link(tmp_path / f"inc{r}.qcow2", snapshot(source, tmp_path / f"inc{r}.pit"))
            job(m, link.target, *incremental(chain.anchor.target), wait=True)
            assert_restores(link.target, link.pit)
            chain.anchored(link)
        except (AssertionError, TimeoutError) as e:
            raise AssertionError(f"{where}: {e}") from e
    assert grew > 0, f"seed {seed}: no recovery ever needed the intent"
    unmount(m)
    for link in chain.links:  # later links left the earlier ones alone
        assert_restores(link.target, link.pit)


# -- b. kill -9 inside a slow save or intent write -----------------------------------------------

MAPPABLE_FAULTFS = '''\
"""tests/faultfs.py with what the crash tests need: cowfs maps the first page of its
intent record (MAP_SHARED), which FUSE refuses for a direct_io file (ENODEV) with this
libfuse, so the intent files are served through the page cache (writes still go through
to faultfs at once: the mount has no writeback cache); and inode numbers that are never
reused (faultfs numbers them by its count of names, which repeats after renames)."""

import itertools
import sys

sys.path.insert(0, sys.argv.pop(1))
import faultfs  # noqa: E402

MAPPED = (".cowfs-intent", ".cowfs-intent.tmp")


class MappableFaultFS(faultfs.FaultFS):
    def __init__(self, backing):
        super().__init__(backing)
        self._numbers = itertools.count(faultfs.CONTROL + 1)

    def _inode(self, name):
        if name not in self.inodes:
            inode = next(self._numbers)
            self.inodes[name] = inode
            self.names[inode] = name
        return self.inodes[name]

    def _through_cache(self, info, inode):
        if self.names.get(inode, "").endswith(MAPPED):
            info.direct_io = False
        return info

    async def open(self, inode, flags, ctx):
        return self._through_cache(await super().open(inode, flags, ctx), inode)

    async def create(self, parent_inode, name, mode, flags, ctx):
        info, attrs = await super().create(parent_inode, name, mode, flags, ctx)
        return self._through_cache(info, attrs.st_ino), attrs


faultfs.FaultFS = MappableFaultFS
sys.exit(faultfs.main(sys.argv[1:]))
'''


class MappableFaultyFS(FaultyFS):
    """faultfs that can hold an intent record (MAPPABLE_FAULTFS says why)."""

    def start(self) -> None:
        script = self.mountpoint.with_name("faultfs_mappable.py")
        script.write_text(MAPPABLE_FAULTFS)
        command = [sys.executable, str(script), str(FAULTFS.parent)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*command, str(self.backing), str(self.mountpoint)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                why = self.log.read_text(errors="replace")
                raise RuntimeError(f"faultfs exited with {self.proc.returncode}: {why}")
            return self.is_mounted() and (self.mountpoint / ".faultfs").exists()

        wait_until(ready, 20, "the faultfs mount")


@pytest.fixture
def mappable(cowfs: CowfsRunner, tmp_path: Path) -> Iterator[FaultyFS]:
    """Like `faulty`, with intent records allowed on it; torn down after the daemons."""
    backing, mountpoint = tmp_path / "faultfs-backing", tmp_path / "faultfs"
    backing.mkdir()
    mountpoint.mkdir()
    fs = MappableFaultyFS(backing, mountpoint)
    try:
        fs.start()
        yield fs
    finally:
        try:
            cowfs.teardown()  # the daemons first: their source lies on faultfs
            cowfs.started.clear()
        finally:
            fs.teardown()


SMALL = 4 * MiB
DELAY = 1.5
"""Long enough to kill the daemon while the slowed request is in progress."""
BITMAPS_TMP = ".disk.img.cowfs-bitmaps.json.tmp"
INTENT = ".disk.img.cowfs-intent"
INTENT_TMP = ".disk.img.cowfs-intent.tmp"
SLOW = {
    "saving the bitmaps (write)": (BITMAPS_TMP, "write", 0),
    "saving the bitmaps (fsync)": (BITMAPS_TMP, "fsync", 0),
    "updating the intent record (write)": (INTENT, "write", PAGE),
    "updating the intent record (fdatasync)": (INTENT, "fsync", 0),
    "creating the intent record at the mount's start (write)": (INTENT_TMP, "write", 0),
    "creating the intent record at the mount's start (fsync)": (INTENT_TMP, "fsync", 0),
}


def landed(fs: FaultyFS, name: str, op: str, before: bytes) -> bool:
    """Whether the slowed request of a killed daemon has reached the file by now: a late
    write of a temporary file would land in the next mount's file of the same name."""
    path = fs.backing_path(name)
    if op == "fsync" or not path.exists():
        return True
    if name.endswith(".tmp"):
        return path.stat().st_size > 0
    return path.read_bytes()[PAGE:] != before


def mount_daemon(cowfs: CowfsRunner, source: Path) -> tuple[subprocess.Popen, Mounted]:
    """`cowfs mount SOURCE MP` started in the background: the command, and its daemon
    (the command's forked child) as soon as it exists."""
    mnt = cowfs.workdir / "mnt"
    m = cowfs.add(Mounted(source, mnt, options=TRACKING))  # by its command line until its pid
    proc = subprocess.Popen(
        [*COWFS, *m.argv()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")

    found: list[int] = []

    def forked() -> bool:
        """The mount is there and the command has a child that is a cowfs process (the
        daemon forks once the mount exists; fusermount3, which libfuse runs before it for
        auto_unmount, has the command's name until it execs)."""
        if proc.poll() is not None or not m.is_mounted():
            return False
        for child in children.read_text().split():
            with contextlib.suppress(FileNotFoundError):
                if b"cowfs" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(child))
        return bool(found)

    wait_until(forked, 20, "the mount's daemon")
    m.pid = found[0]
    return proc, m


def incremental_after(
    cowfs: CowfsRunner, m: Mounted | None, source: Path, anchor: Link, name: str
) -> Mounted:
    """A mount (`m`, or a new one), then an incremental over `anchor` that must complete
    and restore the source as it was when it started."""
    m = m or serve(cowfs, source)
    link = Link(cowfs.workdir / f"{name}.qcow2", snapshot(source, cowfs.workdir / f"{name}.pit"))
    job(m, link.target, *incremental(anchor.target), wait=True)
    assert_restores(link.target, link.pit)
    return m


@pytest.mark.parametrize("slow", sorted(SLOW))
def test_kill9_inside_a_slow_save_or_intent_write(
    cowfs: CowfsRunner, mappable: FaultyFS, tmp_path: Path, slow: str
) -> None:
    """faultfs holds a write or fsync of the bitmaps' temporary file or of the intent
    record, and the daemon is killed while it waits: the bitmap is the last complete save
    plus the last complete intent record, consistent, holding every write that returned,
    and the incremental after it restores exactly."""
    name, op, offset = SLOW[slow]
    rng = random.Random(slow)
    make_image(mappable.backing_path("disk.img"), SMALL, seed=61, holes=False)
    source = mappable.path("disk.img")
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    first = Writers(m.live, SMALL, rng.randrange(1 << 30), [0]).start()
    first.wait_for(50)
    written = clusters(first.stop())
    wait_until(lambda: tracking(m)["intent_regions"] == 0, 10, "a save that clears the intent")
    writers = Writers(m.live, SMALL, rng.randrange(1 << 30), [1, 2, 3])
    mappable.fail(name, op, offset=offset, times=1, errno=0, delay=DELAY)
    if name == INTENT_TMP:  # made when a mount starts: after a crash, the next mount's
        kill9(m)
        proc, m = mount_daemon(cowfs, source)
    else:
        writers.start()  # writes into regions the intent does not cover; saves after them
    wait_until(lambda: mappable.hits() >= 1, 20, f"the slow request ({slow})")
    before = mappable.backing_path(name).read_bytes() if name == INTENT else b""
    killed = time.monotonic()
    kill9(m)
    written |= clusters(writers.stop())
    assert not writers.errors_before(killed), writers.errors
    if name == INTENT_TMP:
        assert proc.wait(TIMEOUT) != 0  # the mount command says its daemon died
    assert_nothing_missed(source, written, full.pit, f"{slow}, while slow")
    wait_until(lambda: landed(mappable, name, op, before), 20, "the slow request to land")
    mappable.clear()
    assert_nothing_missed(source, written, full.pit, f"{slow}, landed")
    m = incremental_after(cowfs, None, source, full, "inc1")
    unmount(m)


# -- c. an intent record that cannot be written ----------------------------------------------


EIO_TEXT = "Input/output error"
ENOSPC_TEXT = "No space left on device"
BROKEN = {
    "full filesystem at the mount's start": ("small_fs", ENOSPC_TEXT),
    "EIO creating the record at the mount's start": ("mappable", EIO_TEXT),
    "EIO updating the record": ("mappable", EIO_TEXT),
    "EIO on the record's fdatasync": ("mappable", EIO_TEXT),
}


def break_intent(fs: FaultyFS | SmallFS, case: str) -> None:
    """Make every write of an intent record fail as `case` says (a record made anew after
    a failure too: the failure stays until `mend`)."""
    if isinstance(fs, SmallFS):
        fs.fill()
    elif "fdatasync" in case:
        fs.fail(INTENT, "fsync")
        fs.fail(INTENT_TMP, "fsync")
    else:
        fs.fail(INTENT, "write", offset=PAGE)
        fs.fail(INTENT_TMP, "write")


def mend(fs: FaultyFS | SmallFS) -> None:
    if isinstance(fs, SmallFS):
        fs.free()
    else:
        fs.clear()


def source_on(fs: FaultyFS | SmallFS, seed: int) -> Path:
    if isinstance(fs, SmallFS):  # fully allocated: writes into it need no space
        return make_image(fs.path / "disk.img", SMALL, seed=seed, holes=False)
    make_image(fs.backing_path("disk.img"), SMALL, seed=seed, holes=False)
    return fs.path("disk.img")


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_intent_that_cannot_be_written_is_never_trusted(
    cowfs: CowfsRunner, request: pytest.FixtureRequest, tmp_path: Path, case: str
) -> None:
    """Guest writes still succeed, but every bitmap is inconsistent ("change tracking
    failed") and the intent record is gone: the incremental is refused with the fix, also
    after kill -9 in that state and a new mount once the failure is over. A full with
    --bitmap makes the bitmap trustworthy again."""
    kind, strerror = BROKEN[case]
    fs = request.getfixturevalue(kind)
    source = source_on(fs, seed=71)
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    if "start" in case:
        unmount(m)
        break_intent(fs, case)
        m = serve(cowfs, source)
    else:
        write_live(m, b"first" * 1000, 100)  # the record exists and covers region 0
        break_intent(fs, case)
    data = random.Random(72).randbytes(70_000)
    write_live(m, data, 2 * REGION + 12_345)  # a region the record does not cover: succeeds
    assert strerror in tracking_failure(m)
    listed = bitmaps(source)[BITMAP]
    assert listed["consistent"] is False, listed
    assert listed["reason"].startswith("change tracking failed"), listed
    assert not intent_file(source).exists()
    message = assert_incremental_refused(m, tmp_path / "inc1.qcow2", full.target)
    assert "change tracking failed" in message, message

    kill9(m)
    listed = bitmaps(source)[BITMAP]
    assert listed["consistent"] is False, listed
    mend(fs)
    m = serve(cowfs, source)
    assert_incremental_refused(m, tmp_path / "inc1.qcow2", full.target)

    full2 = Link(tmp_path / "full2.qcow2", snapshot(source, tmp_path / "full2.pit"))
    job(m, full2.target, "--bitmap", BITMAP, wait=True)
    write_live(m, data[::-1], 3 * REGION + 99)
    m = incremental_after(cowfs, m, source, full2, "inc2")
    unmount(m)


def test_change_tracking_works_again_after_a_failure(
    cowfs: CowfsRunner, mappable: FaultyFS, tmp_path: Path
) -> None:
    """Once the intent record can be written again, a later save makes it anew: writes
    wait for their intent again, the bitmaps stay untrusted until a full re-anchors them,
    and from then on a kill -9 is recovered from, consistent and correct."""
    source = source_on(mappable, seed=73)
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    break_intent(mappable, "EIO updating the record")
    write_live(m, b"x" * 5000, REGION + 7)
    assert EIO_TEXT in tracking_failure(m)
    mappable.clear()
    writes = tracking(m)["intent_writes"]
    write_live(m, b"y" * 5000, 2 * REGION + 7)  # a write: the next save is due

    def works() -> bool:
        figures = tracking(m)
        return figures["failed"] is None and figures["intent_writes"] > writes

    wait_until(works, 10, "a save that makes the record anew")
    assert intent_file(source).exists()
    assert bitmaps(source)[BITMAP]["consistent"] is False
    assert_incremental_refused(m, tmp_path / "inc1.qcow2", full.target)

    full2 = Link(tmp_path / "full2.qcow2", snapshot(source, tmp_path / "full2.pit"))
    job(m, full2.target, "--bitmap", BITMAP, wait=True)
    writers = Writers(m.live, SMALL, 74, [0, 3]).start()
    writers.wait_for(100)
    pid = m.pid
    kill9(m)
    written = clusters(writers.stop())
    listed = assert_nothing_missed(source, written, full2.pit, "after the failure")
    assert_recovered(source, listed, pid, "after the failure")
    m = incremental_after(cowfs, None, source, full2, "inc2")
    unmount(m)


def test_full_filesystem_once_the_record_exists(
    cowfs: CowfsRunner, small_fs: SmallFS, tmp_path: Path
) -> None:
    """The record is made when the mount starts and updated in place: on a full
    filesystem (tmpfs allocates nothing for an overwrite) change tracking keeps working
    while the saves of the bitmaps fail; after kill -9 the bitmap is recovered from the
    record, consistent and holding every write, and the incremental restores exactly."""
    source = source_on(small_fs, seed=75)
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    assert intent_file(source).exists()
    small_fs.fill()
    saves = tracking(m)["saves"]
    writers = Writers(m.live, SMALL, 76, [1, 2]).start()
    writers.wait_for(200)
    written = clusters(writers.stop())
    assert not writers.errors
    figures = tracking(m)
    assert figures["failed"] is None and figures["saves"] == saves, figures
    pid = m.pid
    kill9(m)
    listed = assert_nothing_missed(source, written, full.pit, "full filesystem")
    assert_recovered(source, listed, pid, "full filesystem")
    small_fs.free()
    m = incremental_after(cowfs, None, source, full, "inc1")
    unmount(m)


# -- d. what recovery must not trust ---------------------------------------------------------


def _dd(source: Path, offset: int) -> None:
    done = subprocess.run(
        ["dd", "if=/dev/urandom", f"of={source}", "bs=4096", "count=2",
         f"seek={offset // 4096}", "conv=notrunc", "status=none"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _dd_back_in_time(source: Path, offset: int) -> None:
    st = source.stat()
    _dd(source, offset)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the ctime tells now


def _replace(source: Path, offset: int) -> None:
    copy = source.with_name("copy.img")
    shutil.copy2(source, copy)  # the same bytes and mtime, another inode
    os.replace(copy, source)


CHANGED = "changed after the mount died"
OUTSIDE: dict[str, tuple[Callable[[Path], None], str]] = {
    "dd into a clean region": (lambda source: _dd(source, 3 * REGION + 8192), CHANGED),
    "dd into a region it wrote": (lambda source: _dd(source, 8192), CHANGED),
    "dd, mtime set back": (lambda source: _dd_back_in_time(source, 3 * REGION), CHANGED),
    "grown": (lambda source: os.truncate(source, SMALL + 2 * REGION), "grew beyond"),
    "replaced by a copy": (lambda source: _replace(source, 0), "another file"),
}


def written_then_killed(cowfs: CowfsRunner, source: Path, tmp_path: Path) -> tuple[Link, int]:
    """A mount that anchors BITMAP with a full, writes into regions 0 and 1 (no save
    after them: the record holds them) and dies by kill -9. Returns the full and the time
    the last write returned."""
    m = serve(cowfs, source, "--save-period", "3600")
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    write_live(m, b"a" * 10_000, 4096)
    write_live(m, b"b" * 10_000, REGION + 4096)
    last = time.time_ns()
    assert tracking(m)["intent_regions"] == 2
    kill9(m)
    return full, last


@pytest.mark.parametrize("change", sorted(OUTSIDE))
def test_outside_change_after_a_crash_is_refused(
    cowfs: CowfsRunner, tmp_path: Path, change: str
) -> None:
    """Right after the daemon died, something else writes the source: recovery must see
    it (its times are later than the dead mount's last write, its inode or size is not
    what the mount left) and leave every bitmap inconsistent, so the incremental is
    refused with the fix instead of missing that write."""
    source = make_image(tmp_path / "disk.img", SMALL, seed=81, holes=False)
    full, last = written_then_killed(cowfs, source, tmp_path)
    # A later clock tick than the mount's last write, or no timestamp could tell them apart.
    wait_until(lambda: time.time_ns() > last + 50_000_000, 5, "the clock to pass the write")
    make_change, why = OUTSIDE[change]
    make_change(source)
    listed = bitmaps(source)[BITMAP]
    assert listed["consistent"] is False, listed
    assert "died" in listed["reason"] and why in listed["reason"], listed
    m = serve(cowfs, source)
    assert_incremental_refused(m, tmp_path / "inc1.qcow2", full.target)
    unmount(m)


def _flip_slot(path: Path, which: str) -> None:
    """Damage one byte in the middle of the older slot, or of both."""
    raw = bytearray(path.read_bytes())
    slot = (len(raw) - PAGE) // 2
    seqs = [
        int.from_bytes(raw[PAGE + i * slot + 16 : PAGE + i * slot + 24], "little") for i in (0, 1)
    ]
    newer = seqs.index(max(seqs))
    slots = (0, 1) if which == "both" else (1 - newer,)
    for i in slots:
        raw[PAGE + i * slot + slot // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


DAMAGE: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "both slots damaged": (lambda path: _flip_slot(path, "both"), "is damaged"),
    "truncated to its alive page": (lambda path: os.truncate(path, PAGE), "is damaged"),
    "removed": (lambda path: path.unlink(), "left no intent record"),
    "the older slot damaged": (lambda path: _flip_slot(path, "older"), None),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_intent_record_after_a_crash(
    cowfs: CowfsRunner, tmp_path: Path, damage: str
) -> None:
    """The record that recovery needs is damaged or gone: every bitmap is inconsistent
    and the incremental refused with the fix. Only a damaged older slot is harmless (a
    torn update leaves just that): the newer one is recovered from, and restores exactly."""
    source = make_image(tmp_path / "disk.img", SMALL, seed=82, holes=False)
    full, _ = written_then_killed(cowfs, source, tmp_path)
    make_damage, why = DAMAGE[damage]
    make_damage(intent_file(source))
    listed = bitmaps(source)[BITMAP]
    if why is None:
        assert_nothing_missed(
            source, clusters([(4096, 10_000), (REGION + 4096, 10_000)]), full.pit, damage
        )
        m = incremental_after(cowfs, None, source, full, "inc1")
    else:
        assert listed["consistent"] is False, listed
        assert "died" in listed["reason"] and why in listed["reason"], listed
        m = serve(cowfs, source)
        assert_incremental_refused(m, tmp_path / "inc1.qcow2", full.target)
    unmount(m)


def test_damaged_bitmap_file_after_a_crash(cowfs: CowfsRunner, tmp_path: Path) -> None:
    """The bitmap file itself is damaged after the crash: one clear line naming it and the
    fix, for `bitmap list` and for the next mount, never an empty or recovered bitmap."""
    source = make_image(tmp_path / "disk.img", SMALL, seed=83, holes=False)
    written_then_killed(cowfs, source, tmp_path)
    path = bitmaps_file(source)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x08
    path.write_bytes(bytes(raw))
    for args in (["bitmap", "list", source], ["bitmap", "list", source, "--json"]):
        result = run_cowfs(*args)
        assert_one_error_line(result)
        assert path.name in result.stderr and "full backup" in result.stderr, result.stderr
    mnt = tmp_path / "mnt"
    result = run_cowfs("mount", source, mnt, *TRACKING)
    cowfs.adopt(mnt, source)  # a daemon that came up anyway (a bug) goes at teardown
    assert_one_error_line(result)
    assert path.name in result.stderr and "full backup" in result.stderr, result.stderr
    assert not os.listdir(mnt)
    assert path.read_bytes() == bytes(raw)  # not repaired behind the user's back


# -- the end of a job --------------------------------------------------------------------------


def test_kill9_as_an_incremental_completes(
    cowfs: CowfsRunner, mappable: FaultyFS, tmp_path: Path
) -> None:
    """The daemon dies while a completing incremental's record is being written (slowed
    by faultfs): whichever of the bitmap and the record reached the disk, the next
    incremental must find a backing it accepts (the new link if its record says
    complete, else the full) and restore exactly: a bitmap anchored to a link whose
    record never said complete would refuse every incremental until a full."""
    source = make_image(tmp_path / "disk.img", SMALL, seed=91, holes=False)
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    write_live(m, random.Random(92).randbytes(3 * MiB), 4096)
    inc = Link(mappable.path("inc1.qcow2"), snapshot(source, tmp_path / "inc1.pit"))
    job_id = job(m, inc.target, *incremental(full.target), "--speed", "256K")
    mappable.fail("inc1.qcow2.cowfs.json.tmp", "write", errno=0, delay=DELAY)
    assert run_cowfs("set-speed", m.mountpoint, "0", str(job_id)).returncode == 0
    wait_until(lambda: mappable.hits() >= 1, 20, "the complete record being written")
    kill9(m)
    mappable.clear()
    assert bitmaps(source)[BITMAP]["consistent"] is True
    anchor = anchored_to(source)
    assert anchor in (full.target, inc.target), anchor
    m = incremental_after(cowfs, None, source, inc if anchor == inc.target else full, "inc2")
    unmount(m)


def test_source_on_a_filesystem_without_shared_mappings(
    cowfs: CowfsRunner, faulty: FaultyFS, tmp_path: Path
) -> None:
    """A FUSE filesystem that opens files with direct_io (tests/faultfs.py does, like many
    network and userspace filesystems) refuses a shared writable mapping with ENODEV. The
    alive page is a refinement of the lease, not the record itself: change tracking must
    go on without it, not fail on every mount and leave every incremental refused."""
    make_image(faulty.backing_path("disk.img"), SMALL, seed=93, holes=False)
    source = faulty.path("disk.img")
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    write_live(m, random.Random(94).randbytes(100_000), REGION + 5)
    assert tracking(m)["failed"] is None, tracking(m)
    m = incremental_after(cowfs, m, source, full, "inc1")
    unmount(m)


def test_outside_write_after_a_kill_in_the_middle_of_a_write(
    cowfs: CowfsRunner, mappable: FaultyFS, tmp_path: Path
) -> None:
    """The daemon dies while its write to the source is in flight (faultfs holds it a
    moment, as a slow or busy disk would); that write lands, then something else writes
    the source elsewhere: recovery must not take the second write for the first."""
    make_image(mappable.backing_path("disk.img"), SMALL, seed=95, holes=False)
    source = mappable.path("disk.img")
    m = serve(cowfs, source, "--save-period", "3600")
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    write_live(m, b"a" * 4096, 0)
    mappable.fail("disk.img", "write", offset=2 * REGION, length=PAGE, times=1, errno=0, delay=0.3)
    data = random.Random(96).randbytes(PAGE)

    def write() -> None:
        with contextlib.suppress(OSError):  # the mount dies under it
            write_live(m, data, 2 * REGION)

    writer = threading.Thread(target=write)
    writer.start()
    wait_until(lambda: mappable.hits() >= 1, 10, "the write in flight")
    kill9(m)
    writer.join(TIMEOUT)
    backing = mappable.backing_path("disk.img")

    def in_source() -> bool:
        with open(backing, "rb") as f:
            return os.pread(f.fileno(), PAGE, 2 * REGION) == data

    wait_until(in_source, 10, "the dead mount's write to land")
    _dd(source, 3 * REGION)  # outside cowfs, in a region the mount never wrote
    mappable.clear()
    if bitmaps(source)[BITMAP]["consistent"]:
        written = clusters([(0, 4096), (2 * REGION, PAGE)])
        assert_nothing_missed(source, written, full.pit, "an outside write after the kill")


def test_save_while_an_intent_write_is_in_flight(
    cowfs: CowfsRunner, mappable: FaultyFS, tmp_path: Path
) -> None:
    """A save finishes while a write's intent record is still being written (faultfs
    slows it): the save's snapshot has not seen that write yet, so the write's region must
    stay in every later record until a later save holds it. Then another write makes a
    new record, the daemon dies before any later save lands: the first write must still
    be in the recovered bitmap."""
    make_image(mappable.backing_path("disk.img"), SMALL, seed=97, holes=False)
    source = mappable.path("disk.img")
    m = serve(cowfs, source)
    full = Link(tmp_path / "full.qcow2", snapshot(source, tmp_path / "full.pit"))
    job(m, full.target, "--bitmap", BITMAP, wait=True)
    wait_until(lambda: tracking(m)["intent_regions"] == 0, 10, "a quiet record")
    saves = tracking(m)["saves"]
    mappable.fail(INTENT, "write", offset=PAGE, times=1, errno=0, delay=DELAY)
    first = (2 * REGION + 4096, random.Random(98).randbytes(20_000))
    writer = threading.Thread(target=write_live, args=(m, first[1], first[0]))
    writer.start()
    try:
        wait_until(lambda: mappable.hits() >= 1, 10, "the first write's intent in flight")
        wait_until(lambda: tracking(m)["saves"] > saves, 10, "a save meanwhile")
        mappable.fail(BITMAPS_TMP, "write", errno=0, delay=DELAY)  # later saves: after the kill
    finally:
        writer.join(TIMEOUT)
    write_live(m, b"second" * 1000, 3 * REGION + 4096)  # a new region: a new record
    kill9(m)
    written = clusters([(first[0], len(first[1])), (3 * REGION + 4096, 6000)])
    assert_nothing_missed(source, written, full.pit, "a save during an intent write")
