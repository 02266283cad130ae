"""The dirty-bitmap store in process: persistence, the rules that make a bitmap
inconsistent, recovery after a mount died (its saved bits and its intent record),
successor and reclaim, and damaged files."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from bitarray import bitarray

import cowfs.intent
from cowfs.bitmap import BitmapStore, store_path, to_clusters
from cowfs.errors import CowfsError
from cowfs.intent import ENDED, PAGE, STARTED, IntentFile, IntentRecord, intent_path

G = 64 << 10
SECOND = 1_000_000_000
SESSION = "5e55" * 8
OTHER_SESSION = "0be7" * 8
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


def dead_pid() -> int:
    """A pid that surely runs nothing: a child that exited and was reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def die(store: BitmapStore, pid: int | None = None, session: str = SESSION) -> int:
    """Leave the bitmap file as a mount of `session` that died leaves it: in use."""
    pid = dead_pid() if pid is None else pid
    store.write(store.snapshot(pid, session, os.stat(store.source)))
    return pid


def write_intent(
    source: Path,
    regions: str,
    *,
    session: str = SESSION,
    seq: int = 1,
    lease_ns: int | None = None,
    region_size: int = G,
    size_limit: int | None = None,
    started: int | None = None,
    ended: int | None = None,
) -> IntentRecord:
    """The dead mount's intent record (by default: the source's size as its limit, a
    lease well ahead, and the alive page as the file's creation leaves it)."""
    record = IntentRecord(
        session,
        seq,
        time.time_ns() + 60 * SECOND if lease_ns is None else lease_ns,
        region_size,
        os.stat(source).st_size if size_limit is None else size_limit,
        bitarray(regions),
    )
    intent = IntentFile(intent_path(source))
    intent.write(record)
    intent.adopt()
    assert intent.alive is not None
    if started is not None:
        intent.alive[STARTED] = started
    if ended is not None:
        intent.alive[ENDED] = ended
    intent.close()
    return record


def with_bits(source: Path, **bits: list[int]) -> BitmapStore:
    """A store whose bitmaps (of granularity G) hold these bits, saved as at a clean end."""
    store = BitmapStore.load(source, holding_lock=True)
    for name, marked in bits.items():
        bitmap = store.add(name, G, os.stat(source).st_size)
        for bit in marked:
            bitmap.mark(bit * G, 1)
    store.save(None, os.stat(source))
    return store


def test_a_mount_that_died_before_writing_leaves_them_consistent(source: Path) -> None:
    """No intent record of its session: it wrote nothing, which the identity confirms."""
    die(with_bits(source, a=[3]))
    again = BitmapStore.load(source, holding_lock=True)
    assert again.get("a").consistent and list(again.get("a").bits.search(1)) == [3]
    assert again.in_use_by is None and again.get("a").recovered is None


def test_a_mount_that_died_without_an_intent_record_but_wrote(source: Path) -> None:
    """A write that no record covers (lost, or never made): only the identity shows it."""
    pid = die(with_bits(source, a=[3]))
    with open(source, "ab") as f:  # the size tells, whatever the clock's granularity
        f.write(b"a write no intent covers")
    again = BitmapStore.load(source, holding_lock=True)
    assert not again.get("a").consistent
    assert f"died (pid {pid})" in again.get("a").reason
    assert "left no intent record" in again.get("a").reason


def test_an_intent_record_of_another_session_is_not_used(source: Path) -> None:
    """A record left by an earlier mount says nothing of the mount that died since."""
    die(with_bits(source, a=[]))
    write_intent(source, "1111", session=OTHER_SESSION)
    again = BitmapStore.load(source, holding_lock=True)
    assert again.get("a").consistent and not again.get("a").bits.any()
    assert again.get("a").recovered is None
    with open(source, "ab") as f:  # the size tells, whatever the clock's granularity
        f.write(b"a write no intent covers")
    again = BitmapStore.load(source, holding_lock=True)
    assert "left no intent record" in again.get("a").reason


def test_a_live_mount_owns_them(source: Path) -> None:
    store = BitmapStore.load(source, holding_lock=True)
    store.add("a", G, 1 << 20)
    store.save(os.getpid(), os.stat(source))
    again = BitmapStore.load(source, holding_lock=False)  # `bitmap list` beside a mount
    assert again.get("a").consistent and again.in_use_by == os.getpid()


def test_with_the_lock_held_an_in_use_mark_means_the_mount_died(source: Path) -> None:
    """Whoever holds the source's lock knows no mount is live, whatever runs under the
    recorded pid now (pids are reused, after a reboot above all): it recovers."""
    store = with_bits(source, a=[])
    die(store, pid=os.getpid())  # a live pid, but not a mount any more
    write_intent(source, "01")
    beside = BitmapStore.load(source, holding_lock=False)  # `bitmap list` beside a mount
    assert beside.in_use_by == os.getpid() and not beside.get("a").bits.any()
    again = BitmapStore.load(source, holding_lock=True)
    assert again.in_use_by is None
    assert list(again.get("a").bits.search(1)) == [1]
    assert again.get("a").recovered == {"pid": os.getpid(), "grew_bytes": G}


def test_recovery_adds_every_region_of_the_intent(source: Path) -> None:
    """Regions of 1.5 clusters: each covers every cluster it touches; a region across the
    end of the source stops there, one past it adds nothing. The growth counts only the
    bits that were not set yet."""
    store = with_bits(source, a=[1, 5])
    store.add("b", 4096, 1 << 20)
    store.save(None, os.stat(source))
    pid = die(store)
    region = 3 * G // 2
    assert 10 * region < 1 << 20 < 11 * region
    write_intent(source, "0100000000101", region_size=region)  # regions 1, 10 and 12
    again = BitmapStore.load(source, holding_lock=True)
    a, b = again.get("a"), again.get("b")
    assert a.consistent and b.consistent
    assert len(a.bits) == 16 and list(a.bits.search(1)) == [1, 2, 5, 15]
    assert a.recovered == {"pid": pid, "grew_bytes": 2 * G}
    assert len(b.bits) == 256
    assert list(b.bits.search(1)) == list(range(24, 48)) + list(range(240, 256))
    assert b.recovered == {"pid": pid, "grew_bytes": 40 * 4096}
    again.save(None, os.stat(source))  # what `bitmap list` shows later
    later = BitmapStore.load(source, holding_lock=True)
    assert later.get("a").recovered == {"pid": pid, "grew_bytes": 2 * G}
    assert list(later.get("a").bits.search(1)) == [1, 2, 5, 15]


def test_recovery_covers_a_source_the_mount_grew(source: Path) -> None:
    """Up to the record's size limit, the bitmaps grow with the source."""
    pid = die(with_bits(source, a=[]))
    os.truncate(source, (1 << 20) + G + 1)
    write_intent(source, "0" * 16 + "11", size_limit=(1 << 20) + G + 1)
    again = BitmapStore.load(source, holding_lock=True)
    assert again.get("a").consistent
    assert list(again.get("a").bits.search(1)) == [16, 17]
    assert again.get("a").recovered == {"pid": pid, "grew_bytes": 2 * G}


def ctime(source: Path) -> int:
    return os.stat(source).st_ctime_ns


def test_recovery_trusts_changes_that_the_alive_page_bounds(source: Path) -> None:
    """The mount's changes moved the source's ctime before their end on the page (or
    while one ran, before its `started` bound); the mtime proves nothing, since anyone
    (a guest through the mount too) sets it at will."""
    die(with_bits(source, a=[]))
    now = time.time_ns()
    write_intent(source, "1", started=now + SECOND)  # a change of the mount still ran
    os.utime(source, ns=(now + SECOND // 2, now + SECOND // 2))
    assert BitmapStore.load(source, holding_lock=True).get("a").consistent
    with open(source, "r+b") as f:
        f.write(b"the mount's last write")
    far = time.time_ns() + 3600 * SECOND  # past the lease and the page's bound
    os.utime(source, ns=(far, far))  # as a guest's utime through the mount
    write_intent(source, "1", ended=time.time_ns())  # then the change ended
    again = BitmapStore.load(source, holding_lock=True)
    assert again.get("a").consistent and list(again.get("a").bits.search(1)) == [0]


@pytest.mark.parametrize("bound", ["started", "ended"])
@pytest.mark.parametrize("later", [0, 1])
def test_a_change_after_the_alive_page_says_the_mount_stopped(
    source: Path, bound: str, later: int
) -> None:
    """Long before its lease ends (a kill -9 a moment ago), a change outside cowfs is
    seen: a ctime even 1 ns past the page's bound cannot be the mount's."""
    pid = die(with_bits(source, a=[]))
    last = ctime(source) - later
    write_intent(source, "1", started=last if bound == "started" else 0, ended=last)
    again = BitmapStore.load(source, holding_lock=True)
    if not later:
        assert again.get("a").consistent and list(again.get("a").bits.search(1)) == [0]
        return
    assert not again.get("a").consistent and not again.get("a").bits.any()
    assert again.get("a").recovered is None
    reason = again.get("a").reason
    assert f"died (pid {pid})" in reason and "changed after the mount died" in reason


@pytest.mark.parametrize("later", [0, 1])
def test_without_the_alive_page_the_lease_bounds(
    source: Path, monkeypatch: pytest.MonkeyPatch, later: int
) -> None:
    """After a reboot the page is stale (another boot id): a change after the page's
    bound but within the lease may be the mount's; one past the lease is not."""
    die(with_bits(source, a=[]))
    c = ctime(source)
    write_intent(source, "1", lease_ns=c - later, ended=c - 1)
    monkeypatch.setattr(cowfs.intent, "boot_id", lambda: bytes(16))
    again = BitmapStore.load(source, holding_lock=True)
    assert again.get("a").consistent is not bool(later)
    if later:
        assert "changed after the mount died" in again.get("a").reason
    else:
        assert list(again.get("a").bits.search(1)) == [0]


def test_a_source_replaced_by_another_file_is_not_trusted(source: Path) -> None:
    """Same size and older times than the record allows, but another inode."""
    die(with_bits(source, a=[]))
    copy = source.with_name("copy.img")
    copy.write_bytes(source.read_bytes())
    os.replace(copy, source)
    write_intent(source, "1")
    again = BitmapStore.load(source, holding_lock=True)
    assert not again.get("a").consistent
    assert "another file" in again.get("a").reason


def test_a_source_beyond_the_size_limit_is_not_trusted(source: Path) -> None:
    """Its times are within what the record allows; its size is not."""
    die(with_bits(source, a=[]))
    write_intent(source, "1", size_limit=(1 << 20) - 1)
    again = BitmapStore.load(source, holding_lock=True)
    assert not again.get("a").consistent
    assert "grew beyond" in again.get("a").reason


def test_a_damaged_intent_record_is_not_trusted(source: Path) -> None:
    """With both slots damaged the dead mount's intent is lost; with the newest one only,
    the previous record still covers every write (its regions stay marked until a save)."""
    die(with_bits(source, a=[]))
    write_intent(source, "01", seq=1)
    write_intent(source, "001", seq=2)  # a new file: only seq 2's slot written
    path = intent_path(source)
    raw = bytearray(path.read_bytes())
    raw[PAGE + 100] ^= 1  # slot 0 (seq 2)
    path.write_bytes(bytes(raw))
    again = BitmapStore.load(source, holding_lock=True)
    assert not again.get("a").consistent
    assert str(path) in again.get("a").reason and "damaged" in again.get("a").reason

    intent = IntentFile(path)
    intent.write(IntentRecord(SESSION, 3, time.time_ns() + 60 * SECOND, G, 1 << 20, bitarray("1")))
    intent.adopt()
    intent.write(IntentRecord(SESSION, 4, time.time_ns() + 60 * SECOND, G, 1 << 20, bitarray("")))
    intent.close()
    raw = bytearray(path.read_bytes())
    raw[PAGE + 100] ^= 1  # slot 0 (seq 4)
    path.write_bytes(bytes(raw))
    again = BitmapStore.load(source, holding_lock=True)
    assert again.get("a").consistent and list(again.get("a").bits.search(1)) == [0]


def version_1(doc: bytes) -> bytes:
    """`doc` as cowfs before change tracking wrote it: no session, no recovered."""
    content = json.loads(doc)["content"]
    content["version"] = 1
    del content["session"]
    for bitmap in content["bitmaps"]:
        del bitmap["recovered"]
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return json.dumps({"sha256": digest, "content": content}).encode()


@pytest.mark.parametrize("written", [False, True])
def test_a_version_1_file_in_use_has_only_its_identity(source: Path, written: bool) -> None:
    """A mount of an older cowfs kept no intent record (one beside it is not its own):
    the source unchanged since its last save is all that can be trusted."""
    store = with_bits(source, a=[2])
    pid = dead_pid()
    store.write(version_1(store.snapshot(pid, SESSION, os.stat(source))))
    write_intent(source, "1111")
    if written:
        with open(source, "ab") as f:
            f.write(b"a write of the old mount")
    again = BitmapStore.load(source, holding_lock=True)
    assert list(again.get("a").bits.search(1)) == [2]
    assert again.get("a").consistent is not written
    if written:
        assert f"died (pid {pid})" in again.get("a").reason
        assert "left no intent record" in again.get("a").reason


def test_a_save_while_a_job_runs_stores_what_its_failure_would_leave(source: Path) -> None:
    """A crash during the job must not lose the bits it started from (the job is gone
    with the mount); a bitmap the job created anchors nothing."""
    store = with_bits(source, old=[0])
    store.start_job("old", G, 1 << 20)
    store.start_job("new", G, 1 << 20)
    store.mark(3 * G, 1)
    assert list(store.get("old").bits.search(1)) == [3]  # in memory: since the job only
    die(store)
    write_intent(source, "0000001")
    again = BitmapStore.load(source, holding_lock=True)
    old, new = again.get("old"), again.get("new")
    assert old.consistent and list(old.bits.search(1)) == [0, 3, 6]
    assert not new.consistent and "did not complete" in new.reason
    assert list(new.bits.search(1)) == [3, 6]


def test_a_save_after_the_job_stores_its_bits_only(source: Path) -> None:
    store = with_bits(source, old=[0])
    store.start_job("old", G, 1 << 20)
    store.mark(3 * G, 1)
    store.end_job("old", anchor=ANCHOR)
    die(store)
    again = BitmapStore.load(source, holding_lock=True)
    assert list(again.get("old").bits.search(1)) == [3]
    assert again.get("old").anchor == ANCHOR


def test_close_removes_the_intent_record(source: Path) -> None:
    """A clean end needs no intent: a later crash must not recover from a stale one."""
    store = with_bits(source, a=[])
    die(store)
    write_intent(source, "1")
    store.close(os.stat(source))
    assert not intent_path(source).exists()
    again = BitmapStore.load(source, holding_lock=True)
    assert again.get("a").consistent and not again.get("a").bits.any()
    assert json.loads(store_path(source).read_bytes())["content"]["in_use_by"] is None


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


def test_a_failed_full_leaves_an_inconsistent_bitmap_inconsistent(source: Path) -> None:
    """The full backup that was to re-anchor an untrusted bitmap failed, or the daemon
    died during it: the bits it gives back are still the untrusted ones."""
    store = BitmapStore.load(source, holding_lock=True)
    store.add("n", G, 1 << 20).distrust("the source changed outside cowfs")
    store.start_job("n", G, 1 << 20)
    assert store.get("n").durable_view()[1:] == (False, "the source changed outside cowfs")
    store.end_job("n", anchor=None)
    assert not store.get("n").consistent
    assert store.get("n").reason == "the source changed outside cowfs"


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
