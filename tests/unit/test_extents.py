"""The data map a job starts from: a scan made before the barrier must not call a
cluster a hole that a write made data before the point in time (its old content would
be taken for zeros, and the backup would lose the write)."""

import os
from pathlib import Path

from cowfs.extents import DataScan, data_clusters

CS = 64 << 10


def sparse_file(path: Path, size: int, data_at: list[int]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    for offset in data_at:
        os.pwrite(fd, b"d" * 100, offset)
    return fd


def test_writes_after_the_scan_count_as_data(tmp_path: Path) -> None:
    fd = sparse_file(tmp_path / "s.img", 16 * CS, [2 * CS])
    try:
        scan = DataScan(CS)
        scan.scan(fd)
        assert list(scan.bits.search(1)) == [2]
        os.pwrite(fd, b"w" * 10, 9 * CS - 5)  # straddles clusters 8 and 9
        scan.note(9 * CS - 5, 10)
        scan.note(12 * CS, 0)  # a truncate that changed nothing
        data = scan.at(16 * CS)
        assert list(data.search(1)) == [2, 8, 9]
        assert not (data_clusters(fd, 16 * CS, CS) & ~data).any()  # all data now is in it
    finally:
        os.close(fd)


def test_growth_after_the_scan_counts_as_data(tmp_path: Path) -> None:
    fd = sparse_file(tmp_path / "s.img", 4 * CS + 100, [0])
    try:
        scan = DataScan(CS)
        scan.scan(fd)
        assert len(scan.bits) == 5
        data = scan.at(8 * CS)  # grown by a truncate noted as a range past the old end
        assert list(data.search(1)) == [0, 5, 6, 7]
        assert list(scan.at(2 * CS).search(1)) == [0]  # shrunk: only what is left
    finally:
        os.close(fd)
