"""Dirty bitmaps as a user sees them: `cowfs bitmap`, their file, and their consistency.

Why: the bitmap decides what the next incremental copies, so it must be exact (every
mount records its writes in every bitmap of the source; anchoring empties only the
bitmap anchored), it must say when it cannot be trusted (the source changed outside
cowfs), and a damaged bitmap file must stop the user with one clear line naming the
file, never with a traceback and never by reading as an empty bitmap (which would
make the next incremental silently miss everything).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SmallFS, make_image
from helpers.incremental import (
    BITMAP,
    BUDGET,
    CLUSTER,
    INC_SPEED,
    assert_dirty,
    assert_restores,
    backup,
    bitmaps,
    bitmaps_file,
    full_backup,
    incremental_options,
    random_writes,
    writes_between,
)
from helpers.mounting import CowfsRunner, ok, run_cowfs, wait_until
from helpers.mounts import assert_one_error_line, refused_mount, write_live
from helpers.sizes import KiB, MiB

SIZE = 8 * MiB


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", SIZE, seed=31, holes=False)


def rows(source: Path) -> list[str]:
    """The lines of `cowfs bitmap list SOURCE` (text)."""
    return ok("bitmap", "list", source).stdout.splitlines()


def row_of(source: Path, name: str) -> str:
    found = [line for line in rows(source) if name in (w.strip(":,;()'\"") for w in line.split())]
    assert len(found) == 1, (name, rows(source))
    return found[0]


# -- the commands ------------------------------------------------------------------------


def test_add_list_clear_remove(cowfs: CowfsRunner, source: Path, tmp_path: Path) -> None:
    assert bitmaps(source) == {}
    ok("bitmap", "add", source, "a")
    ok("bitmap", "add", source, "b", "--granularity", "128K")
    assert bitmaps_file(source).is_file()
    maps = bitmaps(source)
    assert sorted(maps) == ["a", "b"]
    assert (maps["a"]["granularity"], maps["b"]["granularity"]) == (64 * KiB, 128 * KiB)
    for bitmap in maps.values():
        assert bitmap["consistent"] is True and bitmap["dirty_bytes"] == 0, bitmap
    assert "inconsistent" not in row_of(source, "a") and "consistent" in row_of(source, "a")

    # 64 KiB clusters 0, 3, 9, 10; 128 KiB clusters 0, 1, 4, 5.
    writes = [(0, b"x"), (3 * CLUSTER + 10, b"y" * 100), (10 * CLUSTER - 1, b"zz")]
    writes_between(cowfs, source, tmp_path / "between.img", writes)
    maps = bitmaps(source)
    assert maps["a"]["dirty_bytes"] == 4 * 64 * KiB, maps
    assert maps["b"]["dirty_bytes"] == 4 * 128 * KiB, maps
    assert_dirty(source, "a", writes)
    assert_dirty(source, "b", writes)

    ok("bitmap", "clear", source, "a")
    maps = bitmaps(source)
    assert maps["a"]["dirty_bytes"] == 0 and maps["a"]["consistent"] is True, maps
    assert maps["b"]["dirty_bytes"] == 4 * 128 * KiB, maps

    ok("bitmap", "remove", source, "a")
    assert sorted(bitmaps(source)) == ["b"]
    ok("bitmap", "remove", source, "b")
    assert bitmaps(source) == {}


@pytest.mark.parametrize(
    "args",
    [
        ["remove", "{source}", "nope"],
        ["clear", "{source}", "nope"],
        ["add", "{source}", "g", "--granularity", "3K"],
        ["add", "{source}", "g", "--granularity", "0"],
        ["list", "{missing}"],
    ],
    ids=["remove-unknown", "clear-unknown", "granularity-3K", "granularity-0", "list-missing"],
)
def test_bad_bitmap_commands(source: Path, tmp_path: Path, args: list[str]) -> None:
    ok("bitmap", "add", source, "kept")
    before = bitmaps_file(source).read_bytes()
    where = {"source": source, "missing": tmp_path / "missing.img"}
    assert_one_error_line(run_cowfs("bitmap", *(a.format(**where) for a in args)))
    assert bitmaps_file(source).read_bytes() == before
    assert sorted(bitmaps(source)) == ["kept"]


def test_every_mount_records_in_every_bitmap(
    cowfs: CowfsRunner, source: Path, tmp_path: Path
) -> None:
    """Two bitmaps see the same writes; anchoring one (full or top, which also creates
    it) empties only that one, to exactly the writes made during its backup."""
    rng = random.Random(32)
    ok("bitmap", "add", source, "other")
    w1 = random_writes(rng, SIZE, BUDGET)
    full_backup(cowfs, source, tmp_path / "full.qcow2", w1)  # creates BITMAP
    assert_dirty(source, BITMAP, w1)
    assert_dirty(source, "other", w1)

    w2 = random_writes(rng, SIZE, BUDGET)
    writes_between(cowfs, source, tmp_path / "between.img", w2)
    assert_dirty(source, BITMAP, w1 + w2)
    assert_dirty(source, "other", w1 + w2)

    w3 = random_writes(rng, SIZE, BUDGET)
    full_backup(cowfs, source, tmp_path / "full2.img", w3)  # a raw full anchors too
    assert_dirty(source, BITMAP, w3)
    assert_dirty(source, "other", w1 + w2 + w3)

    w4 = random_writes(rng, SIZE, BUDGET)
    top = tmp_path / "top.qcow2"
    backup(cowfs, source, top, "--sync", "top", "--bitmap", "other", writes=w4)
    assert_dirty(source, "other", w4)
    assert_dirty(source, BITMAP, w3 + w4)

    w5 = random_writes(rng, SIZE, BUDGET)
    inc = tmp_path / "inc.qcow2"
    backup(cowfs, source, inc, *incremental_options(top, "other"), writes=w5, speed=INC_SPEED)
    assert_dirty(source, "other", w5)
    assert_dirty(source, BITMAP, w3 + w4 + w5)


# -- the source changed outside cowfs ---------------------------------------------------------


def _pwrite(source: Path) -> None:
    fd = os.open(source, os.O_WRONLY)
    try:
        os.pwrite(fd, b"outside" * 100, 5 * CLUSTER + 17)
    finally:
        os.close(fd)


def _qemu_io(source: Path) -> None:
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 4k", str(source)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _grow(source: Path) -> None:
    os.truncate(source, SIZE + CLUSTER)


CHANGES: dict[str, Callable[[Path], None]] = {
    "pwrite": _pwrite,
    "qemu-io": _qemu_io,
    "grow": _grow,
}


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_change_outside_cowfs_makes_the_bitmap_inconsistent(
    cowfs: CowfsRunner, source: Path, tmp_path: Path, change: str
) -> None:
    """Writes cowfs did not see are in no bitmap: the incremental is refused with the
    fix, a later cowfs mount does not launder the inconsistency, and a full with
    --bitmap re-anchors."""
    rng = random.Random(33)
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full, random_writes(rng, SIZE, BUDGET))
    writes_between(cowfs, source, tmp_path / "between.img", random_writes(rng, SIZE, BUDGET))
    # The change must land on a later clock tick than cowfs's last write, or the
    # source's mtime could not tell them apart.
    last = source.stat().st_mtime_ns
    wait_until(lambda: time.time_ns() > last + 50_000_000, 5, "the clock to pass the mtime")
    CHANGES[change](source)

    inc = tmp_path / "inc1.qcow2"
    message = refused_mount(cowfs, tmp_path, source, inc, *incremental_options(full))
    assert "inconsistent" in message
    assert f"--sync full --bitmap {BITMAP}" in message
    assert bitmaps(source)[BITMAP]["consistent"] is False
    assert "inconsistent" in row_of(source, BITMAP)

    # A cowfs mount after the change must not make the bitmap look whole again.
    writes_between(cowfs, source, tmp_path / "between2.img", random_writes(rng, SIZE, 2))
    message = refused_mount(cowfs, tmp_path, source, inc, *incremental_options(full))
    assert "inconsistent" in message

    during = random_writes(rng, SIZE, BUDGET)
    full2 = tmp_path / "full2.qcow2"
    full2_pit = full_backup(cowfs, source, full2, during)
    assert_dirty(source, BITMAP, during)
    last_writes = random_writes(rng, SIZE, BUDGET)
    pit = backup(
        cowfs, source, inc, *incremental_options(full2), writes=last_writes, speed=INC_SPEED
    )
    assert_restores(full2, full2_pit)
    assert_restores(inc, pit)


# -- a damaged bitmap file --------------------------------------------------------------------


def _flip(bit: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= bit
        path.write_bytes(bytes(data))

    return damage


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(34).randbytes(path.stat().st_size))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated-to-half": _truncate_half,
    "empty": lambda path: os.truncate(path, 0),
    "garbage": _garbage,
    "bit-0x01-flipped-in-the-middle": _flip(0x01),
    "bit-0x08-flipped-in-the-middle": _flip(0x08),
    "bit-0x40-flipped-in-the-middle": _flip(0x40),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_bitmap_file_is_a_clear_error(
    cowfs: CowfsRunner, source: Path, tmp_path: Path, damage: str
) -> None:
    rng = random.Random(35)
    ok("bitmap", "add", source, "other", "--granularity", "128K")
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full, random_writes(rng, SIZE, BUDGET))
    writes_between(cowfs, source, tmp_path / "between.img", random_writes(rng, SIZE, BUDGET))
    path = bitmaps_file(source)
    DAMAGE[damage](path)
    damaged = path.read_bytes()

    for args in (["list", source], ["list", source, "--json"]):
        result = run_cowfs("bitmap", *args)
        assert_one_error_line(result)
        assert path.name in result.stderr, result.stderr
    message = refused_mount(
        cowfs, tmp_path, source, tmp_path / "inc1.qcow2", *incremental_options(full)
    )
    assert path.name in message, message
    assert path.read_bytes() == damaged  # not repaired behind the user's back


# -- a mount in progress, a full directory, another name ----------------------------------------


@pytest.mark.parametrize("command", ["add", "clear", "remove"])
def test_bitmap_command_during_a_mount(
    cowfs: CowfsRunner, source: Path, tmp_path: Path, command: str
) -> None:
    """The running daemon holds the bitmaps and stores them when it ends: a command
    in between must either be refused (one line, nothing changed) or take effect, never
    be undone silently when the daemon stores its copy."""
    full_backup(cowfs, source, tmp_path / "full.qcow2")
    m = cowfs.mount(source, tmp_path / "between.img", "--sync", "none")
    first, second = (0, b"a" * 10), (3 * CLUSTER, b"b" * 10)
    write_live(m, first[1], first[0])
    name = "new" if command == "add" else BITMAP
    result = run_cowfs("bitmap", command, source, name)
    write_live(m, second[1], second[0])
    assert m.finish().returncode == 0
    if result.returncode:
        assert_one_error_line(result)
        assert sorted(bitmaps(source)) == [BITMAP]
        assert_dirty(source, BITMAP, [first, second])
    elif command == "add":
        assert_dirty(source, "new", [second])
        assert_dirty(source, BITMAP, [first, second])
    elif command == "clear":
        assert_dirty(source, BITMAP, [second])
    else:
        assert bitmaps(source) == {}


def test_bitmaps_that_cannot_be_stored_are_recovered_from_the_intent(
    cowfs: CowfsRunner, small_fs: SmallFS, tmp_path: Path
) -> None:
    """The source's directory is full when the mount ends, so its bitmaps cannot be
    stored: they still say the mount is using them. But the write's region went into the
    mount's write-intent record before the write (made when the mount started, so it
    needs no new space), and the next load recovers the bitmaps from it: consistent,
    holding the write, and the next incremental restores exactly."""
    source = make_image(small_fs.path / "disk.img", 4 * MiB, seed=36, holes=False)
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full)
    m = cowfs.mount(source, tmp_path / "between.img", "--sync", "none")
    writes = [(5 * CLUSTER, b"q" * 70_000)]
    write_live(m, writes[0][1], writes[0][0])
    small_fs.fill()
    m.finish()
    small_fs.free()
    bitmap = bitmaps(source)[BITMAP]
    assert bitmap["consistent"] is True, bitmap
    assert bitmap["recovered"] is not None and bitmap["recovered"]["pid"] == m.pid, bitmap
    assert bitmap["dirty_clusters"] >= 2, bitmap  # the write's clusters, and its region's
    assert "recovered after a crash" in row_of(source, BITMAP)
    inc = tmp_path / "inc1.qcow2"
    pit = backup(cowfs, source, inc, *incremental_options(full))
    assert_restores(inc, pit)


def test_a_mount_through_a_symlink_records_in_the_bitmaps(
    cowfs: CowfsRunner, source: Path, tmp_path: Path
) -> None:
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full)
    (tmp_path / "vms").mkdir()
    link = tmp_path / "vms" / "vm.img"
    link.symlink_to(source)
    writes = [(2 * CLUSTER, b"s" * 70_000)]
    m = cowfs.mount(link, tmp_path / "between.img", "--sync", "none")
    write_live(m, writes[0][1], writes[0][0])
    assert m.finish().returncode == 0
    assert_dirty(source, BITMAP, writes)
    assert_dirty(link, BITMAP, writes)
    inc = tmp_path / "inc1.qcow2"
    pit = backup(cowfs, link, inc, *incremental_options(full))
    assert_restores(inc, pit)


def test_no_single_bit_flip_goes_unnoticed(
    cowfs: CowfsRunner, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every single-bit flip of the file, one at a time, anywhere in it: a clear error
    naming the file, or bitmaps marked inconsistent, or the very same listing; never a
    bitmap that still says consistent and holds something else. (The CLI runs in this
    process here: some 6000 runs of `cowfs bitmap list`.)"""
    from cowfs.cli import main

    ok("bitmap", "add", source, "other", "--granularity", "128K")
    full_backup(cowfs, source, tmp_path / "full.qcow2")
    writes = [(0, b"a"), (5 * CLUSTER, b"b"), (SIZE // 2, b"c"), (SIZE - 1, b"z")]
    writes_between(cowfs, source, tmp_path / "between.img", writes)
    expected = bitmaps(source)
    path = bitmaps_file(source)
    original = path.read_bytes()
    silent = []
    # main() leaves SIGPIPE as it is (only the console script makes it kill, for `| head`):
    # otherwise the test session's next write to a closed pipe would end it without a word.
    sigpipe = signal.getsignal(signal.SIGPIPE)
    try:
        for i in range(len(original)):
            for bit in range(8):
                damaged = bytearray(original)
                damaged[i] ^= 1 << bit
                path.write_bytes(damaged)
                code = main(["bitmap", "list", str(source), "--json"])
                out, err = capsys.readouterr()
                if code == 2:
                    assert err.startswith("cowfs: error: ") and err.count("\n") == 1, err
                    assert path.name in err, err
                    continue
                assert code == 0, (code, out, err)
                for bitmap in json.loads(out):
                    if bitmap["consistent"] and bitmap != expected.get(bitmap["name"]):
                        silent.append((i, hex(1 << bit), original[i - 12 : i + 4], bitmap))
    finally:
        path.write_bytes(original)
    assert signal.getsignal(signal.SIGPIPE) == sigpipe
    silent.sort(key=lambda flip: flip[3]["name"] not in expected)  # lost bits first
    assert not silent, f"{len(silent)} flips unnoticed, e.g. {silent[:3]}"
