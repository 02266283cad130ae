"""The write-intent record on a real file: what a recovery reads back after a crash at
any point of its updates, and what the alive page tells about the dead mount's writes."""

import hashlib
import os
import random
import time
from pathlib import Path

import pytest
from bitarray import bitarray
from bitarray.util import zeros

import cowfs.intent
from cowfs.errors import CowfsError
from cowfs.intent import (
    DIGEST,
    ENDED,
    HEADER,
    PAGE,
    STARTED,
    IntentFile,
    IntentRecord,
    intent_path,
    read_intent,
    remove_intent,
    slot_size_for,
)

SESSION = "5e55" * 8
OTHER = "0be7" * 8
LEASE = 1_900_000_000_000_000_000
PAGE_CAPACITY = (PAGE - HEADER.size - DIGEST) * 8
"""The most regions a one-page slot holds."""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return intent_path(tmp_path / "disk.img")


def record(
    seq: int, regions: bitarray | str = "0110", session: str = SESSION, limit: int = 1 << 30
) -> IntentRecord:
    return IntentRecord(session, seq, LEASE + seq, 64 << 20, limit, bitarray(regions))


def write(intent: IntentFile, rec: IntentRecord) -> None:
    """As the tracker does: the write (in its thread), then the loop adopts a new file."""
    intent.write(rec)
    intent.adopt()


def slot(path: Path, index: int) -> bytes:
    raw = path.read_bytes()
    size = (len(raw) - PAGE) // 2
    return raw[PAGE + index * size : PAGE + (index + 1) * size]


def damage(path: Path, index: int, how: str) -> None:
    """Spoil slot `index` the way a crash or the disk would."""
    raw = bytearray(path.read_bytes())
    size = (len(raw) - PAGE) // 2
    start = PAGE + index * size
    match how:
        case "flipped bit":  # in the regions: still the magic, wrong checksum
            raw[start + HEADER.size] ^= 0x04
        case "torn":  # only the first sector of a new content landed
            raw[start + 512 : start + size] = bytes(size - 512)
        case "zeroed":  # never written, or lost
            raw[start : start + size] = bytes(size)
    path.write_bytes(bytes(raw))


def same(a: IntentRecord, b: IntentRecord) -> bool:
    return (a.session, a.seq, a.lease_ns, a.region_size, a.size_limit) == (
        b.session,
        b.seq,
        b.lease_ns,
        b.region_size,
        b.size_limit,
    ) and (len(a.regions), list(a.regions.search(1))) == (len(b.regions), list(b.regions.search(1)))


@pytest.mark.parametrize("nregions", [0, 1, 7, 8, 9, 63, 64, 65, 1000, PAGE_CAPACITY])
def test_round_trip(path: Path, nregions: int) -> None:
    """Every length packs to whole bytes and back without a stray or lost bit at the end
    (the last region is the one a growing source writes)."""
    rng = random.Random(nregions)
    regions = bitarray([rng.random() < 0.3 for _ in range(nregions)])
    if nregions:
        regions[-1] = 1
    rec = IntentRecord(SESSION, 7, LEASE, 3 << 20, 123_456_789, regions)
    intent = IntentFile(path)
    write(intent, rec)
    intent.close()
    back = read_intent(path)
    assert back is not None and same(back, rec)
    assert len(path.read_bytes()) == PAGE + 2 * slot_size_for(nregions)


def test_missing_file_is_none(path: Path) -> None:
    assert read_intent(path) is None


def test_newest_seq_wins_and_later_writes_go_in_place(path: Path) -> None:
    """After the first write makes the file, an update overwrites only the slot of the
    older record: the newest stays readable whatever happens to the update."""
    intent = IntentFile(path)
    write(intent, record(1, "1000"))
    ino = os.stat(path).st_ino
    assert slot(path, 0) == bytes(len(slot(path, 0)))  # seq 1 went to slot 1
    write(intent, record(2, "0100"))
    first = slot(path, 1)
    assert read_intent(path).seq == 2
    write(intent, record(3, "0010"))
    assert os.stat(path).st_ino == ino, "an update that fits goes in place"
    assert slot(path, 1) != first and slot(path, 0) == record(2, "0100").pack(len(first))
    back = read_intent(path)
    assert back is not None and same(back, record(3, "0010"))
    assert not path.with_name(path.name + ".tmp").exists()
    intent.close()


def test_seq_not_slot_order_decides(path: Path) -> None:
    """The newer record may sit in either slot."""
    intent = IntentFile(path)
    write(intent, record(4, "1"))
    write(intent, record(5, "01"))  # slot 1 holds the newer now
    assert read_intent(path).seq == 5
    write(intent, record(6, "001"))  # slot 0 does
    assert read_intent(path).seq == 6
    intent.close()


@pytest.mark.parametrize("how", ["flipped bit", "torn", "zeroed"])
def test_a_damaged_newest_slot_falls_back_to_the_previous_record(path: Path, how: str) -> None:
    intent = IntentFile(path)
    write(intent, record(1, "1100", limit=10))
    write(intent, record(2, "0011", limit=20))
    intent.close()
    damage(path, 0, how)  # seq 2
    back = read_intent(path)
    assert back is not None and same(back, record(1, "1100", limit=10))


def test_a_torn_update_leaves_the_record_it_was_to_replace(path: Path) -> None:
    """A crash during the update of seq 3 (into the slot of seq 1) leaves seq 2."""
    intent = IntentFile(path)
    for seq in (1, 2):
        write(intent, record(seq, "1" * seq))
    intent.close()
    size = len(slot(path, 0))
    with open(path, "r+b") as f:
        f.seek(PAGE + size)
        f.write(record(3, "111").pack(size)[:512])
    back = read_intent(path)
    assert back is not None and same(back, record(2, "11"))


@pytest.mark.parametrize("field", ["magic", "version"])
def test_a_slot_of_another_format_is_not_read(path: Path, field: str) -> None:
    """Checksummed but not this format (another tool's, a future version's): its fields
    may mean something else, so the previous record is read instead."""
    intent = IntentFile(path)
    write(intent, record(1, "1"))
    write(intent, record(2, "01"))
    intent.close()
    size = len(slot(path, 0))
    body = bytearray(record(2, "01").pack(size)[:-DIGEST])
    if field == "magic":
        body[:8] = b"COWFSXXX"
    else:
        body[8:12] = (cowfs.intent.VERSION + 1).to_bytes(4, "little")
    with open(path, "r+b") as f:
        f.seek(PAGE)
        f.write(bytes(body) + hashlib.sha256(body).digest())
    back = read_intent(path)
    assert back is not None and same(back, record(1, "1"))


@pytest.mark.parametrize("hows", [("flipped bit", "torn"), ("zeroed", "flipped bit")])
def test_both_slots_damaged_is_an_error(path: Path, hows: tuple[str, str]) -> None:
    """What the record held is lost: not an empty record, which would recover nothing."""
    intent = IntentFile(path)
    write(intent, record(1))
    write(intent, record(2))
    intent.close()
    damage(path, 0, hows[0])
    damage(path, 1, hows[1])
    with pytest.raises(CowfsError) as e:
        read_intent(path)
    assert str(path) in e.value.message and "damaged" in e.value.message


@pytest.mark.parametrize("length", [0, 40, PAGE, PAGE + 100])
def test_a_truncated_file_is_an_error(path: Path, length: int) -> None:
    intent = IntentFile(path)
    write(intent, record(1))
    intent.close()
    os.truncate(path, length)
    with pytest.raises(CowfsError, match="damaged"):
        read_intent(path)


def test_growth_past_the_slots_makes_a_new_file(path: Path) -> None:
    """A slot has room for exactly what its size allows; one region more makes a new,
    bigger file, whose later updates go in place again."""
    intent = IntentFile(path)
    write(intent, record(1, "1"))
    ino = os.stat(path).st_ino
    full = zeros(PAGE_CAPACITY)
    full[-1] = 1
    write(intent, record(2, full))
    assert os.stat(path).st_ino == ino and len(path.read_bytes()) == 3 * PAGE
    grown = full + bitarray("01")
    write(intent, record(3, grown))
    assert os.stat(path).st_ino != ino
    assert len(path.read_bytes()) == PAGE + 2 * slot_size_for(len(grown)) > 3 * PAGE
    back = read_intent(path)
    assert back is not None and same(back, record(3, grown))
    ino = os.stat(path).st_ino
    write(intent, record(4, grown + bitarray("1")))
    assert os.stat(path).st_ino == ino
    back = read_intent(path)
    assert back is not None and same(back, record(4, grown + bitarray("1")))
    damage(path, 0, "flipped bit")  # seq 4: the new file's other slot holds seq 3
    back = read_intent(path)
    assert back is not None and same(back, record(3, grown))
    assert not path.with_name(path.name + ".tmp").exists()
    intent.close()


def test_the_alive_page_bounds_the_writes(path: Path) -> None:
    """`started` while a write runs (it bounds that write), else `ended`; a fresh file
    says when it was made (no write of the session came later yet)."""
    intent = IntentFile(path)
    before = time.time_ns()
    write(intent, record(1))
    after = time.time_ns()
    made = read_intent(path).written_before_ns
    assert made is not None and before <= made <= after
    assert intent.alive is not None
    intent.alive[ENDED] = after + 5
    assert read_intent(path).written_before_ns == after + 5
    intent.alive[STARTED] = after + 9
    assert read_intent(path).written_before_ns == after + 9
    intent.alive[STARTED] = 0
    assert read_intent(path).written_before_ns == after + 5
    intent.close()
    assert read_intent(path).written_before_ns == after + 5, "not made durable, still there"


def test_a_new_file_keeps_the_alive_page_times(path: Path) -> None:
    """Writes that set the old page's times before the growth are still bounded by them."""
    intent = IntentFile(path)
    write(intent, record(1))
    assert intent.alive is not None
    intent.alive[STARTED], intent.alive[ENDED] = 0, LEASE - 7
    write(intent, record(2, zeros(PAGE_CAPACITY + 1)))
    assert read_intent(path).written_before_ns == LEASE - 7
    intent.close()


def test_the_alive_page_of_another_boot_says_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the machine went down, the page read back is stale: the lease alone bounds."""
    intent = IntentFile(path)
    write(intent, record(1))
    intent.close()
    assert read_intent(path).written_before_ns is not None
    monkeypatch.setattr(cowfs.intent, "boot_id", lambda: bytes(16))
    back = read_intent(path)
    assert back is not None and back.written_before_ns is None and back.seq == 1


def test_the_alive_page_of_another_session_says_nothing(path: Path) -> None:
    intent = IntentFile(path)
    write(intent, record(1))
    write(intent, record(2, session=OTHER))  # in place: the page still names SESSION
    intent.close()
    back = read_intent(path)
    assert back is not None and back.session == OTHER and back.written_before_ns is None


def test_a_lost_alive_page_says_nothing(path: Path) -> None:
    intent = IntentFile(path)
    write(intent, record(1))
    intent.close()
    raw = path.read_bytes()
    path.write_bytes(bytes(PAGE) + raw[PAGE:])
    back = read_intent(path)
    assert back is not None and back.seq == 1 and back.written_before_ns is None


def test_remove(path: Path) -> None:
    intent = IntentFile(path)
    write(intent, record(1))
    intent.close()
    remove_intent(path)
    assert read_intent(path) is None
    remove_intent(path)  # already gone: nothing to do


def test_beside_the_real_file(tmp_path: Path) -> None:
    """Like the bitmaps: a source named through a symlink has the same record."""
    real = tmp_path / "disk.img"
    real.touch()
    link = tmp_path / "link.img"
    link.symlink_to(real)
    assert intent_path(link) == tmp_path / ".disk.img.cowfs-intent"
