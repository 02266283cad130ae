"""Point in time under random concurrent load, through real mounts.

Why: the guarantee (DESIGN.md, "The guarantee") holds only if copy-before-write
survives the races a guest produces: several writers at once, writes of any size
and alignment, writes sharing clusters with each other and with the copier, and a
shrinking truncate. Each test builds a seeded workload, runs it from threads of the
test process (os.pwrite / os.pread / truncate on the live file) while a rate-limited
copier is still working, and checks:

* the target is the source as it was before the mount, over exactly the
  point-in-time size (`full`, `top`); for `none`, it holds the old content of
  exactly the clusters a write or the truncate touched, and zeros elsewhere;
* the live file, and the source after unmount, equal the same operations applied
  to a bytearray (the model);
* zero clusters were not written: the target's allocation stays within the
  non-zero clusters it must hold.

Determinism under real concurrency: the workload runs in epochs, each a set of
threads joined before the next epoch starts. Within an epoch the threads own
disjoint byte ranges, but the ranges are cut at unaligned offsets and often abut,
so different threads hit the same cluster at the same time; one thread's own writes
may overlap each other (that thread orders them), and epochs overlap each other
freely. A truncate runs concurrently with writes below the smaller of the old and
new size. Every interleaving therefore yields the same bytes, and the model is the
epochs applied in order. Some writers open with O_DIRECT, which makes the kernel
send one large write as several concurrent FUSE requests (buffered writes to one
inode are serialised by the kernel); a reader thread checks, during each epoch,
bytes that the epoch does not change.
"""

import json
import os
import random
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import Mounted, run_cowfs

KiB, MiB = 1 << 10, 1 << 20
WRITERS = 4
COPY_SECONDS = 1.5
"""The copier's speed is set so that a full copy takes about this long: long enough
that the whole workload overlaps it, short enough that finish does not wait long."""
ALLOCATION_SLACK = 256 * KiB
"""Filesystem metadata (extent tree blocks) counted in st_blocks beyond the data."""


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass
class Epoch:
    """Operations that run concurrently; their results do not depend on the order."""

    writes: list[list[Write]]  # per writer thread, in that thread's order
    truncate: int | None = None  # new size, set by one more thread during the writes
    stable: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) unchanged


@dataclass
class Workload:
    epochs: list[Epoch]
    direct: list[bool]  # per writer thread: open the live file with O_DIRECT
    ftruncate: bool  # truncate through an open fd rather than the path
    island: tuple[int, int]  # whole clusters no write touches (for `none`: must stay zero)


def _write_size(rng: random.Random) -> int:
    """Log-uniform from 1 byte to 1 MiB: as many tiny writes as huge ones."""
    return min(MiB, max(1, int(2 ** rng.uniform(0, 20.01))))


def _plan_writes(
    rng: random.Random,
    lo: int,
    hi: int,
    cluster: int,
    island: tuple[int, int],
    tail: Write | None = None,
) -> tuple[list[list[Write]], list[tuple[int, int]]]:
    """Writer threads' writes in [lo, hi) but not in the island [start, end): disjoint
    between threads, often abutting at unaligned offsets (so threads share clusters),
    overlapping within one thread. Also returns some of the ranges left unwritten."""
    writes: list[list[Write]] = [[] for _ in range(WRITERS)]
    gaps: list[tuple[int, int]] = []
    pos = lo + rng.randrange(0, min(cluster, max(1, hi - lo)))
    if pos > lo:
        gaps.append((lo, pos - lo))
    while pos < hi:
        if rng.random() < 0.2:  # straddle a cluster boundary by a few bytes
            start = (pos // cluster + 1) * cluster - rng.randrange(1, 16)
            pos = start if pos <= start < hi else pos
        if island[0] <= pos < island[1]:
            pos = island[1]
            continue
        length = min(_write_size(rng), hi - pos)
        if pos < island[0] < pos + length:
            length = island[0] - pos
        owner = writes[rng.randrange(WRITERS)]
        owner.append(Write(pos, rng.randbytes(length)))
        if length > 1 and rng.random() < 0.3:  # the owner overwrites part of it again
            a = rng.randrange(pos, pos + length)
            b = rng.randrange(a + 1, pos + length + 1)
            owner.append(Write(a, rng.randbytes(b - a)))
        pos += length
        roll = rng.random()
        gap = 0 if roll < 0.4 else rng.randrange(1, cluster) if roll < 0.7 else rng.randrange(MiB)
        gap = min(gap, max(0, hi - pos))
        if gap:
            gaps.append((pos, gap))
        pos += gap
    if tail is not None:
        writes[rng.randrange(WRITERS)].append(tail)
    return writes, gaps


def plan_workload(rng: random.Random, size: int, cluster: int) -> Workload:
    """Epochs: random writes and one on the last partial cluster, a shrinking truncate
    with writes below it, writes over the truncated area, and perhaps a re-grow.

    No write before the truncate touches the clusters between `reserve` and the last
    one (at least two full clusters, the end of which the copier reaches last), so
    only the truncate's copy-before-write can save their old content. No write at all
    touches the island: whole clusters below the truncate, so that `none` must leave
    them zero although writes end right before and start right after them."""
    epochs: list[Epoch] = []
    whole = size - size % cluster
    reserve = whole - rng.randrange(max(size // 5, 2 * cluster), max(size // 3, 2 * cluster) + 1)
    # The last partial cluster of the point in time, perhaps growing the file.
    tail_start = size - rng.randrange(1, min(size % cluster, 4 * KiB) + 1)
    island_clusters = 3 if cluster <= 64 * KiB else 1
    room = (reserve - 64 * KiB) // cluster - island_clusters  # island ends below the shrink
    island_start = rng.randrange(0, room + 1) * cluster if room >= 0 else 0
    island = (island_start, island_start + island_clusters * cluster if room >= 0 else 0)
    tail = Write(tail_start, rng.randbytes(size - tail_start + rng.choice([0, 0, 1, 5000])))
    edges: list[list[Write]] = [[] for _ in range(WRITERS)]  # right beside the island
    if island[0] > 0:
        start = max(0, island[0] - rng.randrange(1, 5000))
        edges[0].append(Write(start, rng.randbytes(island[0] - start)))
    if island[1] > 0:
        edges[1].append(Write(island[1], rng.randbytes(rng.randrange(1, 5000))))
    epochs.append(Epoch(edges))
    for tail_write in (tail, None):
        writes, gaps = _plan_writes(rng, 0, reserve, cluster, island, tail_write)
        epochs.append(Epoch(writes, stable=gaps))

    shrink = rng.randrange(max(0, reserve - 64 * KiB), reserve)  # unaligned
    writes, gaps = _plan_writes(rng, 0, shrink, cluster, island)
    epochs.append(Epoch(writes, truncate=shrink, stable=gaps))
    current = shrink
    # Writes over what the truncate cut off (its clusters are done) and past the new end.
    writes, gaps = _plan_writes(
        rng, shrink // 2, min(size + MiB, shrink + 2 * MiB), cluster, island
    )
    epochs.append(Epoch(writes, stable=gaps))
    current = max([current] + [w.end for t in writes for w in t])

    if rng.random() < 0.7:  # re-grow, below or beyond the point-in-time size
        regrow = max(current, size) + rng.randrange(1, MiB)
        if current < size and rng.random() < 0.5:
            regrow = rng.randrange(current + 1, size + 1)
        writes, gaps = _plan_writes(rng, 0, current, cluster, island)
        epochs.append(Epoch(writes, truncate=regrow, stable=gaps))
        current = regrow
    writes, gaps = _plan_writes(rng, 0, current, cluster, island)
    epochs.append(Epoch(writes, stable=gaps))
    direct = [rng.random() < 0.5 for _ in range(WRITERS)]
    return Workload(epochs, direct, rng.random() < 0.5, island)


def apply(model: bytearray, epoch: Epoch) -> None:
    """The epoch's effect on a plain copy."""
    for thread in epoch.writes:
        for w in thread:
            if w.end > len(model):
                model.extend(bytes(w.end - len(model)))
            model[w.offset : w.end] = w.data
    if epoch.truncate is not None:
        if epoch.truncate < len(model):
            del model[epoch.truncate :]
        else:
            model.extend(bytes(epoch.truncate - len(model)))


def run_epoch(pool: ThreadPoolExecutor, live: Path, epoch: Epoch, wl: Workload, model: bytes):
    """Run the epoch's threads against the live file and wait for all of them."""

    def writer(writes: list[Write], direct: bool) -> None:
        fd = os.open(live, os.O_RDWR | (os.O_DIRECT if direct else 0))
        try:
            for w in writes:
                done = os.pwrite(fd, w.data, w.offset)
                assert done == len(w.data), f"short write at {w.offset}: {done}/{len(w.data)}"
        finally:
            os.close(fd)

    def truncater(size: int) -> None:
        if wl.ftruncate:
            fd = os.open(live, os.O_RDWR)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        else:
            os.truncate(live, size)

    def reader(ranges: list[tuple[int, int]]) -> None:
        fd = os.open(live, os.O_RDONLY)
        try:
            for offset, length in ranges:
                got = os.pread(fd, length, offset)
                assert got == model[offset : offset + length], f"read at {offset} during writes"
        finally:
            os.close(fd)

    sample = random.Random(len(model)).sample
    limit = min(len(model), epoch.truncate if epoch.truncate is not None else len(model))
    stable = [(o, min(n, 256 * KiB, limit - o)) for o, n in epoch.stable if o < limit]
    tasks: list[Callable[[], None]] = [
        lambda ws=ws, d=d: writer(ws, d) for ws, d in zip(epoch.writes, wl.direct, strict=True)
    ]
    checks = sample(stable, min(8, len(stable)))
    tasks.append(lambda: reader(checks))
    if epoch.truncate is not None:
        tasks.append(lambda size=epoch.truncate: truncater(size))
    for future in [pool.submit(task) for task in tasks]:
        future.result()


def clusters_touched(wl: Workload, pit_size: int, cluster: int) -> set[int]:
    """Clusters below the point-in-time size that a write or a shrinking truncate changed."""
    touched: set[int] = set()
    for epoch in wl.epochs:
        for w in (w for thread in epoch.writes for w in thread):
            end = min(w.end, pit_size)
            if w.offset < end:
                touched.update(range(w.offset // cluster, (end - 1) // cluster + 1))
        if epoch.truncate is not None and epoch.truncate < pit_size:
            touched.update(range(epoch.truncate // cluster, -(-pit_size // cluster)))
    return touched


def nonzero_clusters(data: bytes, cluster: int) -> set[int]:
    return {i // cluster for i in range(0, len(data), cluster) if any(data[i : i + cluster])}


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def data_bytes(clusters: set[int], size: int, cluster: int) -> int:
    """Bytes of these clusters below `size`, each rounded up to filesystem blocks."""
    return sum(-(-min(cluster, size - c * cluster) // 4096) * 4096 for c in clusters)


def record(target: Path) -> dict:
    return json.loads(run_cowfs("info", target, "--json").stdout)


def read_all(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.pread(fd, 4 * MiB, sum(map(len, chunks))):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


CASES = [
    (sync, cluster, seed)
    for sync in ("full", "top", "none")
    for cluster in (4 * KiB, 64 * KiB, MiB)
    for seed in range(3)
]


@pytest.mark.parametrize(
    ("sync", "cluster", "seed"),
    CASES,
    ids=[f"{s}-{c // KiB}K-seed{n}" for s, c, n in CASES],
)
def test_random_concurrent_writes_keep_point_in_time(cowfs, tmp_path, sync, cluster, seed):
    rng = random.Random(f"{sync}-{cluster}-{seed}")
    size = rng.randrange(4 * MiB, 12 * MiB)
    if size % cluster == 0:
        size += rng.randrange(1, cluster)
    source = make_image(tmp_path / "disk.img", size, seed=rng.randrange(1 << 30))
    with open(source, "r+b") as f:  # data that only copy-before-write can save in time:
        f.seek(size - size % cluster)  # the last partial cluster (the tail write's)
        f.write(rng.randbytes(size % cluster))
        f.seek(size - size % cluster - cluster)  # and the last whole one (the truncate's)
        f.write(rng.randbytes(min(cluster, 64 * KiB)))
    wl = plan_workload(rng, size, cluster)
    with open(source, "r+b") as f:  # and the island, which `none` must not copy
        f.seek(wl.island[0])
        f.write(rng.randbytes(wl.island[1] - wl.island[0]))
    before = tmp_path / "before.img"
    shutil.copyfile(source, before)
    old = before.read_bytes()
    model = bytearray(old)

    speed = str(int(size / COPY_SECONDS))
    m: Mounted = cowfs.mount(
        source, tmp_path / "target.img", "--sync", sync, "--cluster-size", str(cluster),
        "--speed", speed,
    )  # fmt: skip
    if sync != "none":
        st = m.status()
        assert st["bytes_done"] < st["bytes_total"], "the copier finished before the writes"
    with ThreadPoolExecutor(WRITERS + 2) as pool:
        for epoch in wl.epochs:
            run_epoch(pool, m.live, epoch, wl, bytes(model))
            apply(model, epoch)
    assert os.stat(m.live).st_size == len(model)
    assert read_all(m.live) == model, "the live file differs from the model"

    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("complete"), result.stdout
    rec = record(m.target)
    assert rec["status"] == "complete" and rec["size"] == size
    assert rec["bytes_cbw"] > 0, "no write needed copy-before-write: the test proved nothing"
    assert read_all(source) == model, "the source differs from the model after unmount"
    assert os.stat(m.target).st_size == size

    target = read_all(m.target)
    if sync == "none":
        touched = clusters_touched(wl, size, cluster)
        for i in range(0, size, cluster):
            c, got = i // cluster, target[i : i + cluster]
            want = old[i : i + cluster] if c in touched else bytes(len(got))
            assert got == want, f"target cluster {c} (touched: {c in touched}) is wrong"
        expected = nonzero_clusters(old, cluster) & touched
    else:
        assert target == old, "the target is not the source at the point in time"
        assert files_equal(m.target, before)
        expected = nonzero_clusters(old, cluster)
    # Zero clusters are not written: the target holds no more than its non-zero clusters.
    assert allocated(m.target) <= data_bytes(expected, size, cluster) + ALLOCATION_SLACK


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_holes_and_zero_clusters_stay_holes_in_the_target(cowfs, tmp_path, sync):
    """A mostly empty image: 1 MiB of data, 4 MiB of written (allocated) zeros, the rest
    holes. Writes hit all three kinds; the target must allocate no more than the data."""
    size = 32 * MiB + 12345
    rng = random.Random(sync)
    source = tmp_path / "disk.img"
    with open(source, "wb") as f:
        f.truncate(size)
        for offset in (3 * MiB + 777, 11 * MiB, 20 * MiB + 1, size - 256 * KiB):
            f.seek(offset)
            f.write(rng.randbytes(256 * KiB))
        f.seek(14 * MiB)
        f.write(bytes(4 * MiB))
    assert allocated(source) >= 5 * MiB, "the zero run should be allocated in the source"
    before = tmp_path / "before.img"
    shutil.copyfile(source, before)
    old = before.read_bytes()

    writes = [
        Write(offset, rng.randbytes(300 * KiB))
        for offset in (3 * MiB, 11 * MiB + 5, 13 * MiB + 999, 14 * MiB + 3, 16 * MiB)
    ] + [Write(size - 9, rng.randbytes(9))]
    model = bytearray(old)
    m = cowfs.mount(source, tmp_path / "target.img", "--sync", sync)
    fd = os.open(m.live, os.O_RDWR)
    try:
        for w in writes:
            assert os.pwrite(fd, w.data, w.offset) == len(w.data)
            model[w.offset : w.end] = w.data
    finally:
        os.close(fd)
    result = m.finish()
    assert result.stdout.startswith("complete"), result.stdout + result.stderr
    assert read_all(source) == model
    target = read_all(m.target)
    assert len(target) == size
    if sync == "none":  # the old content of the overwritten clusters, zeros elsewhere
        cluster = 64 * KiB
        touched = clusters_touched(Workload([Epoch([writes])], [], False, (0, 0)), size, cluster)
        for i in range(0, size, cluster):
            got = target[i : i + cluster]
            want = old[i : i + cluster] if i // cluster in touched else bytes(len(got))
            assert got == want, f"target cluster {i // cluster} is wrong"
    else:
        assert target == old
    assert allocated(m.target) <= MiB + 2 * 64 * KiB + ALLOCATION_SLACK, (
        f"{allocated(m.target)} bytes allocated for 1 MiB of data"
    )
