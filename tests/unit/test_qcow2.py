"""qcow2 targets (cowfs/target/qcow2.py), judged by QEMU's own tools.

Why: a backup is only as good as its restore, and qcow2 is written by hand here.
Every image must pass `qemu-img check` (no leaks, no corruptions) and read back
identical to the expected raw image (`qemu-img compare`, `qemu-img convert`),
whatever the cluster size, with two writer threads, zero clusters, compressed
clusters, a backing file, huge sparse images and rewrites.
"""

import os
import random
import shutil
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.qemu import assert_identical, check_clean, qemu_img, qemu_json

from cowfs.errors import CowfsError
from cowfs.target import Qcow2Target

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
RUNS = {4 * KiB: 300, 64 * KiB: 40, 1 * MiB: 8}
"""Runs of clusters written per image: enough to span several L2 tables, still fast."""

Op = tuple[int, bytes | int]  # (offset, data) or (offset, length of zeros)


def assert_info(image: Path, size: int, cluster_size: int) -> dict:
    info = qemu_json("info", image)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == -(-size // 512) * 512  # QEMU counts whole sectors
    assert info["cluster-size"] == cluster_size
    assert info["format-specific"]["data"]["compat"] == "1.1"  # qcow2 version 3
    assert info["format-specific"]["data"]["refcount-bits"] == 16
    return info


def cluster_data(rng: random.Random, length: int, compressible: bool) -> bytes:
    if compressible:  # a random pattern with runs of zeros: deflate shrinks it a lot
        return ((rng.randbytes(16) + bytes(48)) * -(-length // 64))[:length]
    return rng.randbytes(length)


def random_ops(
    rng: random.Random, size: int, cs: int, runs: int, compressible: float = 0.0
) -> list[Op]:
    """Writes as the copier makes them: runs of data clusters, zero clusters one by one."""
    clusters = -(-size // cs)
    chosen: set[int] = {clusters - 1}  # always the last, partial cluster
    for _ in range(runs):
        start = rng.randrange(clusters)
        chosen.update(range(start, min(start + rng.randint(1, 4), clusters)))
    ops: list[Op] = []
    run: list[int] = []
    for cluster in sorted(chosen) + [-1]:
        if run and (cluster != run[-1] + 1 or len(run) == 8):
            offset = run[0] * cs
            length = min(len(run) * cs, size - offset)
            if rng.random() < 0.25:
                ops.extend((c * cs, min(cs, size - c * cs)) for c in run)
            else:
                ops.append((offset, cluster_data(rng, length, rng.random() < compressible)))
            run = []
        run.append(cluster)
    rng.shuffle(ops)
    return ops


def apply(target: Qcow2Target, ops: list[Op]) -> None:
    """Two threads write disjoint halves at once, as the copier's workers do."""

    def work(part: list[Op]) -> None:
        for offset, what in part:
            if isinstance(what, int):
                target.write_zeroes(offset, what)
            else:
                target.write(offset, memoryview(what))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, [ops[0::2], ops[1::2]]))


def expected_raw(path: Path, size: int, ops: list[Op], base: Path | None = None) -> Path:
    """The raw image the target must equal: `base` (or zeros) with `ops` applied."""
    if base is None:
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        shutil.copyfile(base, path)
    with open(path, "r+b") as f:
        for offset, what in ops:
            os.pwrite(f.fileno(), bytes(what) if isinstance(what, int) else what, offset)
    return path


def image_size(rng: random.Random, cs: int) -> int:
    """Three L2 tables' worth of clusters, and a partial last cluster."""
    return 2 * cs * (cs // 8) + rng.randrange(1, cs)


@pytest.mark.parametrize("cs", sorted(RUNS))
@pytest.mark.parametrize("seed", range(3))
def test_plain_image_matches(tmp_path: Path, seed: int, cs: int) -> None:
    rng = random.Random(seed * 7919 + cs)
    size = image_size(rng, cs)
    ops = random_ops(rng, size, cs, RUNS[cs])
    image = tmp_path / "t.qcow2"
    target = Qcow2Target.create(image, size, cs)
    apply(target, ops)
    target.fsync()

    report = check_clean(image)
    assert report.get("compressed-clusters", 0) == 0
    assert_identical(image, expected_raw(tmp_path / "expected.raw", size, ops))
    assert_info(image, size, cs)
    data_clusters = sum(-(-len(w) // cs) for _, w in ops if not isinstance(w, int))
    assert report.get("allocated-clusters", 0) == data_clusters  # zero clusters stay unallocated
    target.close()


@pytest.mark.parametrize("cs", sorted(RUNS))
@pytest.mark.parametrize("seed", range(2))
def test_compressed_image_matches_and_is_small(tmp_path: Path, seed: int, cs: int) -> None:
    rng = random.Random(seed * 104729 + cs)
    size = image_size(rng, cs)
    ops = random_ops(rng, size, cs, RUNS[cs], compressible=0.8)
    image = tmp_path / "t.qcow2"
    target = Qcow2Target.create(image, size, cs, compress=True)
    apply(target, ops)
    target.fsync()
    target.close()

    report = check_clean(image)
    assert_identical(image, expected_raw(tmp_path / "expected.raw", size, ops))
    assert_info(image, size, cs)
    compressible = [w for _, w in ops if isinstance(w, bytes) and w[16:64] == bytes(48)]
    assert report.get("compressed-clusters", 0) >= sum(-(-len(w) // cs) for w in compressible)
    mapped = qemu_json("map", "-f", "qcow2", image)
    assert any(e["data"] and "offset" not in e for e in mapped)  # compressed: no plain offset
    random_bytes = sum(len(w) for _, w in ops if isinstance(w, bytes) and w not in compressible)
    compressible_bytes = sum(map(len, compressible))
    metadata = 16 * cs
    assert image.stat().st_size < random_bytes + compressible_bytes // 3 + metadata


def test_compressed_clusters_are_packed(tmp_path: Path) -> None:
    """Compressed clusters share host clusters and spill into the next one, as in QEMU."""
    cs, count = 64 * KiB, 300
    rng = random.Random(3)
    lengths = [
        rng.randrange(1, 300) if rng.random() < 0.5 else rng.randrange(cs // 2) + 1
        for _ in range(count)
    ]
    data = b"".join(rng.randbytes(n) + bytes(cs - n) for n in lengths)
    image = tmp_path / "t.qcow2"
    target = Qcow2Target.create(image, len(data), cs, compress=True)
    target.write(0, memoryview(data))
    target.fsync()
    target.close()
    assert check_clean(image).get("compressed-clusters") == count
    assert image.stat().st_size < sum(lengths) * 1.1 + 8 * cs  # packed: little slack
    assert qemu_img("convert", "-O", "raw", image, tmp_path / "out.raw").returncode == 0
    assert (tmp_path / "out.raw").read_bytes() == data


@pytest.mark.parametrize(("cs", "seed"), [(4 * KiB, 0), (64 * KiB, 1), (1 * MiB, 2)])
@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
@pytest.mark.parametrize("compress", [False, True])
def test_backing_chain(tmp_path: Path, cs: int, seed: int, base_format: str, compress: bool):
    """Written clusters come from the overlay, zero flags hide the base, the rest reads through."""
    rng = random.Random(seed)
    size = rng.randrange(12, 40) * cs + rng.randrange(1, cs)
    base_raw = tmp_path / "base.raw"
    base_raw.write_bytes(rng.randbytes(size))
    base = base_raw
    if base_format == "qcow2":
        base = tmp_path / "base.qcow2"
        assert qemu_img("convert", "-f", "raw", "-O", "qcow2", base_raw, base).returncode == 0
    ops: list[Op] = []
    while not any(isinstance(w, int) for _, w in ops):  # zero flags must be tested
        ops = random_ops(rng, size, cs, runs=size // cs // 3, compressible=0.5)

    overlay = tmp_path / "overlay.qcow2"
    target = Qcow2Target.create(
        overlay, size, cs, backing=Path(base.name), backing_format=base_format, compress=compress
    )
    apply(target, ops)
    target.fsync()
    target.close()

    check_clean(overlay)
    expected = expected_raw(tmp_path / "expected.raw", size, ops, base=base_raw)
    assert_identical(overlay, expected)
    info = assert_info(overlay, size, cs)
    assert info["backing-filename"] == base.name
    assert info["backing-filename-format"] == base_format
    restored = tmp_path / "restored.raw"
    assert qemu_img("convert", "-f", "qcow2", "-O", "raw", overlay, restored).returncode == 0
    assert restored.read_bytes() == expected.read_bytes() + bytes(-size % 512)  # whole sectors


@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB])
def test_huge_sparse_image_stays_small(tmp_path: Path, cs: int) -> None:
    """1 TiB virtual: file and memory grow with the clusters written, not the virtual size."""
    size = 1 * TiB
    rng = random.Random(cs)
    ops: list[Op] = [(0, rng.randbytes(cs)), (size // 2, rng.randbytes(3 * cs))]
    ops += [(size - cs, rng.randbytes(cs)), (size // 3 // cs * cs, cs)]
    image = tmp_path / "huge.qcow2"
    tracemalloc.start()
    target = Qcow2Target.create(image, size, cs)
    apply(target, ops)
    target.fsync()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    target.close()

    l1_bytes = size // cs // (cs // 8) * 8
    assert peak < 3 * l1_bytes + 4 * MiB  # the L1 table at flush, a few L2 tables, no more
    assert image.stat().st_size < l1_bytes + 32 * cs
    check_clean(image)
    assert_info(image, size, cs)
    assert_identical(image, expected_raw(tmp_path / "expected.raw", size, ops))


def test_repeated_fsync_and_a_growing_refcount_table(tmp_path: Path) -> None:
    """Each fsync leaves a valid image; 512-byte clusters make the refcount table move."""
    cs, size = 512, 12 * MiB + 100
    rng = random.Random(5)
    image = tmp_path / "t.qcow2"
    target = Qcow2Target.create(image, size, cs)
    check_clean(image)  # valid from creation on
    ops: list[Op] = []
    for start in range(0, size, 4 * MiB):
        ops.append((start, rng.randbytes(min(4 * MiB, size - start))))
        apply(target, ops[-1:])
        target.fsync()
        check_clean(image)
        assert_identical(image, expected_raw(tmp_path / "expected.raw", size, ops))
    target.close()


def test_rewrites_keep_refcounts_right(tmp_path: Path) -> None:
    """A cluster written again (data, compressed, zeros) is remapped without leaks."""
    cs, size = 4 * KiB, 64 * KiB - 100
    rng = random.Random(9)
    base = tmp_path / "base.raw"
    base.write_bytes(rng.randbytes(size))
    image = tmp_path / "t.qcow2"
    target = Qcow2Target.create(image, size, cs, backing=Path("base.raw"), compress=True)
    ops: list[Op] = []
    for _ in range(6):
        round_ops = random_ops(rng, size, cs, runs=6, compressible=0.7)
        apply(target, round_ops)
        ops += sorted(round_ops, key=lambda op: op[0])  # distinct clusters: order is free
        target.fsync()
        check_clean(image)
        assert_identical(image, expected_raw(tmp_path / "expected.raw", size, ops, base=base))
    target.close()


@pytest.mark.parametrize("size", [0, 1, 4096])
def test_tiny_images(tmp_path: Path, size: int) -> None:
    image = tmp_path / "t.qcow2"
    target = Qcow2Target.create(image, size, 4096)
    if size:
        target.write(0, memoryview(b"\xff" * size))
    target.close()
    check_clean(image)
    assert_info(image, size, 4096)
    assert_identical(image, expected_raw(tmp_path / "e.raw", size, [(0, b"\xff" * size)][:size]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_size": 4 * MiB}, "2 MiB"),
        ({"cluster_size": 256}, "512 B"),
        ({"cluster_size": 48 * KiB}, "power of two"),
        ({"cluster_size": 512, "size": TiB}, "L1 table"),
        ({"backing": Path("missing.raw")}, "not found"),
        ({"backing": Path("b.raw"), "backing_format": "qcow2; rm"}, "format"),
    ],
)
def test_refused_options(tmp_path: Path, kwargs: dict, message: str) -> None:
    (tmp_path / "b.raw").write_bytes(bytes(4096))
    options = {"size": GiB, "cluster_size": 64 * KiB} | kwargs
    with pytest.raises(CowfsError, match=message):
        Qcow2Target.create(tmp_path / "t.qcow2", **options)
    assert not (tmp_path / "t.qcow2").exists()


@pytest.mark.parametrize("compress", [False, True])
def test_three_threads_racing(tmp_path: Path, compress: bool, monkeypatch) -> None:
    """Two workers and the main thread, one cluster per call, racing for host clusters.

    Allocation yields the GIL in its middle, so that a missing lock shows up as two
    clusters sharing a host cluster, which `qemu-img check` reports.
    """
    grow = Qcow2Target._grow

    def yielding_grow(self: Qcow2Target, count: int, refcount: int) -> None:
        time.sleep(0)
        grow(self, count, refcount)

    monkeypatch.setattr(Qcow2Target, "_grow", yielding_grow)
    cs, count = 4 * KiB, 3000
    rng = random.Random(11)
    clusters = [rng.randbytes(64) * (cs // 64) for _ in range(count)]
    ops: list[Op] = [(i * cs, c if i % 5 else cs) for i, c in enumerate(clusters)]
    image = tmp_path / "t.qcow2"
    target = Qcow2Target.create(image, count * cs, cs, compress=compress)

    def work(part: list[Op]) -> None:
        for offset, what in part:
            if isinstance(what, int):
                target.write_zeroes(offset, what)
            else:
                target.write(offset, memoryview(what))

    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(work, ops[i::3]) for i in (0, 1)]
        work(ops[2::3])
        for future in done:
            future.result()
    target.fsync()
    target.close()
    check_clean(image)
    assert_identical(image, expected_raw(tmp_path / "expected.raw", count * cs, ops))
