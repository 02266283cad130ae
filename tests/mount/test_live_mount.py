"""A mount that outlives its jobs: `cowfs mount` without a target, `cowfs backup`, `unmount`.

Why: a long-lived mount changes what a point in time means. With `mount --target`
the point in time is the instant the live file became usable, before any guest
write; with `cowfs backup` it is fixed by a barrier while guests keep writing
(DESIGN.md, "Point in time under running writers"), for several images at once
("Groups"), and jobs start and end while the mount keeps serving ("A mount that
outlives its jobs"). None of that can be checked by comparing the target with a
copy of the source taken beforehand, because nobody can copy a running image at
the barrier's instant. So the writers here make the restored bytes tell their own
story: every 4 KiB block a writer writes carries the write's sequence number (one
counter shared by an O_DIRECT writer and a buffered writer on two images), and
the test logs when each write was issued and when it returned (monotonic clock).
From the restored link alone the test then finds, for each image, the prefix of
that image's writes it holds (a block holding anything else, or a write half in,
fails), and checks the barrier's promises against the log:

1. every write that returned before `cowfs backup` was started is in the backup;
2. no write issued after `cowfs backup` returned is in it;
3. happens-before across the images: if write A returned before write B was
   issued and B is in the backup, A is in it too.

The other tests drive the rest of the interface on real mounts with real tools
(dd oflag=direct, Python os.pwrite, qemu-img): grouped completion when one target's
filesystem fills up (the peer is cancelled, both bitmaps keep the union, and the
next incremental restores right), cancel under writers that never see an error,
`unmount` refusing while a job runs or a live file is open, and bad input, which
exits 2 with one line and creates nothing. Every mount and process a test starts
is torn down by a fixture or a finally, even when the test fails.
"""

import contextlib
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import files_equal, make_image
from helpers.mounting import (
    COWFS,
    TIMEOUT,
    UNMOUNT,
    CowfsRunner,
    is_mounted,
    ok,
    pid_gone,
    run_cowfs,
    status,
    unmount_released,
    wait_until,
)
from helpers.prefix import Write, last_writes

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
BLOCK = 4 * KiB
MAGIC = b"COWFSSEQ"
HEADER = struct.Struct("<8sIIQ")  # magic, image number, block index, sequence number
FINAL = ("complete", "failed", "cancelled")
SLOW = "512K"
"""A copier that needs half a minute for 16 MiB: the job is surely still running."""
COPY_SPEED = "16M"
"""About a second per image and link: long enough that writers hit clusters not yet copied."""
JOB_END_S = 20.0
"""How long a job of these small images may take to end once nothing holds it back."""

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


# -- daemons: every mount a test starts is torn down -------------------------------------

STOP_LIVE = ((UNMOUNT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
"""Unmounted, then 5 s for the daemon to exit by itself, then SIGTERM (it cancels what
still runs), then SIGKILL."""


@pytest.fixture
def daemons(cowfs: CowfsRunner) -> CowfsRunner:
    """The test's mounts (`cowfs`), taken down the `STOP_LIVE` way."""
    cowfs.stop = STOP_LIVE
    return cowfs


# -- the CLI -------------------------------------------------------------------------------


def backup(mountpoint: Path, *args: str | os.PathLike) -> int:
    """`cowfs backup` that must succeed; returns the job id it printed on its first line."""
    result = ok("backup", mountpoint, *args)
    first = result.stdout.splitlines()[0] if result.stdout else ""
    assert first.isdigit(), f"no job id alone on the first line: {result.stdout!r}"
    return int(first)


def assert_refused(result: subprocess.CompletedProcess, what: str = "") -> None:
    """Bad input: exit 2, one line `cowfs: error: ...`, no job id, no traceback."""
    assert result.returncode == 2, (what, result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: error:"), (what, result.stderr)
    assert result.stdout.strip() == "", (what, result.stdout)


def record_if_any(target: Path) -> dict | None:
    """The record beside `target`, None if there is none (yet)."""
    try:
        return json.loads(target.with_name(target.name + ".cowfs.json").read_text())
    except FileNotFoundError:
        return None


def record(target: Path) -> dict:
    rec = record_if_any(target)
    assert rec is not None, f"no record beside {target}"
    return rec


def wait_ended(target: Path, timeout: float = JOB_END_S) -> dict:
    """The record once it reaches a final state."""

    def ended() -> bool:
        rec = record_if_any(target)
        return rec is not None and rec["status"] in FINAL

    wait_until(ended, timeout, f"the record of {target.name} to reach a final state")
    return record(target)


def unmount_when_released(mountpoint: Path) -> None:
    """`cowfs unmount` after the test closed its live files. The kernel sends FUSE's
    RELEASE asynchronously after close() returns, so the daemon may count a handle for
    a moment longer: retry on exit 2 for a few seconds, then demand success."""
    result = unmount_released(mountpoint)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert not is_mounted(mountpoint)


def restore(link: Path, out: Path) -> bytes:
    result = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(link), str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, f"qemu-img convert {link}: {result.stderr}"
    return out.read_bytes()


def qemu_img_check(link: Path) -> None:
    result = subprocess.run(
        ["qemu-img", "check", str(link)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, f"qemu-img check {link}: {result.stdout}{result.stderr}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_image(path: Path, size: int, seed: int) -> Path:
    """Incompressible and without zeros: its target needs every byte of it."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def write_through(live: Path, writes: list[tuple[int, bytes]]) -> None:
    """Buffered writes through the mount, then fsync."""
    fd = os.open(live, os.O_WRONLY)
    try:
        for offset, data in writes:
            assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writers whose blocks carry their sequence numbers --------------------------------


def block_bytes(image: int, seq: int, block: int) -> bytes:
    head = HEADER.pack(MAGIC, image, block, seq)
    fill = struct.pack("<Q", (seq * 0x9E3779B97F4A7C15 + block) & 0xFFFF_FFFF_FFFF_FFFF)
    return head + fill * ((BLOCK - len(head)) // 8)


class Writers:
    """One thread per image, writing 1-8 blocks at random aligned offsets, as fast as the
    mount takes them. Sequence numbers come from one counter under a lock, so they are
    unique across the images; each image's log is in its thread's order."""

    def __init__(self, files: list[tuple[int, Path, bool]], seed: int) -> None:
        self.lock = threading.Lock()
        self.next_seq = 0
        self.log: dict[int, list[Write]] = {image: [] for image, _, _ in files}
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.fds: list[int] = []
        self.threads: list[threading.Thread] = []
        for image, path, direct in files:
            fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
            self.fds.append(fd)
            thread = threading.Thread(
                target=self._run, args=(image, path, fd, direct, seed + image), daemon=True
            )
            self.threads.append(thread)

    def __enter__(self) -> "Writers":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, image: int, path: Path, fd: int, direct: bool, seed: int) -> None:
        rng = random.Random(seed)
        nblocks = os.fstat(fd).st_size // BLOCK
        buf = mmap.mmap(-1, 8 * BLOCK)  # page-aligned, as O_DIRECT wants
        while not self.stopping.is_set():
            count = rng.choice((1, 1, 1, 2, 3, 8))
            first = rng.randrange(nblocks - count + 1)
            with self.lock:
                seq = self.next_seq
                self.next_seq += 1
            data = b"".join(block_bytes(image, seq, first + i) for i in range(count))
            if direct:
                buf[: len(data)] = data
                payload: bytes | memoryview = memoryview(buf)[: len(data)]
            else:
                payload = data
            issued = time.monotonic_ns()
            try:
                done = os.pwrite(fd, payload, first * BLOCK)
            except OSError as e:
                self.errors.append(f"{path.name}: write {seq} at block {first}: {e}")
                return
            finally:
                if isinstance(payload, memoryview):
                    payload.release()
            returned = time.monotonic_ns()
            if done != len(data):
                self.errors.append(f"{path.name}: short write {seq}: {done} of {len(data)}")
                return
            self.log[image].append(Write(image, seq, first, count, issued, returned))

    def count(self, image: int) -> int:
        return len(self.log[image])

    def wait_for(self, more: int) -> None:
        """Until every writer has done `more` writes beyond now (or one failed)."""
        goal = {image: self.count(image) + more for image in self.log}

        def written() -> bool:
            assert not self.errors, self.errors
            return all(self.count(image) >= n for image, n in goal.items())

        wait_until(written, JOB_END_S, f"{more} more writes from each writer")

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            if thread.ident is not None:
                thread.join(TIMEOUT)
        if not any(thread.is_alive() for thread in self.threads):
            for fd in self.fds:
                os.close(fd)
            self.fds = []


def writes_in(data: bytes, image: int, initial: bytes, log: list[Write], what: str) -> int:
    """The prefix of `log` that the restored `data` holds: the sequence number of its last
    write (-1 for none). Fails unless every block is exactly what that prefix left."""
    assert len(data) == len(initial), f"{what}: size {len(data)}, not {len(initial)}"
    nblocks = len(initial) // BLOCK
    found: list[tuple[int, int]] = []  # (sequence number, block)
    for k in range(nblocks):
        head = data[k * BLOCK : k * BLOCK + HEADER.size]
        if head[:8] == MAGIC:
            _, img, blk, seq = HEADER.unpack(head)
            assert (img, blk) == (image, k), f"{what}: block {k} holds block {blk} of image {img}"
            found.append((seq, k))
    cut = max(found)[0] if found else -1
    last = last_writes(log, cut, nblocks)
    bad = []
    for k in range(nblocks):
        want = (
            initial[k * BLOCK : (k + 1) * BLOCK] if last[k] < 0 else block_bytes(image, last[k], k)
        )
        got = data[k * BLOCK : (k + 1) * BLOCK]
        if got != want:
            head = got[: HEADER.size]
            holds = HEADER.unpack(head)[3] if head[:8] == MAGIC else "other data"
            bad.append(f"block {k}: holds {holds}, the prefix up to {cut} left {last[k]}")
    assert not bad, (
        f"{what}: not a prefix of the writes ({len(bad)} blocks): {bad[:5]}; "
        f"the newest writes it holds (sequence, block): {sorted(found)[-5:]}"
    )
    return cut


def check_point_in_time(
    cuts: dict[int, int], log: dict[int, list[Write]], invoked: int, returned: int, what: str
) -> None:
    """The barrier's promises, from the cut of each image and the writers' log."""
    writes = [w for image in log for w in log[image]]
    for image, ws in log.items():  # the check means something only if writes surrounded it
        assert any(w.returned < invoked for w in ws), f"{what}: image {image} wrote nothing before"
        assert any(w.issued > returned for w in ws), f"{what}: image {image} wrote nothing after"
    inside = [w for w in writes if w.seq <= cuts[w.image]]
    outside = [w for w in writes if w.seq > cuts[w.image]]
    missing = [w for w in outside if w.returned < invoked]
    assert not missing, (
        f"{what}: writes that returned before the backup began are missing: {missing[:3]}"
    )
    late = [w for w in inside if w.issued > returned]
    assert not late, f"{what}: writes issued after the backup returned are in it: {late[:3]}"
    if inside and outside:
        a = min(outside, key=lambda w: w.returned)
        b = max(inside, key=lambda w: w.issued)
        assert a.returned >= b.issued, (
            f"{what}: happens-before broken: {a} returned before {b} was issued, "
            f"and only the later one is in the backup"
        )


def check_final(source: Path, image: int, initial: bytes, log: list[Write]) -> None:
    """The source after the mount: every write, the last one to each block winning."""
    data = source.read_bytes()
    cut = writes_in(data, image, initial, log, f"source {source.name}")
    assert cut == (log[-1].seq if log else -1), f"{source.name}: the last writes are missing"


# -- the tests ------------------------------------------------------------------------------


@needs_qemu_img
@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
def test_chain_of_backups_under_two_writers(
    daemons: CowfsRunner, tmp_path: Path, cache: str
) -> None:
    """A full backup of two images in one command (anchoring `nightly`), then two
    incrementals, each over the previous link, while an O_DIRECT writer and a buffered
    writer keep writing to the two live files through all of it, never unmounted. Every
    restored link holds, per image, a prefix of that image's writes, and the prefixes
    keep the barrier's promises (see the module docstring). With `--writeback-cache`
    both writers are buffered: the kernel holds their writes back and sends them in any
    order, so the promises rest on the barrier's fence."""
    a = make_image(tmp_path / "a.img", SIZE, seed=1)
    b = make_image(tmp_path / "b.img", SIZE, seed=2)
    initial = {0: a.read_bytes(), 1: b.read_bytes()}
    out = tmp_path / "t"
    out.mkdir()
    mp = tmp_path / "mnt"
    writeback = cache == "writeback"
    options = ["--writeback-cache"] if writeback else []
    pid = daemons.serve(mp, a, b, options=options).pid
    st = status(mp)
    assert [i["name"] for i in st["images"]] == ["a.img", "b.img"]
    assert st["jobs"] == [] and st["mounted"] is True

    links: list[tuple[int, dict[int, Path], int, int]] = []
    plan = [(0, mp / "a.img", not writeback), (1, mp / "b.img", False)]
    with Writers(plan, seed=7) as writers:
        writers.wait_for(200)
        for n, name in enumerate(("full", "inc1", "inc2")):
            targets = {0: out / f"{name}-a.qcow2", 1: out / f"{name}-b.qcow2"}
            # A copier slow enough that copy-before-write does real work.
            args = ["--bitmap", "nightly", "--speed", COPY_SPEED]
            if n == 0:
                args += ["--sync", "full"]
            else:
                prev = links[-1][1]
                args += ["--sync", "incremental"]
                args += ["--backing", f"a.img={prev[0]}", "--backing", f"b.img={prev[1]}"]
            args += ["--target", f"a.img={targets[0]}", "--target", f"b.img={targets[1]}"]
            invoked = time.monotonic_ns()
            job = backup(mp, *args)
            returned = time.monotonic_ns()
            links.append((job, targets, invoked, returned))
            for target in targets.values():
                rec = wait_ended(target)
                assert rec["status"] == "complete", (target.name, rec["status"], rec["errors"])
            assert status(mp)["mounted"] is True
            writers.wait_for(200)  # the next backup begins while they write
        assert not writers.errors, writers.errors

    st = status(mp)
    assert len({job for job, _, _, _ in links}) == 3
    jobs = {(j["id"], j["image"]): j for j in st["jobs"]}
    for job, targets, _, _ in links:
        for image, name in ((0, "a.img"), (1, "b.img")):
            j = jobs[(job, name)]
            assert j["state"] == "complete", j
            assert j["bytes_done"] == j["bytes_total"], j
            assert os.path.realpath(j["target"]) == os.path.realpath(targets[image])
        # One command, one point in time for all its images.
        assert jobs[(job, "a.img")]["point_in_time"] == jobs[(job, "b.img")]["point_in_time"]
        pits = {record(target)["point_in_time"] for target in targets.values()}
        assert pits == {jobs[(job, "a.img")]["point_in_time"]}, pits
    for img, source in zip(st["images"], (a, b), strict=True):
        assert os.path.realpath(img["source"]) == os.path.realpath(source)
        assert img["size"] == SIZE
        (nightly,) = [bm for bm in img["bitmaps"] if bm["name"] == "nightly"]
        assert nightly["consistent"] is True
    unmount_when_released(mp)
    wait_until(lambda: pid_gone(pid), JOB_END_S, "the daemon to exit after unmount")

    for n, (_, targets, invoked, returned) in enumerate(links):
        cuts = {}
        for image, link in targets.items():
            qemu_img_check(link)
            assert run_cowfs("info", link).returncode == 0, f"cowfs info {link.name}"
            data = restore(link, tmp_path / f"restored-{n}-{image}.raw")
            cuts[image] = writes_in(data, image, initial[image], writers.log[image], link.name)
        check_point_in_time(cuts, writers.log, invoked, returned, f"link {n}")
    check_final(a, 0, initial[0], writers.log[0])
    check_final(b, 1, initial[1], writers.log[1])


@needs_qemu_img
def test_grouped_completion_full_target_cancels_the_peer(
    small_fs: Any, daemons: CowfsRunner, tmp_path: Path
) -> None:
    """Grouped completion (the default): an incremental of two images whose first target
    lies on a full 8 MiB filesystem. That job fails, its peer is cancelled naming it, no
    record says complete at any time, both bitmaps keep the union, and the next
    incremental of both over the last complete links restores the images right."""
    a = random_image(tmp_path / "a.img", SIZE, seed=3)
    b = make_image(tmp_path / "b.img", SIZE // 2, seed=4, holes=False)
    out = tmp_path / "t"
    out.mkdir()
    mp = tmp_path / "mnt"
    daemons.serve(mp, a, b)
    live_a, live_b = mp / "a.img", mp / "b.img"

    before0 = {"a": tmp_path / "a0.img", "b": tmp_path / "b0.img"}
    shutil.copyfile(live_a, before0["a"])
    shutil.copyfile(live_b, before0["b"])
    full = {"a": out / "full-a.qcow2", "b": out / "full-b.qcow2"}
    args = ["--sync", "full", "--bitmap", "nightly", "--wait"]
    backup(mp, *args, "--target", f"a.img={full['a']}", "--target", f"b.img={full['b']}")
    assert record(full["a"])["status"] == record(full["b"])["status"] == "complete"

    # Writes for the incremental: far more than the small filesystem holds on a.
    rng = random.Random(5)
    write_through(live_a, [(i * MiB, rng.randbytes(MiB)) for i in range(12)])
    b_writes = [(off, rng.randbytes(64 * KiB)) for off in (0, 3 * MiB + 4096, 8 * MiB - 64 * KiB)]
    write_through(live_b, b_writes)

    inc1 = {"a": small_fs.path / "inc1-a.qcow2", "b": out / "inc1-b.qcow2"}
    cmd = [
        *["backup", str(mp), "--sync", "incremental", "--bitmap", "nightly", "--wait"],
        # Slow enough that b's 256 KiB are copied long before a's target fills up.
        *["--speed", "4M"],
        *["--target", f"a.img={inc1['a']}", "--backing", f"a.img={full['a']}"],
        *["--target", f"b.img={inc1['b']}", "--backing", f"b.img={full['b']}"],
    ]
    proc = subprocess.Popen(
        [*COWFS, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def b_copied() -> bool:
            """b's job has copied everything while a's still runs (or a's ended)."""
            jobs = {
                j["image"]: j for j in status(mp)["jobs"] if j["target"].endswith("inc1-b.qcow2")
            }
            jobs |= {
                j["image"]: j for j in status(mp)["jobs"] if j["target"].endswith("inc1-a.qcow2")
            }
            if len(jobs) < 2:
                return False
            assert jobs["b.img"]["state"] != "complete", "b completed before its peer"
            return jobs["a.img"]["state"] in FINAL or (
                jobs["b.img"]["bytes_done"] >= jobs["b.img"]["bytes_total"]
            )

        wait_until(b_copied, JOB_END_S, "b's job to copy its clusters")

        def both_ended() -> bool:
            recs = [record_if_any(inc1["a"]), record_if_any(inc1["b"])]
            for rec in recs:
                assert rec is None or rec["status"] != "complete", "a record said complete"
            return all(rec is not None and rec["status"] in FINAL for rec in recs)

        wait_until(both_ended, JOB_END_S, "both jobs of the group to end")
        stdout, stderr = proc.communicate(timeout=JOB_END_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1, (proc.returncode, stdout, stderr)
    assert stdout.split("\n")[0].strip().isdigit(), stdout
    rec_a, rec_b = record(inc1["a"]), record(inc1["b"])
    assert rec_a["status"] == "failed", rec_a
    assert any("space" in e.lower() for e in rec_a["errors"]), rec_a["errors"]
    assert rec_b["status"] == "cancelled", rec_b
    assert any("peer" in e for e in rec_b["errors"]), rec_b["errors"]
    for target in inc1.values():
        assert run_cowfs("info", target).returncode == 1

    st = status(mp)
    assert st["mounted"] is True
    dirty = {
        img["name"]: next(bm for bm in img["bitmaps"] if bm["name"] == "nightly")
        for img in st["images"]
    }
    assert dirty["a.img"]["consistent"] and dirty["a.img"]["dirty_bytes"] >= 12 * MiB
    assert dirty["b.img"]["consistent"] and dirty["b.img"]["dirty_bytes"] >= 3 * 64 * KiB

    # More writes, then the retry over the last complete links: it must hold both rounds.
    write_through(live_a, [(13 * MiB + 12345, b"after" * 1000)])
    write_through(live_b, [(5 * MiB, b"later" * 2000)])
    now = {"a": tmp_path / "a2.img", "b": tmp_path / "b2.img"}
    shutil.copyfile(live_a, now["a"])
    shutil.copyfile(live_b, now["b"])
    inc2 = {"a": out / "inc2-a.qcow2", "b": out / "inc2-b.qcow2"}
    backup(
        mp,
        *["--sync", "incremental", "--bitmap", "nightly", "--wait"],
        *["--target", f"a.img={inc2['a']}", "--backing", f"a.img={full['a']}"],
        *["--target", f"b.img={inc2['b']}", "--backing", f"b.img={full['b']}"],
    )
    for name in ("a", "b"):
        assert record(inc2[name])["status"] == "complete"
        full_raw = tmp_path / f"full-{name}.raw"
        restore(full[name], full_raw)
        assert files_equal(full_raw, before0[name]), f"the full backup of {name}.img"
        inc_raw = tmp_path / f"inc2-{name}.raw"
        restore(inc2[name], inc_raw)
        assert files_equal(inc_raw, now[name]), f"the retried incremental of {name}.img"


def test_individual_completion_full_target_leaves_the_peer_complete(
    small_fs: Any, daemons: CowfsRunner, tmp_path: Path
) -> None:
    """--completion individual: the job whose target fills up fails, its peer completes
    on its own; `--wait` still exits 1, since not every target of the job is complete."""
    a = random_image(tmp_path / "a.img", SIZE, seed=6)
    b = make_image(tmp_path / "b.img", SIZE // 2, seed=7, holes=False)
    mp = tmp_path / "mnt"
    daemons.serve(mp, a, b)
    ta, tb = small_fs.path / "a.img", tmp_path / "b-backup.img"
    result = run_cowfs(
        *["backup", str(mp), "--completion", "individual", "--wait"],
        *["--target", f"a.img={ta}", "--target", f"b.img={tb}"],
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert record(ta)["status"] == "failed"
    assert record(tb)["status"] == "complete"
    assert files_equal(tb, b)
    assert status(mp)["mounted"] is True


def test_cancel_under_writers(daemons: CowfsRunner, tmp_path: Path) -> None:
    """`cowfs cancel MP` ends the running job (both images of it) and nothing else: the
    records say cancelled, the mount keeps serving, a Python O_DIRECT writer and a loop
    of `dd oflag=direct conv=notrunc` never see an error, and the next backup on the
    same mount completes with the barrier's promises."""
    a = make_image(tmp_path / "a.img", SIZE, seed=8)
    b = make_image(tmp_path / "b.img", SIZE, seed=9)
    initial_a, initial_b = a.read_bytes(), b.read_bytes()
    out = tmp_path / "t"
    out.mkdir()
    mp = tmp_path / "mnt"
    pid = daemons.serve(mp, a, b).pid

    pattern = tmp_path / "pattern"
    pattern.write_bytes(b"\xd5" * (64 * KiB))
    counter, stop = tmp_path / "dd.count", tmp_path / "dd.stop"
    loop = (
        'i=0; while [ ! -e "$4" ]; do '
        'dd if="$1" of="$2" bs=64K count=1 seek=$(( (i * 7) % 64 )) '
        "oflag=direct conv=notrunc status=none || exit 1; "
        'i=$((i + 1)); echo $i > "$3.tmp"; mv "$3.tmp" "$3"; done'
    )
    dd = subprocess.Popen(
        ["bash", "-c", loop, "dd-loop", str(pattern), str(mp / "b.img"), str(counter), str(stop)],
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def dd_count() -> int:
        if dd.poll() is not None:
            why = dd.stderr.read().decode(errors="replace") if dd.stderr else ""
            raise AssertionError(f"the dd loop failed: {why}")
        try:
            return int(counter.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def dd_more(n: int) -> None:
        goal = dd_count() + n
        wait_until(lambda: dd_count() >= goal, JOB_END_S, f"{n} more dd writes")

    try:
        with Writers([(0, mp / "a.img", True)], seed=11) as writers:
            writers.wait_for(200)
            dd_more(20)
            c1 = {"a": out / "c1-a.img", "b": out / "c1-b.img"}
            job1 = backup(
                mp, "--speed", SLOW, "--target", f"a.img={c1['a']}", "--target", f"b.img={c1['b']}"
            )
            states = {j["image"]: j["state"] for j in status(mp)["jobs"] if j["id"] == job1}
            assert states == {"a.img": "running", "b.img": "running"}, states
            ok("cancel", mp)
            for target in c1.values():
                assert wait_ended(target)["status"] == "cancelled"
            assert status(mp)["mounted"] is True and is_mounted(mp)
            writers.wait_for(200)
            dd_more(20)
            assert not writers.errors, writers.errors

            c2 = {"a": out / "c2-a.img", "b": out / "c2-b.img"}
            invoked = time.monotonic_ns()
            job2 = backup(
                mp, "--wait", "--target", f"a.img={c2['a']}", "--target", f"b.img={c2['b']}"
            )
            returned = time.monotonic_ns()
            assert job2 != job1
            assert record(c2["a"])["status"] == record(c2["b"])["status"] == "complete"
            writers.wait_for(200)
            dd_more(5)
        assert not writers.errors, writers.errors
        stop.touch()
        assert dd.wait(JOB_END_S) == 0, "the dd loop failed"
    finally:
        if dd.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(dd.pid, signal.SIGKILL)
            dd.wait(TIMEOUT)
        if dd.stderr is not None:
            dd.stderr.close()

    jobs = {(j["id"], j["image"]): j["state"] for j in status(mp)["jobs"]}
    assert jobs == {
        (job1, "a.img"): "cancelled",
        (job1, "b.img"): "cancelled",
        (job2, "a.img"): "complete",
        (job2, "b.img"): "complete",
    }
    unmount_when_released(mp)
    wait_until(lambda: pid_gone(pid), JOB_END_S, "the daemon to exit after unmount")

    cut = writes_in(c2["a"].read_bytes(), 0, initial_a, writers.log[0], "c2-a.img")
    check_point_in_time({0: cut}, writers.log, invoked, returned, "the backup after cancel")
    check_final(a, 0, initial_a, writers.log[0])
    # b: dd wrote only the pattern into its first 4 MiB; anything else is the old data.
    written = pattern.read_bytes()
    for path in (c2["b"], b):
        data = path.read_bytes()
        assert data[4 * MiB :] == initial_b[4 * MiB :], path.name
        for k in range(64):
            chunk = data[k * 64 * KiB : (k + 1) * 64 * KiB]
            assert chunk in (written, initial_b[k * 64 * KiB : (k + 1) * 64 * KiB]), (path.name, k)
    assert b.read_bytes()[: 64 * KiB] == written, "dd's first write is not in the source"


def test_backup_bad_input(daemons: CowfsRunner, tmp_path: Path) -> None:
    """Each refused `cowfs backup` exits 2 with one line, prints no job id and creates
    nothing: no target, no record, no temporary file; the mount goes on serving and a
    good backup afterwards completes."""
    a = make_image(tmp_path / "a.img", SIZE, seed=12)
    b = make_image(tmp_path / "b.img", SIZE // 2, seed=13)
    # A bitmap of b made inconsistent by a write outside cowfs before the mount.
    ok("bitmap", "add", b, "stale")
    last = b.stat().st_mtime_ns
    wait_until(lambda: time.time_ns() > last + 50_000_000, 5, "the clock to pass b's mtime")
    with open(b, "r+b") as f:
        f.write(b"outside cowfs")
    out = tmp_path / "t"
    out.mkdir()
    existing = out / "exists.img"
    existing.write_bytes(b"keep me" * 100)
    hard = out / "hard.img"
    os.link(b, hard)
    mp = tmp_path / "mnt"
    daemons.serve(mp, a, b)
    (stale,) = [
        bm for img in status(mp)["images"] if img["name"] == "b.img" for bm in img["bitmaps"]
    ]
    assert stale["name"] == "stale" and stale["consistent"] is False

    sources = {a: sha(a), b: sha(b)}
    x = out / "x.qcow2"

    def refused(what: str, *args: str | os.PathLike) -> None:
        names = sorted(os.listdir(out))
        result = run_cowfs("backup", *args)
        assert_refused(result, what)
        assert sorted(os.listdir(out)) == names, (
            f"{what}: created {set(os.listdir(out)) - set(names)}"
        )
        assert existing.read_bytes() == b"keep me" * 100, what
        for source, digest in sources.items():
            assert sha(source) == digest, f"{what}: changed {source.name}"

    refused("no cowfs mount there", tmp_path, "--target", x)
    refused("unknown image", mp, "--target", f"nosuch.img={x}")
    refused(
        "unknown image beside a good one",
        mp,
        "--target",
        f"a.img={x}",
        "--target",
        f"c.img={out / 'y.img'}",
    )
    refused("bare PATH on a mount of several images", mp, "--target", x)
    refused("existing target", mp, "--target", f"a.img={existing}")
    refused(
        "existing target beside a good one",
        mp,
        "--target",
        f"a.img={x}",
        "--target",
        f"b.img={existing}",
    )
    refused("target is the image itself", mp, "--force", "--target", f"a.img={a}")
    refused("target is the other image", mp, "--force", "--target", f"a.img={b}")
    refused("target is a hard link of the other image", mp, "--force", "--target", f"a.img={hard}")
    refused(
        "incremental without the bitmap",
        mp,
        "--sync",
        "incremental",
        "--bitmap",
        "nosuch",
        "--target",
        f"a.img={x}",
    )
    refused(
        "incremental with an inconsistent bitmap",
        mp,
        "--sync",
        "incremental",
        "--bitmap",
        "stale",
        "--target",
        f"b.img={x}",
    )

    busy = out / "busy.img"
    job = backup(mp, "--speed", SLOW, "--target", f"a.img={busy}")
    assert any(j["id"] == job and j["state"] == "running" for j in status(mp)["jobs"])
    refused("image with a running job", mp, "--target", f"a.img={x}")
    refused(
        "image with a running job, with a free one",
        mp,
        "--target",
        f"a.img={x}",
        "--target",
        f"b.img={out / 'y.img'}",
    )
    ok("cancel", mp, str(job))
    assert wait_ended(busy)["status"] == "cancelled"
    assert status(mp)["mounted"] is True

    good = {"a": out / "good-a.img", "b": out / "good-b.img"}
    backup(mp, "--wait", "--target", f"a.img={good['a']}", "--target", f"b.img={good['b']}")
    assert files_equal(good["a"], a) and files_equal(good["b"], b)


def test_backup_unknown_image_name_on_a_mount_of_one_image(
    daemons: CowfsRunner, tmp_path: Path
) -> None:
    """NAME=PATH is fine on a mount of one image, but only with that image's name: an
    unknown NAME is bad input there too (a typo must not become a target file named
    `NAME=PATH`). Run from the targets' directory, so that a wrong reading of the
    relative PATH lands where the test looks."""
    a = make_image(tmp_path / "a.img", SIZE // 4, seed=21)
    out = tmp_path / "t"
    out.mkdir()
    mp = tmp_path / "mnt"
    daemons.serve(mp, a)
    for option in ("--target", "--backing"):
        args = ["--target", "a.img=ok.qcow2"] if option == "--backing" else []
        result = subprocess.run(
            [*COWFS, "backup", str(mp), *args, option, "nosuch.img=x.qcow2"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=out,
        )
        assert_refused(result, f"{option} with an unknown image name")
        assert os.listdir(out) == [], f"{option}: created {os.listdir(out)}"
    assert status(mp)["jobs"] == []


def test_mount_bad_input(daemons: CowfsRunner, tmp_path: Path) -> None:
    """`cowfs mount` of several images: the same basename twice, a missing image, or a
    target with several images exits 2 with one line and mounts nothing."""
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    one = make_image(tmp_path / "d1" / "disk.img", SIZE // 4, seed=14)
    two = make_image(tmp_path / "d2" / "disk.img", SIZE // 4, seed=15)
    other = make_image(tmp_path / "d2" / "other.img", SIZE // 4, seed=16)
    target = tmp_path / "target.img"
    cases = {
        "same basename": [one, two],
        "the same image twice": [other, other],
        "a missing image": [one, tmp_path / "d2" / "missing.img"],
        "a target with several images": [one, other],
    }
    for n, (what, images) in enumerate(cases.items()):
        mp = tmp_path / f"mnt{n}"
        before = {d: sorted(os.listdir(tmp_path / d)) for d in ("d1", "d2")}
        options = ("--target", target) if "target" in what else ()
        mp.mkdir()
        result = run_cowfs("mount", *images, mp, *options)
        daemons.adopt(mp, images[0])  # a daemon that came up anyway goes at teardown
        assert_refused(result, what)
        assert not is_mounted(mp), what
        assert os.listdir(mp) == [], what
        assert not target.exists() and not (tmp_path / "target.img.cowfs.json").exists(), what
        assert {d: sorted(os.listdir(tmp_path / d)) for d in ("d1", "d2")} == before, what


def test_unmount_bad_input(tmp_path: Path) -> None:
    """`cowfs unmount` of a directory that is no cowfs mount, or of nothing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(run_cowfs("unmount", empty), "an empty directory")
    assert_refused(run_cowfs("unmount", tmp_path / "missing"), "a missing directory")


def test_unmount_refuses_while_a_job_runs_or_a_file_is_open(
    daemons: CowfsRunner, tmp_path: Path
) -> None:
    """`cowfs unmount` exits 2 and leaves the mount and its job alone while a job runs or
    a live file is open; once neither holds, it unmounts and the daemon exits."""
    a = make_image(tmp_path / "a.img", SIZE, seed=17)
    mp = tmp_path / "mnt"
    pid = daemons.serve(mp, a).pid
    target = tmp_path / "u.img"
    job = backup(mp, "--speed", SLOW, "--target", target)  # bare PATH: one image

    assert_refused(run_cowfs("unmount", mp), "a job runs")
    assert is_mounted(mp) and not pid_gone(pid)
    assert [j["state"] for j in status(mp)["jobs"] if j["id"] == job] == ["running"]

    ok("cancel", mp)
    assert wait_ended(target)["status"] == "cancelled"
    fd = os.open(mp / "a.img", os.O_RDONLY)
    try:
        assert_refused(run_cowfs("unmount", mp), "a live file is open")
        assert is_mounted(mp) and not pid_gone(pid)
        assert len(os.pread(fd, 4096, 0)) == 4096, "the live file must keep working"
    finally:
        os.close(fd)
    unmount_when_released(mp)
    wait_until(lambda: pid_gone(pid), JOB_END_S, "the daemon to exit after unmount")


def test_unmount_without_job_and_after_a_complete_one(daemons: CowfsRunner, tmp_path: Path) -> None:
    """Nothing holds the mount: `cowfs unmount` succeeds at once, also right after a job
    completed on it (nothing of the test ever opened a live file here)."""
    a = make_image(tmp_path / "a.img", SIZE // 2, seed=18)
    b = make_image(tmp_path / "b.img", SIZE // 2, seed=19)
    mp = tmp_path / "mnt"
    pid = daemons.serve(mp, a, b).pid
    ok("unmount", mp)
    assert not is_mounted(mp)
    wait_until(lambda: pid_gone(pid), JOB_END_S, "the daemon to exit after unmount")

    pid = daemons.serve(mp, a).pid
    target = tmp_path / "done.img"
    backup(mp, "--wait", "--target", f"a.img={target}")  # NAME=PATH on a mount of one image
    assert record(target)["status"] == "complete"
    ok("unmount", mp)
    assert not is_mounted(mp)
    wait_until(lambda: pid_gone(pid), JOB_END_S, "the daemon to exit after unmount")
    assert files_equal(target, a)


def test_finish_lets_the_running_job_finish(daemons: CowfsRunner, tmp_path: Path) -> None:
    """`cowfs finish` unmounts a mount whose job still runs and waits for the job: the
    job stays reachable by its mountpoint (set-speed) until it is complete."""
    a = make_image(tmp_path / "a.img", SIZE, seed=20)
    mp = tmp_path / "mnt"
    pid = daemons.serve(mp, a).pid
    target = tmp_path / "f.img"
    backup(mp, "--speed", SLOW, "--target", target)
    proc = subprocess.Popen(
        [*COWFS, "finish", str(mp)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: not is_mounted(mp), JOB_END_S, "finish to unmount")
        assert record(target)["status"] == "running"
        ok("set-speed", mp, "0")
        stdout, stderr = proc.communicate(timeout=JOB_END_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, (stdout, stderr)
    assert record(target)["status"] == "complete"
    assert files_equal(target, a)
    wait_until(lambda: pid_gone(pid), JOB_END_S, "the daemon to exit")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_signals_end_the_mount(
    daemons: CowfsRunner, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM cancels the running jobs, unmounts and exits (records cancelled, bitmaps
    kept consistent); kill -9 leaves the running job's record incomplete, and the bitmaps
    are recovered from the dead mount's write-intent record: consistent, marked as
    recovered, and the next incremental over the full restores the source exactly."""
    a = make_image(tmp_path / "a.img", SIZE, seed=21)
    mp = tmp_path / "mnt"
    pid = daemons.serve(mp, a).pid
    full = tmp_path / "full.qcow2"
    backup(mp, "--wait", "--bitmap", "nightly", "--target", full)
    write_through(mp / "a.img", [(i * 65536, b"w" * 65536) for i in range(0, 128, 2)])
    running = tmp_path / "running.qcow2"
    backup(mp, "--speed", SLOW, "--sync", "incremental", "--bitmap", "nightly",
           "--backing", full, "--target", running)  # fmt: skip
    os.kill(pid, signum)
    wait_until(lambda: pid_gone(pid), JOB_END_S, "the daemon to exit")
    wait_until(lambda: not is_mounted(mp), JOB_END_S, "the mount to go away")
    listed = json.loads(ok("bitmap", "list", a, "--json").stdout)
    if signum == signal.SIGTERM:
        assert record(running)["status"] == "cancelled"
        assert [b["consistent"] for b in listed] == [True]
        return
    assert record(running)["status"] == "running"
    assert run_cowfs("info", running).returncode == 1
    assert [b["consistent"] for b in listed] == [True], listed
    assert listed[0]["recovered"] is not None and listed[0]["recovered"]["pid"] == pid, listed
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img to restore the next incremental")
    expected = tmp_path / "expected.img"  # the source is quiet: the next point in time
    shutil.copyfile(a, expected)
    retry = tmp_path / "retry.qcow2"
    options = ("--sync", "incremental", "--bitmap", "nightly", "--backing", str(full))
    daemons.mount(a, retry, *options, mountpoint=tmp_path / "mnt2")
    ok("finish", tmp_path / "mnt2")
    assert record(retry)["status"] == "complete"
    qemu_img_check(retry)
    assert restore(retry, tmp_path / "restored.img") == expected.read_bytes()


def test_bitmap_commands_reach_the_mount(daemons: CowfsRunner, tmp_path: Path) -> None:
    """`cowfs bitmap` on a mounted image acts through its daemon: a bitmap added while
    mounted records the writes after it; one a running job uses cannot be cleared."""
    a = make_image(tmp_path / "a.img", SIZE, seed=22)
    mp = tmp_path / "mnt"
    daemons.serve(mp, a)
    ok("bitmap", "add", a, "late")
    write_through(mp / "a.img", [(3 * 65536, b"x" * 100)])
    listed = {b["name"]: b for b in json.loads(ok("bitmap", "list", a, "--json").stdout)}
    assert listed["late"]["dirty_clusters"] == 1 and listed["late"]["consistent"]
    target = tmp_path / "t.img"
    backup(mp, "--speed", SLOW, "--bitmap", "late", "--target", target)
    assert_refused(run_cowfs("bitmap", "clear", a, "late"), "clear of a bitmap in use")
    ok("cancel", mp)
    assert wait_ended(target)["status"] == "cancelled"
    ok("bitmap", "remove", a, "late")
    assert json.loads(ok("bitmap", "list", a, "--json").stdout) == []
    unmount_when_released(mp)
