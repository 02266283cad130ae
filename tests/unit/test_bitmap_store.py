"""The dirty-bitmap store in process: persistence, the rules that make a bitmap
inconsistent, successor and reclaim, and damaged files."""

import json
import os
from pathlib import Path

import pytest
from bitarray import bitarray

from cowfs.bitmap import BitmapStore, store_path, to_clusters
from cowfs.errors import CowfsError

G = 64 << 10
ANCHOR = {
    "job": "0123abcd",
    "target": "/b/full.qcow2",
    "point_in_time": "2026-11-30T02:00:00+00:00",
}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def saved(source: Path) -> BitmapStore:
    """Store `source`'s bitmaps as a clean end of a mount would, and load them back."""
    store = BitmapStore.load(source, holding_lock=True)
    store.save(None, os.stat(source))
    return BitmapStore.load(source, holding_lock=True)


def test_round_trip_and_marks(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("a", G, 1 << 20)
    store.add("b", 4096, 1 << 20)
    store.mark(G + 5, 10)
    store.mark((1 << 20) + 100, 1)  # past the end: the bitmap grows with the source
    store.save(None, os.stat(source))
    again = BitmapStore.load(source, holding_lock=True)
    assert list(again.get("a").bits.search(1)) == [1, 16]
    assert again.get("b").bits.count() == 2
    assert all(b.consistent for b in again.bitmaps.values())


def test_a_mount_that_died_makes_every_bitmap_inconsistent(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("a", G, 1 << 20)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    store.save(dead, os.stat(source))  # "in use" by a process that is gone
    again = BitmapStore.load(source, holding_lock=True)
    assert not again.get("a").consistent
    assert "died" in again.get("a").reason


def test_a_live_mount_owns_them(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("a", G, 1 << 20)
    store.save(os.getpid(), os.stat(source))
    again = BitmapStore.load(source, holding_lock=False)  # `bitmap list` beside a mount
    assert again.get("a").consistent and again.in_use_by == os.getpid()


def test_with_the_lock_held_an_in_use_mark_means_the_mount_died(source: Path) -> None:
    """Whoever holds the source's lock knows no mount is live, whatever runs under the
    recorded pid now (pids are reused, after a reboot above all)."""
    store = BitmapStore.load(source, holding_lock=True)
    store.add("a", G, 1 << 20)
    store.save(os.getpid(), os.stat(source))  # a live pid, but not a mount any more
    again = BitmapStore.load(source, holding_lock=True)
    assert not again.get("a").consistent and "died" in again.get("a").reason


def test_a_change_outside_cowfs_makes_them_inconsistent(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("a", G, 1 << 20)
    store.save(None, os.stat(source))
    with open(source, "r+b") as f:
        f.write(b"changed behind cowfs' back")
    again = BitmapStore.load(source, holding_lock=True)
    assert not again.get("a").consistent
    assert "outside cowfs" in again.get("a").reason


def test_success_keeps_the_writes_since_the_point_in_time(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("n", G, 1 << 20).mark(0, 1)
    store.start_job("n", G, 1 << 20)
    store.mark(3 * G, 1)
    store.end_job("n", anchor=ANCHOR)
    assert list(store.get("n").bits.search(1)) == [3]
    assert store.get("n").anchor == ANCHOR


def test_failure_keeps_the_old_anchor(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.start_job("n", G, 1 << 20)
    store.end_job("n", anchor=ANCHOR)
    store.start_job("n", G, 1 << 20)
    store.end_job("n", anchor=None)
    store.save(None, os.stat(source))
    assert BitmapStore.load(source, holding_lock=True).get("n").anchor == ANCHOR


def test_clear_forgets_the_anchor(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.start_job("n", G, 1 << 20)
    store.end_job("n", anchor=ANCHOR)
    store.clear("n")
    assert store.get("n").anchor is None


def test_failure_gives_back_the_union(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("n", G, 1 << 20).mark(0, 1)
    store.start_job("n", G, 1 << 20)
    store.mark(3 * G, 1)
    store.end_job("n", anchor=None)
    assert list(store.get("n").bits.search(1)) == [0, 3]
    assert store.get("n").consistent


def test_a_new_bitmap_whose_full_backup_failed_is_not_trusted(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.start_job("n", G, 1 << 20)
    store.end_job("n", anchor=None)
    assert not store.get("n").consistent
    assert "did not complete" in store.get("n").reason


def test_anchoring_makes_an_inconsistent_bitmap_consistent(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("n", G, 1 << 20).distrust("for the test")
    store.start_job("n", G, 1 << 20)
    store.end_job("n", anchor=ANCHOR)
    assert store.get("n").consistent


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped", "not json", "empty"])
def test_a_damaged_file_is_a_clear_error(source: Path, damage: str) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("n", G, 1 << 20).mark(0, 500_000)
    store.save(None, os.stat(source))
    path = store_path(source)
    raw = path.read_bytes()
    match damage:
        case "truncated":
            path.write_bytes(raw[: len(raw) // 2])
        case "garbage":
            path.write_bytes(os.urandom(len(raw)))
        case "flipped":
            doc = json.loads(raw)
            bits = doc["content"]["bitmaps"][0]["bits"]
            doc["content"]["bitmaps"][0]["bits"] = (
                bits[:10] + ("A" if bits[10] != "A" else "B") + bits[11:]
            )
            path.write_text(json.dumps(doc))
        case "not json":
            path.write_text("[1, 2")
        case "empty":
            path.write_bytes(b"")
    with pytest.raises(CowfsError) as e:
        BitmapStore.load(source, holding_lock=True)
    assert str(path) in e.value.message and "damaged" in e.value.message


def test_names_and_unknown_bitmaps(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("a", G, 1 << 20)
    with pytest.raises(CowfsError, match="already has"):
        store.add("a", G, 1 << 20)
    with pytest.raises(CowfsError, match="bad bitmap name"):
        store.add("x/y", G, 1 << 20)
    with pytest.raises(CowfsError, match="--sync full --bitmap nope"):
        store.get("nope")
    store.remove("a")
    assert saved(source).bitmaps == {}


def test_granularity_conversion() -> None:
    bits = bitarray("0010000011")
    assert to_clusters(bits, G, G) == bits
    assert to_clusters(bits, 4096, 8192) == bitarray("01001")
    assert to_clusters(bits, 8192, 4096) == bitarray("00001100000000001111")
