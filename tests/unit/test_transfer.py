"""Moving clusters (transfer.copy_range) and finding data (extents.data_clusters).

Why: these two decide what lands in the target. copy_range must write every
non-zero cluster exactly as the source holds it, skip all-zero clusters (the
target stays sparse), coalesce runs into large writes, handle the last partial
cluster and a source that ends early; data_clusters must never call data a hole
(that would lose data in `top` mode and mark it done before it was copied).
"""

import errno
import os
import random
from pathlib import Path

import pytest

import cowfs.extents
from cowfs.extents import data_clusters
from cowfs.transfer import copy_range

CS = 4096


class Recorder:
    """A target that records calls and materialises the writes into a bytearray."""

    def __init__(self, size: int) -> None:
        self.image = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, len(data)))
        self.image[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self.zeroes.append((offset, length))


def make_file(path: Path, content: bytes) -> int:
    path.write_bytes(content)
    return os.open(path, os.O_RDONLY)


def cluster(fill: int, length: int = CS) -> bytes:
    return bytes([fill]) * length


# -- copy_range ------------------------------------------------------------------


def test_zero_clusters_skipped_and_runs_coalesced(tmp_path: Path) -> None:
    # clusters: data, zero, data, data, data, zero, zero, partial data (100 bytes)
    content = (
        cluster(1)
        + cluster(0)
        + cluster(2)
        + cluster(3)
        + cluster(4)
        + cluster(0)
        + cluster(0)
        + cluster(5, 100)
    )
    fd = make_file(tmp_path / "src", content)
    try:
        rec = Recorder(len(content))
        buf = bytearray(b"\xee" * (16 * CS))
        written = copy_range(fd, rec, 0, len(content), CS, buf)
    finally:
        os.close(fd)
    assert rec.writes == [(0, CS), (2 * CS, 3 * CS), (7 * CS, 100)]
    assert rec.zeroes == [(CS, CS), (5 * CS, CS), (6 * CS, CS)]
    assert written == 4 * CS + 100
    assert bytes(rec.image) == content


def test_cluster_zero_except_one_byte_is_written(tmp_path: Path) -> None:
    """A cluster whose first byte is zero but which holds data elsewhere is data."""
    content = bytes(CS - 1) + b"\x01" + bytes(CS)
    fd = make_file(tmp_path / "src", content)
    try:
        rec = Recorder(len(content))
        written = copy_range(fd, rec, 0, len(content), CS, bytearray(4 * CS))
    finally:
        os.close(fd)
    assert rec.writes == [(0, CS)]
    assert rec.zeroes == [(CS, CS)]
    assert written == CS
    assert bytes(rec.image) == content


def test_offset_range_in_the_middle(tmp_path: Path) -> None:
    content = random.Random(1).randbytes(10 * CS)
    fd = make_file(tmp_path / "src", content)
    try:
        rec = Recorder(len(content))
        written = copy_range(fd, rec, 3 * CS, 4 * CS, CS, bytearray(4 * CS))
    finally:
        os.close(fd)
    assert rec.writes == [(3 * CS, 4 * CS)]
    assert written == 4 * CS
    assert rec.image[3 * CS : 7 * CS] == content[3 * CS : 7 * CS]
    assert rec.image[: 3 * CS] == bytes(3 * CS)  # nothing outside the range
    assert rec.image[7 * CS :] == bytes(3 * CS)


def test_short_source_reads_as_zeros(tmp_path: Path) -> None:
    """The source shrank: bytes past its end are zeros, not stale buffer contents."""
    content = random.Random(2).randbytes(CS + 300)
    fd = make_file(tmp_path / "src", content)
    try:
        rec = Recorder(4 * CS)
        buf = bytearray(b"\xab" * (4 * CS))  # stale data from an earlier copy
        written = copy_range(fd, rec, 0, 4 * CS, CS, buf)
    finally:
        os.close(fd)
    assert rec.writes == [(0, 2 * CS)]
    assert rec.zeroes == [(2 * CS, CS), (3 * CS, CS)]
    assert written == 2 * CS
    assert bytes(rec.image) == content + bytes(4 * CS - len(content))


def test_range_entirely_past_eof(tmp_path: Path) -> None:
    fd = make_file(tmp_path / "src", b"x" * 10)
    try:
        rec = Recorder(8 * CS)
        written = copy_range(fd, rec, 4 * CS, 2 * CS, CS, bytearray(b"\xff" * 2 * CS))
    finally:
        os.close(fd)
    assert written == 0
    assert rec.writes == []
    assert rec.zeroes == [(4 * CS, CS), (5 * CS, CS)]


@pytest.mark.parametrize("seed", range(20))
def test_random_contents_round_trip(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    cs = rng.choice([4096, 65536])
    n = rng.randint(1, 20)
    size = n * cs - rng.randrange(cs)
    content = b"".join(
        rng.choice([bytes(cs), rng.randbytes(cs), bytes(cs - 1) + b"\x07"]) for _ in range(n)
    )[:size]
    fd = make_file(tmp_path / "src", content)
    try:
        rec = Recorder(size)
        written = copy_range(fd, rec, 0, size, cs, bytearray(b"\x55" * (n * cs)))
    finally:
        os.close(fd)
    assert bytes(rec.image) == content
    assert written == sum(length for _, length in rec.writes)
    nonzero = [c for c in range(n) if any(content[c * cs : (c + 1) * cs])]
    assert written == sum(min(cs, size - c * cs) for c in nonzero)
    # Coalesced: adjacent non-zero clusters go out in one write, so no two writes touch.
    ends = {offset + length for offset, length in rec.writes}
    assert not any(offset in ends for offset, _ in rec.writes)


# -- data_clusters --------------------------------------------------------------


def sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    for offset, data in pieces:
        os.pwrite(fd, data, offset)
    return fd


def bits(b) -> list[int]:  # type: ignore[no-untyped-def]
    return [i for i in range(len(b)) if b[i]]


def test_data_clusters_matches_holes(tmp_path: Path) -> None:
    cs = 64 << 10
    size = 20 * cs
    pieces = [
        (0, b"a"),  # start of cluster 0
        (3 * cs + cs - 4096, b"b" * 8192),  # crosses from cluster 3 into 4
        (10 * cs, b"c" * (2 * cs)),  # clusters 10, 11
        (size - 1, b"z"),  # last byte
    ]
    fd = sparse(tmp_path / "src", size, pieces)
    try:
        got = data_clusters(fd, size, cs)
    finally:
        os.close(fd)
    assert len(got) == 20
    assert bits(got) == [0, 3, 4, 10, 11, 19]


def test_data_clusters_no_holes(tmp_path: Path) -> None:
    cs = 4096
    size = 37 * cs + 1000
    fd = sparse(tmp_path / "src", size, [(0, random.Random(0).randbytes(size))])
    try:
        got = data_clusters(fd, size, cs)
    finally:
        os.close(fd)
    assert len(got) == 38
    assert got.all()


def test_data_clusters_partial_last_cluster(tmp_path: Path) -> None:
    cs = 64 << 10
    size = 5 * cs + 4096 + 17
    fd = sparse(tmp_path / "src", size, [(5 * cs + 4096, b"q" * 17)])
    try:
        got = data_clusters(fd, size, cs)
    finally:
        os.close(fd)
    assert len(got) == 6
    assert bits(got) == [5]


def test_data_clusters_all_hole_and_empty(tmp_path: Path) -> None:
    fd = sparse(tmp_path / "a", 1 << 20, [])
    try:
        got = data_clusters(fd, 1 << 20, 4096)
        assert len(got) == 256 and not got.any()
    finally:
        os.close(fd)
    fd = sparse(tmp_path / "b", 0, [])
    try:
        assert len(data_clusters(fd, 0, 4096)) == 0
    finally:
        os.close(fd)


def test_data_clusters_ignores_data_past_size(tmp_path: Path) -> None:
    """Only the first `size` bytes count (the point-in-time size)."""
    cs = 4096
    fd = sparse(tmp_path / "src", 10 * cs, [(8 * cs, b"x")])
    try:
        got = data_clusters(fd, 4 * cs, cs)
    finally:
        os.close(fd)
    assert len(got) == 4 and not got.any()


def test_data_clusters_without_seek_hole_says_all_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that cannot tell holes: everything is data, which is always safe."""

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        raise OSError(errno.EINVAL, "not supported")

    fd = sparse(tmp_path / "src", 10 * 4096, [])
    monkeypatch.setattr(cowfs.extents.os, "lseek", no_seek_data)
    try:
        got = data_clusters(fd, 10 * 4096 + 1, 4096)
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert len(got) == 11 and got.all()
