"""Input parsing, the record, and the preflight checks: the edges a user touches first.

Why: DESIGN.md says a target is trusted only when its record says `complete`, and
bad input gets one clear line and changes nothing. So sizes must parse exactly or
be refused, the record must survive a round trip and be replaced atomically, a
damaged or missing record must be a CowfsError (never a traceback, never a
`complete`), and every preflight refusal must name its culprit and leave no trace.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from cowfs import preflight
from cowfs.errors import EXIT_ERROR, CowfsError
from cowfs.record import (
    RESERVE,
    Record,
    read_record,
    record_path,
    verdict,
    write_record,
)
from cowfs.units import format_bytes, parse_size

K = 1 << 10

# -- units ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("64K", 64 * K),
        ("64k", 64 * K),
        ("1M", 1 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("2GiB", 2 << 30),
        ("16MB", 16 << 20),
        ("512KiB", 512 * K),
        (" 8 M ", 8 << 20),
        ("100B", 100),
    ],
)
def test_parse_size_good(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "K", "-1", "-64K", "1.5M", "1e6", "64X", "64KK", "0x10", "1 2", "M64", "64P"]
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(CowfsError) as e:
        parse_size(text, "speed")
    assert "bad speed" in e.value.message
    assert repr(text) in e.value.message
    assert e.value.exit_code == EXIT_ERROR


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (1 << 20, "1.0 MiB"), (3 << 40, "3.0 TiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


# -- record ---------------------------------------------------------------------


def sample_record(status: str = "complete") -> Record:
    return Record(
        status=status,
        source="/images/disk.img",
        target="/backups/disk.img",
        format="raw",
        size=123456789,
        cluster_size=65536,
        sync="top",
        point_in_time="2026-01-02T03:04:05+00:00",
        pid=4242,
        started="2026-01-02T03:04:05+00:00",
        finished="2026-01-02T03:05:05+00:00",
        bytes_total=100,
        bytes_done=100,
        bytes_copier=60,
        bytes_cbw=40,
        bytes_written=90,
        duration_s=60.5,
        errors=["one", "two"],
    )


def test_record_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "backup.img"
    rec = sample_record()
    write_record(record_path(target), rec)
    assert record_path(target).name == "backup.img.cowfs.json"
    assert read_record(target) == rec


def test_record_replace_is_atomic_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "backup.img"
    path = record_path(target)
    write_record(path, sample_record("running"))
    inode = path.stat().st_ino
    spare = path.with_name(path.name + ".tmp")  # space held for the next record
    assert spare.stat().st_blocks * 512 >= RESERVE
    write_record(path, sample_record("failed"), reserve=False)  # the last one
    assert read_record(target).status == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.img.cowfs.json"]
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place


def test_record_ignores_unknown_fields(tmp_path: Path) -> None:
    """A newer cowfs may add fields; an older one still reads the record."""
    target = tmp_path / "backup.img"
    write_record(record_path(target), sample_record())
    raw = json.loads(record_path(target).read_text())
    raw["added_later"] = 1
    record_path(target).write_text(json.dumps(raw))
    assert read_record(target) == sample_record()


def test_missing_record_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "backup.img"
    with pytest.raises(CowfsError) as e:
        read_record(target)
    assert str(target) in e.value.message
    assert "no cowfs record" in e.value.message


DAMAGED = {
    "truncated": b'{"status": "complete", "sou',
    "garbage": b"\x00\xff\xfe not json",
    "empty": b"",
    "missing field": json.dumps({"status": "complete"}).encode(),
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_record_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "backup.img"
    record_path(target).write_bytes(content)
    with pytest.raises(CowfsError) as e:
        read_record(target)
    assert str(record_path(target)) in e.value.message
    assert "record" in e.value.message


NOT_AN_OBJECT = {"list": b"[]", "null": b"null", "string": b'"complete"', "number": b"1"}


@pytest.mark.parametrize("content", NOT_AN_OBJECT.values(), ids=NOT_AN_OBJECT.keys())
def test_record_that_is_not_an_object_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "backup.img"
    record_path(target).write_bytes(content)
    with pytest.raises(CowfsError):
        read_record(target)


def test_record_that_is_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "backup.img"
    record_path(target).mkdir()
    with pytest.raises(CowfsError) as e:
        read_record(target)
    assert "unreadable record" in e.value.message


@pytest.mark.parametrize(
    ("status", "word"),
    [
        ("complete", "complete"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
        ("running", "incomplete"),
        ("completing", "incomplete"),
        ("created", "incomplete"),
        ("Complete", "incomplete"),
        ("", "incomplete"),
    ],
)
def test_verdict(status: str, word: str) -> None:
    assert verdict(sample_record(status)) == word


# -- preflight ----------------------------------------------------------------


@pytest.mark.parametrize("size", [4 * K, 8 * K, 64 * K, 1 << 20, 16 << 20])
def test_cluster_size_good(size: int) -> None:
    assert preflight.check_cluster_size(size) == size


@pytest.mark.parametrize("size", [0, 512, 2 * K, 48 * K, 64 * K + 1, 32 << 20, -4096])
def test_cluster_size_bad(size: int) -> None:
    with pytest.raises(CowfsError) as e:
        preflight.check_cluster_size(size)
    assert f"bad cluster size {size}" in e.value.message


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every path under root with its size and mtime: 'creates nothing' means this holds."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return sorted(out)


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A source, an empty mountpoint and a backup directory."""
    (tmp_path / "disk.img").write_bytes(b"x" * 8192)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "backups").mkdir()
    return tmp_path


def refused(root: Path, check, *args: object) -> str:  # type: ignore[no-untyped-def]
    before = snapshot(root)
    with pytest.raises(CowfsError) as e:
        check(*args)
    assert snapshot(root) == before, "a refused request changed the disk"
    assert "\n" not in e.value.message
    assert e.value.exit_code == EXIT_ERROR
    return e.value.message


def test_source_ok(world: Path) -> None:
    st = preflight.check_source(world / "disk.img")
    assert st.st_size == 8192


def test_source_missing(world: Path) -> None:
    msg = refused(world, preflight.check_source, world / "nope.img")
    assert str(world / "nope.img") in msg and "does not exist" in msg


def test_source_not_regular(world: Path) -> None:
    msg = refused(world, preflight.check_source, world / "mnt")
    assert str(world / "mnt") in msg and "not a regular file" in msg


def test_source_device_not_regular(world: Path) -> None:
    msg = refused(world, preflight.check_source, Path("/dev/null"))
    assert "/dev/null" in msg and "not a regular file" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read and write any file")
def test_source_unreadable(world: Path) -> None:
    (world / "disk.img").chmod(0o200)
    msg = refused(world, preflight.check_source, world / "disk.img")
    assert "disk.img" in msg and "readable" in msg


def test_mountpoint_ok(world: Path) -> None:
    preflight.check_mountpoint(world / "mnt")


def test_mountpoint_missing(world: Path) -> None:
    msg = refused(world, preflight.check_mountpoint, world / "nowhere")
    assert str(world / "nowhere") in msg and "does not exist" in msg


def test_mountpoint_not_a_directory(world: Path) -> None:
    msg = refused(world, preflight.check_mountpoint, world / "disk.img")
    assert "disk.img" in msg and "not a directory" in msg


def test_mountpoint_not_empty(world: Path) -> None:
    (world / "mnt" / "junk").write_text("x")
    msg = refused(world, preflight.check_mountpoint, world / "mnt")
    assert str(world / "mnt") in msg and "not empty" in msg


def test_mountpoint_already_mounted(tmp_path: Path) -> None:
    msg = refused(tmp_path, preflight.check_mountpoint, Path("/proc"))
    assert "/proc" in msg and "already a mount point" in msg


def check_target(world: Path, target: Path, force: bool = False) -> None:
    st = os.stat(world / "disk.img")
    preflight.check_target(target, world / "disk.img", st, world / "mnt", force)


def test_target_ok(world: Path) -> None:
    check_target(world, world / "backups" / "new.img")


def test_target_exists_needs_force(world: Path) -> None:
    (world / "backups" / "old.img").write_text("old")
    msg = refused(world, check_target, world, world / "backups" / "old.img")
    assert "old.img" in msg and "--force" in msg
    check_target(world, world / "backups" / "old.img", force=True)


def test_target_directory_missing(world: Path) -> None:
    msg = refused(world, check_target, world, world / "gone" / "new.img")
    assert str(world / "gone") in msg and "does not exist" in msg


def test_target_inside_mountpoint(world: Path) -> None:
    msg = refused(world, check_target, world, world / "mnt" / "new.img")
    assert "new.img" in msg and "inside the mountpoint" in msg


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "dotted path"])
def test_target_is_the_source(world: Path, how: str) -> None:
    source = world / "disk.img"
    if how == "same path":
        target = source
    elif how == "symlink":
        target = world / "backups" / "link.img"
        target.symlink_to(source)
    elif how == "hard link":
        target = world / "backups" / "hard.img"
        os.link(source, target)
    else:
        target = world / "backups" / ".." / "disk.img"
    for force in (False, True):
        msg = refused(world, check_target, world, target, force)
        assert str(target) in msg and "is the source" in msg


def test_target_dangling_symlink(world: Path) -> None:
    link = world / "backups" / "dangling.img"
    link.symlink_to(world / "backups" / "nowhere.img")
    msg = refused(world, check_target, world, link)
    assert "dangling.img" in msg and "dangling" in msg


def test_target_not_a_regular_file(world: Path) -> None:
    (world / "backups" / "dir.img").mkdir()
    for force in (False, True):
        msg = refused(world, check_target, world, world / "backups" / "dir.img", force)
        assert "dir.img" in msg and "not a regular file" in msg


def test_snapshot_notices_a_change(world: Path) -> None:
    """The "creates nothing" helper itself notices a change (a guard against a vacuous check)."""
    before = snapshot(world)
    shutil.copy(world / "disk.img", world / "backups" / "copy.img")
    assert snapshot(world) != before
