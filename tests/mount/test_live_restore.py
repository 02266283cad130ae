"""`cowfs restore TARGET DEST --live MOUNTPOINT`: DEST served read-write at once while it fills.

What a live restore promises, checked through real mounts from outside, as a user (or a
VM) meets it:

1. From the moment the command returns, the live file reads as the backup's image with
   every write made since, whatever the copier has done: readers check every read
   (unaligned, straddling clusters, O_DIRECT, past the end) against a model of the image
   while writers write (unaligned, partial and whole clusters, zeros), all at once and
   while the paced copier is far from done. In the end DEST alone is that image: its
   record says complete, the map is gone, `qemu-img compare` agrees. Once from a full
   backup of an odd size, ended by `cowfs unmount` (which waits for the copier), once
   from a 3-link incremental chain, left mounted until complete and written after that.
2. kill -9 after an fsync: the record says running, the map is there and holds every
   cluster written before the fsync; restore again resumes (bytes_resumed > 0, no
   mapped cluster copied again) and DEST is the image with the fsynced writes (the
   later ones: each cluster as before or after them). `--force` starts over.
3. A flipped bit in a backup cluster: reading it through the live file is EIO, `cowfs
   status` says failed and where, the record says failed, and the unmount still ends it.
4. Bad input is exit 2 with one line and changes nothing; unmount while the live file
   is open is refused.
5. A real VM (QEMU, TCG) boots from the live file right after the command returns: the
   guest reads known regions (checksums on its console), writes and syncs some blocks;
   DEST is then the backup with exactly the guest's writes.

Besides: writes aimed at the very clusters the copier has in flight (the backup's reads
slowed by faultfs) land after the copy, never under it; and the bugs found on the way
(at the end of the file): the record names the daemon, status says complete only once
the record does, a DEST inside the mountpoint is refused, a failed final record write
fails the restore.

Every daemon, mount and QEMU a test starts is torn down by fixtures, even on failure.
"""

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FaultyFS, make_image
from helpers.live_restore import (
    CLUSTER,
    WAIT_S,
    ImageModel,
    LiveRestore,
    LiveRestores,
    Workload,
    assert_restored,
    cluster_bytes,
    data_cluster,
    first_differences,
    flip_bit,
    make_chain,
    map_path,
    pick,
    pread_all,
    read_map,
)
from helpers.mounting import CowfsRunner, cowfs_mounts, ok, pid_gone, run_cowfs, wait_until
from helpers.mounts import info, record, tree
from helpers.sizes import MiB
from helpers.views import PAGE, assert_refused, read_direct
from helpers.vm import BOOT_S, GUEST_PRELUDE, Guest, GuestFiles, build_guest

SIZE = 64 * MiB
SPEED = "16M"
"""The copier needs 4 s for SIZE: far from done while the readers and writers run."""
READS, WRITES = 600, 200
"""How much the workload does before the test stops it (unless the copier got half-way
first, on a slow machine: then at least a tenth of that)."""
STATUS_KEYS = {
    "restore", "state", "bytes_done", "bytes_total", "bytes_copier", "bytes_on_demand",
    "bytes_resumed", "pid", "mounted", "live", "dest",
}  # fmt: skip


def clusters_of(offset: int, length: int) -> range:
    return range(offset // CLUSTER, (offset + max(1, length) - 1) // CLUSTER + 1)


def unmounted_complete(r: LiveRestore) -> None:
    """`cowfs unmount` ends the mount, waits for the copier and prints DEST's record."""
    result = r.unmount()
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"unmounted {r.mountpoint}", "complete"], result.stdout
    assert f"target: {r.dest} (raw)" in lines, result.stdout


# -- 1. readers and writers from the first moment ------------------------------------------------


@pytest.mark.parametrize(
    ("links", "size", "finish"),
    [(1, SIZE + 12345, "unmount"), (3, SIZE, "complete")],
    ids=["full-odd-size-then-unmount", "3-link-chain-until-complete"],
)
def test_readers_and_writers_from_the_first_moment(
    cowfs: CowfsRunner,
    restores: LiveRestores,
    tmp_path: Path,
    links: int,
    size: int,
    finish: str,
) -> None:
    source = make_image(tmp_path / "disk.img", size, seed=links)
    chain = make_chain(cowfs, source, tmp_path, links=links, seed=links)
    assert len(set(chain.images)) == links  # each incremental holds writes of its own
    dest = tmp_path / "restored.img"
    r = restores.start(chain.top, dest, tmp_path / "mnt", "--speed", SPEED)
    model = ImageModel(chain.image)
    polls: list[dict] = []
    with Workload(r.live, model, seed=links) as work:

        def enough() -> bool:
            work.check()
            polls.append(r.poll())
            st = polls[-1]
            work.hot = st["bytes_copier"]  # some requests go near the copier (roughly)
            if st["bytes_done"] >= st["bytes_total"] // 2:
                return True
            return work.reads >= READS and work.writes >= WRITES

        wait_until(enough, WAIT_S, "the readers and writers to do their share")
        st = r.status()  # `cowfs status --json` while they still run
    work.check()
    shares = (work.reads, work.writes, work.kinds, polls[-1])
    assert work.reads >= READS // 10 and work.writes >= WRITES // 10, shares
    assert set(st) >= STATUS_KEYS, sorted(STATUS_KEYS - set(st))
    assert st["restore"] is True and st["mounted"] is True, st
    assert (st["live"], st["dest"], st["pid"]) == (str(r.live), str(dest), r.pid), st
    assert st["state"] == "running", st
    assert st["bytes_total"] == size and st["bytes_resumed"] == 0, st
    assert st["bytes_copier"] < size * 3 // 4, f"the copier was not far from done: {st}"
    assert st["bytes_on_demand"] > 0, f"no read came before the copier: {st}"
    assert st["bytes_done"] >= st["bytes_copier"] + st["bytes_on_demand"], st
    human = ok("status", r.mountpoint).stdout.splitlines()
    assert human[0] == f"live restore: {r.live} (mounted), pid {r.pid}", human
    assert human[1] == "state: running", human

    if finish == "complete":  # still mounted: the copier ends on its own, DEST is the file
        st = r.wait_state("complete", "failed")
        assert st["state"] == "complete" and st["bytes_done"] == size and st["mounted"], st
        wait_until(lambda: record(dest)["status"] == "complete", 5, "the record to say so")
        wait_until(lambda: not map_path(dest).exists(), 5, "the map to go")
        assert info(dest) == (0, "complete")
        with Workload(r.live, model, seed=links + 10) as work:  # straight to DEST now
            work.wait_for(lambda: work.writes >= 50 and work.reads >= 50, "reads and writes")
        work.check()
        assert r.poll()["bytes_on_demand"] == st["bytes_on_demand"]  # nothing left to restore
        unmounted_complete(r)
    else:  # unmounted at once: the daemon copies the rest from the quiet backup, then exits
        unmount = r.start_unmount()
        st = r.poll()
        human = ok("status", r.mountpoint).stdout.splitlines()
        out, _ = unmount.communicate(timeout=WAIT_S)
        assert st["mounted"] is False and st["state"] == "running", st
        assert human[0] == (
            f"live restore: {r.live} (unmounted, copying what is left), pid {r.pid}"
        ), human
        assert unmount.returncode == 0, out
        assert out.splitlines()[:2] == [f"unmounted {r.mountpoint}", "complete"], out
        r.assert_gone()
    assert_restored(dest, bytes(model.data))
    rec = record(dest)
    assert rec["bytes_copier"] + rec["bytes_cbw"] <= size, rec  # each cluster copied once
    assert rec["source"] == str(chain.top), rec


def test_writes_at_the_copiers_frontier_win(
    cowfs: CowfsRunner, faulty: FaultyFS, restores: LiveRestores, tmp_path: Path
) -> None:
    """Writes into the very clusters the copier is copying: each must land after the
    copy (and win), never under it. The backup's reads are slowed (faultfs) so that
    each batch of the copier is in flight for tens of milliseconds, and every write
    aims at the batch being copied now (just past bytes_done, as no request runs ahead
    of the copier). The image is random: a cluster of zeros, which the copier skips,
    would hide a write lost under a copy."""
    size = 16 * MiB
    rng = random.Random(11)
    source = tmp_path / "disk.img"
    source.write_bytes(rng.randbytes(size))
    chain = make_chain(cowfs, source, faulty.backing, links=1, seed=11)
    top = faulty.path(chain.top.name)
    faulty.fail(chain.top.name, op="read", errno=0, delay=0.01)
    dest = tmp_path / "restored.img"
    r = restores.start(top, dest, tmp_path / "mnt")
    model = ImageModel(chain.image)
    waited = writes = 0
    fd = os.open(r.live, os.O_WRONLY)
    try:
        while (st := r.poll())["state"] == "running":
            c = min(size // CLUSTER - 1, st["bytes_done"] // CLUSTER + rng.randrange(16))
            if rng.random() < 0.7:
                offset, length = c * CLUSTER, CLUSTER
            else:
                offset = c * CLUSTER + rng.randrange(CLUSTER)
                length = min(rng.randint(1, CLUSTER), size - offset)
            data = rng.randbytes(length)
            started = time.monotonic()
            assert os.pwrite(fd, data, offset) == length
            waited += time.monotonic() - started > 0.004  # behind a copy in flight
            writes += 1
            model.apply(offset, data)
    finally:
        os.close(fd)
    assert st["state"] == "complete", st
    assert writes >= 10 and waited >= 3, f"{writes} writes, {waited} waited for a copy"
    unmounted_complete(r)
    assert_restored(dest, bytes(model.data))


# -- 2. kill -9 and restore again ---------------------------------------------------------------


def batch(
    rng: random.Random, size: int, lowest: int, count: int, avoid: set[int] = frozenset()
) -> list[tuple[int, bytes]]:
    """`count` writes of every kind (partial, straddling, whole clusters, zeros) of up to
    4 clusters, at or above `lowest` (ahead of the copier), none touching a cluster in
    `avoid` or one another write touches."""
    writes: list[tuple[int, bytes]] = []
    used = set(avoid)
    while len(writes) < count:
        kind, offset, length = pick(rng, size, reading=False)
        touched = set(clusters_of(offset, length))
        if offset < lowest or length > 4 * CLUSTER or touched & used:
            continue
        used |= touched
        zeros = kind == "whole" and len(writes) % 3 == 0
        writes.append((offset, bytes(length) if zeros else rng.randbytes(length)))
    return writes


def live_writes(
    live: Path, model: ImageModel, writes: list[tuple[int, bytes]], fsync: bool = False
) -> None:
    fd = os.open(live, os.O_WRONLY)
    try:
        for offset, data in writes:
            assert os.pwrite(fd, data, offset) == len(data)
            model.apply(offset, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_kill9_after_fsync_then_resume(
    cowfs: CowfsRunner, restores: LiveRestores, tmp_path: Path
) -> None:
    size = 32 * MiB
    source = make_image(tmp_path / "disk.img", size, seed=21)
    chain = make_chain(cowfs, source, tmp_path, links=2, seed=21)
    dest = tmp_path / "restored.img"
    mnt = tmp_path / "mnt"
    r = restores.start(chain.top, dest, mnt, "--speed", "4M")
    rng = random.Random(21)
    model = ImageModel(chain.image)
    # The copier's first MiB is in the map the fsync saves (for the check of a resume
    # that copies no mapped cluster again, below).
    wait_until(lambda: r.poll()["bytes_copier"] >= MiB, WAIT_S, "the copier to start")
    synced_writes = batch(rng, size, size // 2, 24)
    live_writes(r.live, model, synced_writes, fsync=True)  # these must survive it all
    synced = bytes(model.data)
    synced_clusters = {c for o, d in synced_writes for c in clusters_of(o, len(d))}
    later = batch(rng, size, size // 2, 12, avoid=synced_clusters)
    live_writes(r.live, model, later)  # not fsynced: each cluster as before or after them
    after = bytes(model.data)
    st = r.poll()
    assert st["state"] == "running" and st["bytes_copier"] < size // 2, st
    r.kill9()

    rec = record(dest)
    assert rec["status"] == "running", rec
    code, first = info(dest)
    assert code == 1 and first.startswith("incomplete"), (code, first)
    saved = read_map(dest, size)
    missing = sorted(c for c in synced_clusters if not saved[c])
    assert not missing, f"fsynced clusters not in the saved map: {missing}"
    # A cluster the map calls restored is never copied again: mark one the test never
    # wrote in DEST itself; the resumed restore must leave it alone.
    later_clusters = {c for w in later for c in _touched(w)}
    sentinel = next(
        c for c in range(len(saved)) if saved[c] and c not in synced_clusters | later_clusters
    )
    mark = b"NOT COPIED AGAIN" * (CLUSTER // 16)
    with open(dest, "r+b") as f:
        f.seek(sentinel * CLUSTER)
        f.write(mark)
    span = slice(sentinel * CLUSTER, (sentinel + 1) * CLUSTER)
    synced = synced[: span.start] + mark + synced[span.stop :]
    after = after[: span.start] + mark + after[span.stop :]

    r2 = restores.start(chain.top, dest, mnt, "--speed", SPEED)
    st = r2.status()
    resumed = cluster_bytes(saved, size)
    assert st["bytes_resumed"] == resumed > 0, (st, resumed)
    assert st["state"] == "running" and st["bytes_done"] >= resumed, st
    # Through the live file at once: the fsynced writes are there.
    fd = os.open(r2.live, os.O_RDONLY)
    try:
        for offset, data in synced_writes:
            for c in clusters_of(offset, len(data)):
                got = pread_all(fd, c * CLUSTER, CLUSTER)
                assert got == synced[c * CLUSTER : (c + 1) * CLUSTER], f"cluster {c} lost"
    finally:
        os.close(fd)
    unmounted_complete(r2)
    rec = record(dest)
    # Only what the map did not hold was restored again (no write came after the resume).
    assert rec["bytes_copier"] + rec["bytes_cbw"] == size - resumed, (rec, resumed)
    got = dest.read_bytes()
    for c in range(-(-size // CLUSTER)):
        span = slice(c * CLUSTER, (c + 1) * CLUSTER)
        if c in later_clusters:
            assert got[span] in (synced[span], after[span]), f"cluster {c}: torn or foreign"
        else:
            assert got[span] == synced[span], (c, first_differences(got[span], synced[span]))
    assert_restored(dest, got)  # complete, no map, and the check above said what it holds


def _touched(write: tuple[int, bytes]) -> set[int]:
    return set(clusters_of(write[0], len(write[1])))


def test_kill9_then_force_starts_over(
    cowfs: CowfsRunner, restores: LiveRestores, tmp_path: Path
) -> None:
    size = 16 * MiB
    source = make_image(tmp_path / "disk.img", size, seed=22)
    chain = make_chain(cowfs, source, tmp_path, links=1, seed=22)
    dest = tmp_path / "restored.img"
    mnt = tmp_path / "mnt"
    r = restores.start(chain.top, dest, mnt, "--speed", "2M")
    model = ImageModel(chain.image)
    live_writes(r.live, model, batch(random.Random(22), size, 0, 10), fsync=True)
    r.kill9()
    assert read_map(dest, size).any() and record(dest)["status"] == "running"

    r2 = restores.start(chain.top, dest, mnt, "--force", "--speed", "0")
    st = r2.status()
    assert st["bytes_resumed"] == 0, st
    unmounted_complete(r2)
    assert_restored(dest, chain.image)  # the writes before the kill are gone
    assert record(dest)["bytes_copier"] + record(dest)["bytes_cbw"] == size

    # A complete restore is no unfinished one: restoring over it again needs --force.
    before = tree(tmp_path)
    result = restores.run(chain.top, dest, mnt)
    line = assert_refused(result, "restore over a complete DEST")
    assert "--force" in line, line
    assert tree(tmp_path) == before and str(mnt) not in cowfs_mounts()


# -- 3. a corrupt backup cluster ------------------------------------------------------------


def test_corrupt_backup_cluster_is_eio_and_fails_the_restore(
    cowfs: CowfsRunner, restores: LiveRestores, tmp_path: Path
) -> None:
    size = 16 * MiB
    source = make_image(tmp_path / "disk.img", size, seed=31, holes=False)
    chain = make_chain(cowfs, source, tmp_path, links=1, seed=31)
    guest, host = data_cluster(chain.top, size * 3 // 4, chain.image)  # far ahead of the copier
    flip_bit(chain.top, host + 1000)
    dest = tmp_path / "restored.img"
    r = restores.start(chain.top, dest, tmp_path / "mnt", "--speed", "1M")
    assert r.poll()["state"] == "running"

    fd = os.open(r.live, os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as failed:
            read_direct(fd, guest + PAGE, PAGE)
        assert failed.value.errno == errno.EIO, failed.value
    finally:
        os.close(fd)
    st = r.status()
    assert st["state"] == "failed", st
    assert any(f"offset {guest}" in e and "checksum" in e for e in st["errors"]), st
    human = ok("status", r.mountpoint).stdout
    assert "state: failed" in human and f"offset {guest}" in human, human
    code, first = info(dest)
    assert (code, first) == (1, "failed"), (code, first)
    rec = record(dest)
    assert rec["status"] == "failed" and any(f"offset {guest}" in e for e in rec["errors"]), rec
    # Nothing of that cluster is served, by any kind of read.
    fd = os.open(r.live, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as failed:
            os.pread(fd, 100, guest + 777)
        assert failed.value.errno == errno.EIO, failed.value
    finally:
        os.close(fd)

    result = r.unmount()  # ends it: no process, no mount left
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout.splitlines()[:2] == [f"unmounted {r.mountpoint}", "failed"], result
    assert record(dest)["status"] == "failed"


# -- 4. bad input ---------------------------------------------------------------------------


def test_bad_input_is_refused_and_changes_nothing(
    cowfs: CowfsRunner, restores: LiveRestores, tmp_path: Path
) -> None:
    size = 4 * MiB
    source = make_image(tmp_path / "disk.img", size, seed=41)
    chain = make_chain(cowfs, source, tmp_path, links=2, seed=41)
    full, top = chain.links
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def refused(target: Path, dest: Path, mountpoint: Path, *options: str) -> str:
        before = tree(tmp_path)
        line = assert_refused(restores.run(target, dest, mountpoint, *options), str(options))
        assert tree(tmp_path) == before, f"{line} changed files"
        assert str(mountpoint) not in cowfs_mounts()
        return line

    line = refused(top, tmp_path / "new.img", mnt, "--format", "qcow2")
    assert "raw" in line, line

    existing = tmp_path / "existing.img"
    existing.write_bytes(b"precious" * 1000)
    line = refused(top, existing, mnt)
    assert str(existing) in line and "--force" in line, line

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("in the way")
    line = refused(top, tmp_path / "new.img", busy)
    assert "not empty" in line, line
    line = refused(top, tmp_path / "new.img", tmp_path / "nowhere")
    assert "does not exist" in line, line

    # An unfinished restore of another backup is no restore to resume.
    other = tmp_path / "other.img"
    r = restores.start(full, other, mnt, "--speed", "1M")
    r.kill9()
    assert record(other)["status"] == "running" and map_path(other).exists()
    line = refused(top, other, mnt)
    assert str(other) in line and "--force" in line, line

    # While a live restore runs: its mountpoint is busy, its DEST is taken.
    dest = tmp_path / "restored.img"
    r = restores.start(top, dest, mnt, "--speed", "2M")
    line = assert_refused(restores.run(top, tmp_path / "second.img", mnt), "busy mountpoint")
    assert "mount point" in line, line
    assert not (tmp_path / "second.img").exists()
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    line = assert_refused(restores.run(top, dest, mnt2), "DEST being restored")
    assert str(dest) in line, line
    assert str(mnt2) not in cowfs_mounts() and not os.listdir(mnt2)

    # The disk keeps its size: no truncation, and a write stops at its end (a short
    # write up to the end, as a block device's; nothing past it).
    expected = bytearray(chain.image)
    with pytest.raises(OSError) as failed:
        os.truncate(r.live, size // 2)
    assert failed.value.errno == errno.EPERM, failed.value
    with pytest.raises(OSError) as failed:
        open(r.live, "wb").close()  # O_TRUNC
    assert failed.value.errno == errno.EPERM, failed.value
    fd = os.open(r.live, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as failed:
            os.pwrite(fd, b"past the end", size + PAGE)
        assert failed.value.errno == errno.ENOSPC, failed.value
        tail = b"x" * 100
        try:
            written = os.pwrite(fd, tail, size - 50)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            written = 0
        assert 0 <= written <= 50, written
        expected[size - 50 : size - 50 + written] = tail[:written]
        assert r.live.stat().st_size == size and dest.stat().st_size == size

        # Unmount while the live file is open: refused, nothing ends.
        result = run_cowfs("unmount", r.mountpoint)
        line = assert_refused(result, "unmount with the live file open")
        assert "open" in line and "close it first" in line, line
        assert r.is_mounted() and not pid_gone(r.pid)
        assert r.poll()["mounted"] is True
    finally:
        os.close(fd)
    unmounted_complete(r)
    assert_restored(dest, bytes(expected))


# -- 5. a VM boots from the live file -----------------------------------------------------------

VM_SIZE = 32 * MiB
VM_SPEED = "512K"
"""A minute for VM_SIZE: whatever the guest reads past the first few MiB, it reads before
the copier, through copy on read."""
REGIONS = [(65536, 0, 16), (65536, 320, 16), (4096, 6915, 37), (65536, 496, 16)]
"""What the guest reads, as dd's (bs, skip, count): the first MiB, one at 20 MiB, 148 KiB
from an offset inside a cluster, and the last MiB."""
GUEST_WRITES = [("a", 4096, 6147), ("b", 65536, 448), ("c", 4096, 8130), ("d", 512, 61443)]
"""What the guest writes, as (payload, bs, seek): a page inside a cluster not yet
restored, a whole cluster, a page of the last MiB (which it has just read), a sector."""
PAYLOADS = {name: random.Random(name).randbytes(bs) for name, bs, _ in GUEST_WRITES}
READ_LINE = re.compile(r"cowfs-vm: read (\d) ([0-9a-f]{32})")
DONE = re.compile(r"cowfs-vm: done")

RESTORE_INIT = (
    GUEST_PRELUDE
    + f"""# The guest reads known regions of its disk, then writes and syncs some blocks.
i=0
for r in {" ".join(f'"{bs} {skip} {count}"' for bs, skip, count in REGIONS)}; do
    set -- $r
    if dd if=/dev/vda of=/tmp/r bs=$1 skip=$2 count=$3 iflag=direct 2>/tmp/err; then
        log "read $i $(md5sum /tmp/r | cut -d' ' -f1)"
    else
        log "FAILED read $i: $(cat /tmp/err)"
    fi
    i=$((i + 1))
done
for w in {" ".join(f'"{name} {bs} {seek}"' for name, bs, seek in GUEST_WRITES)}; do
    set -- $w
    dd if=/payload-$1 of=/dev/vda bs=$2 seek=$3 count=1 conv=notrunc,fsync oflag=direct \\
        2>/tmp/err || log "FAILED write $1: $(cat /tmp/err)"
done
log "done"
while :; do sleep 3600; done
"""
)


@pytest.fixture(scope="session")
def restore_guest(tmp_path_factory: pytest.TempPathFactory) -> GuestFiles:
    """The reading and writing guest's kernel and initramfs, built once a session."""
    payloads = [(f"payload-{name}", data) for name, data in PAYLOADS.items()]
    return build_guest(tmp_path_factory.mktemp("restore-guest"), RESTORE_INIT, payloads)


@pytest.fixture
def guests(restores: LiveRestores) -> Iterator[list[Guest]]:
    """QEMU guests, killed before the live restores they run on are torn down."""
    started: list[Guest] = []
    try:
        yield started
    finally:
        for guest in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                guest.kill()


def test_vm_boots_from_the_live_file(
    cowfs: CowfsRunner,
    restores: LiveRestores,
    guests: list[Guest],
    restore_guest: GuestFiles,
    tmp_path: Path,
) -> None:
    source = make_image(tmp_path / "vda.img", VM_SIZE, seed=51)
    chain = make_chain(cowfs, source, tmp_path, links=1, seed=51)
    dest = tmp_path / "vda-restored.img"
    r = restores.start(chain.top, dest, tmp_path / "mnt", "--speed", VM_SPEED)
    guest = Guest(restore_guest, r.live, tmp_path)
    guests.append(guest)

    guest.wait_for(DONE, BOOT_S)
    guest.check()
    sums = {int(m.group(1)): m.group(2) for m in READ_LINE.finditer(guest.text())}
    for i, (bs, skip, count) in enumerate(REGIONS):
        want = hashlib.md5(chain.image[bs * skip : bs * (skip + count)]).hexdigest()
        assert sums.get(i) == want, f"the guest read region {i} as {sums.get(i)}, not {want}"
    st = r.status()
    assert st["state"] == "running" and st["bytes_copier"] < VM_SIZE // 2, st
    assert st["bytes_on_demand"] >= 2 * MiB, f"the guest's reads were not copy on read: {st}"
    expected = bytearray(chain.image)
    for name, bs, seek in GUEST_WRITES:
        expected[bs * seek : bs * (seek + 1)] = PAYLOADS[name]
    # The guest's fsync (QEMU's flush) saved the map with the clusters it wrote.
    saved = read_map(dest, VM_SIZE)
    unsaved = [name for name, bs, seek in GUEST_WRITES if not saved[bs * seek // CLUSTER]]
    assert not unsaved, f"the guest's synced writes {unsaved} are not in the saved map"
    guest.stop()

    # The rest, read through the live file (copy on read finishes the restore early).
    fd = os.open(r.live, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in range(0, VM_SIZE, MiB):
            got = read_direct(fd, offset, MiB)
            want = bytes(expected[offset : offset + MiB])
            assert got == want, (offset, first_differences(got, want))
    finally:
        os.close(fd)
    unmounted_complete(r)
    assert_restored(dest, bytes(expected))


# -- found on the way (each failed before its fix) ---------------------------------------


def test_info_while_a_live_restore_runs(
    cowfs: CowfsRunner, restores: LiveRestores, tmp_path: Path
) -> None:
    source = make_image(tmp_path / "disk.img", 4 * MiB, seed=61)
    chain = make_chain(cowfs, source, tmp_path, links=1, seed=61)
    dest = tmp_path / "restored.img"
    r = restores.start(chain.top, dest, tmp_path / "mnt", "--speed", "256K")
    assert r.poll()["state"] == "running"
    code, first = info(dest)
    assert (code, first) == (1, f"incomplete: the job is still running (pid {r.pid})")
    assert json.loads(Path(f"{dest}.cowfs.json").read_text())["pid"] == r.pid


def test_status_says_complete_only_once_the_record_does(
    cowfs: CowfsRunner, faulty: FaultyFS, restores: LiveRestores, tmp_path: Path
) -> None:
    """The record's write made slow (faultfs delays the fsync of its temporary file) so
    that the window between the two is wide enough to see every time."""
    source = make_image(tmp_path / "disk.img", 4 * MiB, seed=62)
    chain = make_chain(cowfs, source, tmp_path, links=1, seed=62)
    dest = faulty.path("restored.img")
    faulty.fail("restored.img.cowfs.json.tmp", op="fsync", errno=0, delay=1.0)
    r = restores.start(chain.top, dest, tmp_path / "mnt")
    st = r.wait_state("complete", "failed")
    assert st["state"] == "complete", st
    rec, mapped = record(dest)["status"], map_path(dest).exists()
    assert (rec, mapped) == ("complete", False), f"status complete, record {rec}, map {mapped}"


def test_dest_inside_the_mountpoint_is_refused(
    cowfs: CowfsRunner, restores: LiveRestores, tmp_path: Path
) -> None:
    source = make_image(tmp_path / "disk.img", 4 * MiB, seed=63)
    chain = make_chain(cowfs, source, tmp_path, links=1, seed=63)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        result = restores.run(chain.top, mnt / "restored.img", mnt, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("`cowfs restore T MNT/restored.img --live MNT` hangs")
    line = assert_refused(result, "DEST inside the mountpoint")
    assert "inside" in line, line


def test_a_failed_final_record_write_ends_the_restore(
    cowfs: CowfsRunner, faulty: FaultyFS, restores: LiveRestores, tmp_path: Path
) -> None:
    source = make_image(tmp_path / "disk.img", 4 * MiB, seed=64)
    chain = make_chain(cowfs, source, tmp_path, links=1, seed=64)
    dest = faulty.path("restored.img")
    r = restores.start(chain.top, dest, tmp_path / "mnt", "--speed", "4M")
    faulty.fail("restored.img.cowfs.json.tmp", op="fsync")  # the next record write: EIO
    st = r.wait_state("complete", "failed")
    assert faulty.hits() >= 1
    try:
        result = run_cowfs("unmount", r.mountpoint, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"`cowfs unmount` hangs; status said {st['state']}, the record {record(dest)['status']}"
        )
    assert result.returncode in (0, 1), result.stderr
    r.assert_gone()
    # Every write of the record fails here, so it keeps saying running: incomplete, never
    # complete, and the map stays for a resume.
    assert (st["state"], record(dest)["status"]) == ("failed", "running")
    assert map_path(dest).exists()
