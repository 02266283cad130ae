"""Incremental backups through real mounts (issue 3): dirty bitmaps and qcow2 chains.

Why: a chain of incrementals is worth something only if every link restores the
source exactly as it was at that link's point in time, with QEMU's own tools,
whatever happened between and during the backups: writes through other mounts,
writes while the incremental copies, a cancelled or failed incremental, a daemon
killed with -9. A bitmap that misses one write makes every later link silently
wrong, so each test keeps a copy of the source taken just before each mount (the
point in time, "PIT copy"), judges every link with `qemu-img check`, `qemu-img
compare` and `qemu-img convert`, and checks that the bitmap holds exactly the
clusters written since the last point in time that anchored it. A refused mount
must refuse before it creates or changes anything.
"""

import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import SmallFS, make_image
from helpers.incremental import (
    BITMAP,
    BUDGET,
    CLUSTER,
    FULL_SPEED,
    INC_SPEED,
    SIZE,
    assert_dirty,
    assert_restores,
    backup,
    bitmaps,
    bitmaps_file,
    clusters_of,
    full_backup,
    incremental_options,
    random_writes,
    writes_between,
)
from helpers.mounting import COWFS, CowfsRunner, Mounted, pid_gone, run_cowfs, wait_until
from helpers.mounts import assert_gone, info, record, refused_mount, write_live
from helpers.qemu import qemu_json
from helpers.sizes import MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

SLOW_SPEED = "512K"
"""An incremental of 2 MiB needs seconds: still copying when the test cancels it."""


# -- helpers -----------------------------------------------------------------------------


def kill9(m: Mounted, reap: bool = True) -> None:
    """kill -9 the daemon and wait until its mount is gone. With `reap`, also until the
    dead process is reaped (its pid free); without, it stays a zombie of its parent."""
    os.kill(m.pid, signal.SIGKILL)
    if reap:
        m.wait_exit()
        wait_until(lambda: not os.path.exists(f"/proc/{m.pid}"), 30, "the dead daemon reaped")
    else:
        wait_until(lambda: pid_gone(m.pid), 30, "the daemon to die")
    try:
        wait_until(lambda: not m.is_mounted(), 5, "auto_unmount after kill -9")
    except TimeoutError:  # auto_unmount's helper died too (a pid namespace dies with its init)
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], capture_output=True)
    assert not m.is_mounted()


def mount_in_pid_namespace(
    cowfs: CowfsRunner, source: Path, target: Path, *options: str
) -> Mounted:
    """A foreground daemon as pid 1 of a new pid namespace: the pid it records for itself
    is alive in ours (our init), just as a dead daemon's pid is alive again once another
    process reuses it (after a reboot, say). Torn down by the `cowfs` fixture."""
    mnt = cowfs.workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    m = cowfs.add(Mounted(source, mnt, target, options))
    m.proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", *COWFS, *m.argv(), "--foreground"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children = Path(f"/proc/{m.proc.pid}/task/{m.proc.pid}/children")
    wait_until(lambda: children.read_text().split() != [], 20, "unshare's child")
    m.pid = int(children.read_text().split()[0])
    wait_until(m.is_mounted, 20, "the mount in the pid namespace")
    wait_until(m.answers, 20, "the job to start")
    assert m.status()["pid"] == 1
    return m


# -- a chain, link by link -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "full_sync", "compress", "size", "suffix"),
    [
        (1, "full", False, SIZE, ".qcow2"),
        (2, "top", False, SIZE, ".qcow2"),
        (3, "full", True, SIZE, ".qcow2"),
        (4, "top", True, SIZE - 3000, ".bak"),  # a partial last cluster; --format qcow2
    ],
    ids=["full", "top", "full-compress", "top-compress-odd-size"],
)
def test_chain_restores_every_link(
    cowfs: CowfsRunner,
    tmp_path: Path,
    seed: int,
    full_sync: str,
    compress: bool,
    size: int,
    suffix: str,
) -> None:
    """full → (writes) → inc1 → (writes) → inc2 → (writes) → inc3, with writes during
    every backup too: every link equals the source at its own point in time, and each
    incremental is a small fraction of the full."""
    rng = random.Random(seed)
    source = make_image(tmp_path / "disk.img", size, seed=seed, holes=full_sync == "top")
    fmt = ["--format", "qcow2"] if suffix != ".qcow2" else []
    squeeze = ["--compress"] if compress else []

    during = random_writes(rng, size, BUDGET)
    full = tmp_path / f"full{suffix}"
    pit = full_backup(cowfs, source, full, during, "--sync", full_sync, *fmt)
    assert_dirty(source, BITMAP, during)  # anchored at the point in time
    rec = record(full)
    assert (rec["sync"], rec["bitmap"], rec["backing"]) == (full_sync, BITMAP, None)
    links = [(full, pit)]

    for n in (1, 2, 3):
        hot = clusters_of(during)
        between = random_writes(rng, size, BUDGET, hot)
        writes_between(cowfs, source, tmp_path / f"between{n}.img", between)
        assert_dirty(source, BITMAP, during + between)

        previous = links[-1][0]
        during = random_writes(rng, size, BUDGET, hot | clusters_of(between))
        inc = tmp_path / f"inc{n}{suffix}"
        options = [*incremental_options(previous), *fmt, *squeeze]
        pit = backup(cowfs, source, inc, *options, writes=during, speed=INC_SPEED)
        assert_dirty(source, BITMAP, during)  # exactly the writes since this point in time
        links.append((inc, pit))

        report = assert_restores(inc, pit)
        if compress:
            assert report.get("compressed-clusters", 0) > 0, report
        assert inc.stat().st_size < 0.3 * full.stat().st_size, (inc.stat(), full.stat())
        rec = record(inc)
        assert (rec["sync"], rec["bitmap"]) == ("incremental", BITMAP)
        assert (inc.parent / rec["backing"]).absolute() == previous.absolute()  # as QEMU reads it
        image = qemu_json("info", inc)
        assert Path(image["backing-filename"]).name == previous.name
        assert image.get("backing-filename-format") == "qcow2", image

    # Building later links changed none of the earlier ones.
    for link, pit in links:
        assert_restores(link, pit)
    chain = qemu_json("info", "--backing-chain", links[-1][0])
    assert [Path(i["filename"]).name for i in chain] == [link.name for link, _ in links[::-1]]

    shown = run_cowfs("info", links[-1][0])
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    positions = [out.find(link.name) for link, _ in links[::-1]]
    assert -1 not in positions and positions == sorted(positions), out
    for link, _ in links:
        assert record(link)["point_in_time"] in out, out
    for word in ("incremental", full_sync, BITMAP):
        assert word in out, out


# -- an incremental that does not finish -------------------------------------------------


@pytest.mark.parametrize("retry_into", ["a new target", "the same target with --force"])
@pytest.mark.parametrize("seed", [5, 6])
def test_cancelled_incremental_loses_nothing(
    cowfs: CowfsRunner, tmp_path: Path, seed: int, retry_into: str
) -> None:
    """Cancelled while copying: the bitmap keeps the union of what it held and the
    writes made during the cancelled job, so the retry catches everything."""
    rng = random.Random(seed)
    source = make_image(tmp_path / "disk.img", SIZE, seed=seed, holes=False)
    full = tmp_path / "full.qcow2"
    full_pit = full_backup(cowfs, source, full)
    between = random_writes(rng, SIZE, SIZE // CLUSTER // 2)  # 8 MiB: seconds to copy
    writes_between(cowfs, source, tmp_path / "between.img", between)
    assert_dirty(source, BITMAP, between)

    cancelled = tmp_path / "inc1.qcow2"
    m = cowfs.mount(source, cancelled, "--speed", SLOW_SPEED, *incremental_options(full))
    during = random_writes(rng, SIZE, 8, clusters_of(between))
    for offset, data in during:
        write_live(m, data, offset)
    st = m.status()
    assert st["state"] == "running" and st["bytes_done"] < st["bytes_total"], st
    result = run_cowfs("cancel", m.mountpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "cancelled"
    assert_gone(m)
    assert info(cancelled) == (1, "cancelled")
    assert_dirty(source, BITMAP, between + during)  # the union: nothing lost

    later = random_writes(rng, SIZE, 4)
    writes_between(cowfs, source, tmp_path / "between2.img", later)
    assert_dirty(source, BITMAP, between + during + later)
    retry = cancelled if retry_into.startswith("the same") else tmp_path / "inc1b.qcow2"
    force = ["--force"] if retry == cancelled else []
    last = random_writes(rng, SIZE, 4)
    pit = backup(cowfs, source, retry, *incremental_options(full), *force, writes=last)
    assert_restores(retry, pit)
    assert_restores(full, full_pit)
    assert_dirty(source, BITMAP, last)
    assert info(retry)[0] == 0


def test_failed_incremental_loses_nothing(
    cowfs: CowfsRunner, small_fs: SmallFS, tmp_path: Path
) -> None:
    """The incremental's target fills up (ENOSPC, a real tmpfs): the job fails, the
    bitmap keeps the union, and the next incremental elsewhere catches everything."""
    rng = random.Random(7)
    source = make_image(tmp_path / "disk.img", SIZE, seed=7, holes=False)
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full)
    between = random_writes(rng, SIZE, SIZE // CLUSTER // 8)
    writes_between(cowfs, source, tmp_path / "between.img", between)

    failed = small_fs.path / "inc1.qcow2"
    m = cowfs.mount(source, failed, "--speed", SLOW_SPEED, *incremental_options(full))
    during = random_writes(rng, SIZE, 8, clusters_of(between))
    for offset, data in during[: len(during) // 2]:
        write_live(m, data, offset)
    small_fs.fill()

    def ended() -> bool:
        try:
            return m.status()["state"] != "running"
        except subprocess.CalledProcessError:
            return True

    wait_until(ended, 30, "the job to notice the full target")
    for offset, data in during[len(during) // 2 :]:
        write_live(m, data, offset)  # the guest goes on; these writes belong to the bitmap
    assert m.finish().returncode == 1
    assert_gone(m)
    assert info(failed) == (1, "failed")
    assert_dirty(source, BITMAP, between + during)

    small_fs.free()
    retry = tmp_path / "inc1.qcow2"
    last = random_writes(rng, SIZE, 4)
    pit = backup(cowfs, source, retry, *incremental_options(full), writes=last)
    assert_restores(retry, pit)
    assert_dirty(source, BITMAP, last)


# -- a daemon killed with -9 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "killed",
    [
        "none",
        "incremental",
        "none, a zombie not yet reaped",
        "none, its pid alive again",
    ],
)
def test_kill9_recovers_the_bitmaps_from_the_intent_record(
    cowfs: CowfsRunner, tmp_path: Path, killed: str
) -> None:
    """The writes the dead daemon took with it are in its write-intent record, made
    durable before each write reached a new region: every bitmap of the source comes
    back as its last save plus those regions, consistent and marked as recovered after
    the crash of that pid, and the next incremental over the last complete link restores
    exactly (a killed incremental moved no anchor). Whether the dead daemon's pid is
    still taken (a zombie its parent has not reaped yet, or a new process that got the
    same pid) must not matter."""
    rng = random.Random(8)
    source = make_image(tmp_path / "disk.img", SIZE, seed=8, holes=False)
    added = run_cowfs("bitmap", "add", source, "other")
    assert added.returncode == 0, added.stderr
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full)
    between = random_writes(rng, SIZE, BUDGET)
    writes_between(cowfs, source, tmp_path / "between.img", between)

    killed_target = tmp_path / "killed.img"
    if killed == "none":
        m = cowfs.mount(source, killed_target, "--sync", "none")
    elif killed == "incremental":
        target = tmp_path / "killed.qcow2"
        m = cowfs.mount(source, target, "--speed", SLOW_SPEED, *incremental_options(full))
    elif killed == "none, a zombie not yet reaped":
        m = cowfs.mount(source, killed_target, "--sync", "none", foreground=True)
    else:
        m = mount_in_pid_namespace(cowfs, source, killed_target, "--sync", "none")
    pid = m.status()["pid"]  # 1 in the pid namespace
    during = random_writes(rng, SIZE, BUDGET)
    for offset, data in during:
        write_live(m, data, offset)
    kill9(m, reap=killed != "none, a zombie not yet reaped")
    if killed == "incremental":
        code, verdict = info(target)
        assert code == 1 and verdict.startswith("incomplete"), verdict

    maps = bitmaps(source)
    must_hold = len(clusters_of(between + during))
    for name in (BITMAP, "other"):
        assert maps[name]["consistent"] is True, maps
        assert maps[name]["recovered"] is not None, maps
        assert maps[name]["recovered"]["pid"] == pid, maps
        assert maps[name]["dirty_clusters"] >= must_hold, maps
    listed = run_cowfs("bitmap", "list", source)
    assert listed.returncode == 0, listed.stderr
    row = [line for line in listed.stdout.splitlines() if line.startswith(f"{BITMAP}:")]
    assert len(row) == 1 and "inconsistent" not in row[0], listed.stdout
    assert f"recovered after a crash of pid {pid}" in row[0], listed.stdout

    last = random_writes(rng, SIZE, BUDGET)
    inc = tmp_path / "inc1.qcow2"
    # The default intent region (64 MiB) covers the whole image: it is all copied.
    pit = backup(cowfs, source, inc, *incremental_options(full), writes=last, speed=FULL_SPEED)
    assert_restores(inc, pit)
    assert_dirty(source, BITMAP, last)  # exact again from this point in time
    assert bitmaps(source)[BITMAP]["recovered"] is None
    other = bitmaps(source)["other"]
    assert other["consistent"] is True and other["recovered"]["pid"] == pid, other


# -- refusals --------------------------------------------------------------------------------


@pytest.fixture
def anchored(cowfs: CowfsRunner, tmp_path: Path) -> tuple[Path, Path]:
    """A source with a complete full backup that anchored BITMAP: (source, full)."""
    source = make_image(tmp_path / "disk.img", 8 * MiB, seed=9, holes=False)
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full)
    return source, full


REFUSALS = {
    "incremental into raw (by name)": (
        ["inc.img", "--sync", "incremental", "--bitmap", BITMAP],
        ["qcow2"],
    ),
    "incremental into raw (--format)": (
        ["inc.qcow2", "--format", "raw", "--sync", "incremental", "--bitmap", BITMAP],
        ["qcow2"],
    ),
    "incremental without --bitmap": (
        ["inc.qcow2", "--sync", "incremental", "--backing", "{full}"],
        ["--bitmap"],
    ),
    "incremental with an unknown bitmap": (
        ["inc.qcow2", "--sync", "incremental", "--bitmap", "weekly", "--backing", "{full}"],
        ["weekly", "--sync full --bitmap"],
    ),
    "--compress into raw": (["x.img", "--compress"], []),
    "--backing into raw": (["x.img", "--backing", "{full}"], []),
    "--compress with --format raw": (["x.qcow2", "--format", "raw", "--compress"], []),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_mounts(
    cowfs: CowfsRunner, tmp_path: Path, anchored: tuple[Path, Path], case: str
) -> None:
    source, full = anchored
    args, words = REFUSALS[case]
    target, *options = (a.format(full=full) for a in args)
    message = refused_mount(cowfs, tmp_path, source, tmp_path / target, *options)
    for word in words:
        assert word in message, message


def test_incremental_of_a_source_without_bitmaps_is_refused(
    cowfs: CowfsRunner, tmp_path: Path
) -> None:
    source = make_image(tmp_path / "disk.img", 8 * MiB, seed=10, holes=False)
    base = tmp_path / "base.qcow2"
    backup(cowfs, source, base)  # complete, but anchors no bitmap
    message = refused_mount(
        cowfs, tmp_path, source, tmp_path / "inc.qcow2", *incremental_options(base)
    )
    assert BITMAP in message and "--sync full --bitmap" in message, message
    assert not bitmaps_file(source).exists()


@pytest.mark.parametrize("how", ["target/../target", "a symlink to the target", "a lower link"])
def test_target_in_its_own_backing_chain_is_refused(
    cowfs: CowfsRunner, tmp_path: Path, how: str
) -> None:
    """`--force` replaces the target; if the target is (another name of) the backing
    file or any file below it in the chain, the new link would read through itself.
    QEMU's tools loop on such a chain, and the old link is lost."""
    source = make_image(tmp_path / "disk.img", 8 * MiB, seed=12, holes=False)
    full = tmp_path / "full.qcow2"
    full_pit = full_backup(cowfs, source, full)
    writes_between(cowfs, source, tmp_path / "between.img", [(0, b"x" * 100)])
    inc = tmp_path / "inc.qcow2"
    inc_pit = backup(cowfs, source, inc, *incremental_options(full))
    (tmp_path / "sub").mkdir()
    if how == "target/../target":
        target, backing = inc, tmp_path / "sub" / ".." / inc.name
    elif how == "a symlink to the target":
        (tmp_path / "sub" / "link.qcow2").symlink_to(inc)
        target, backing = inc, tmp_path / "sub" / "link.qcow2"
    else:
        target, backing = full, inc
    refused_mount(cowfs, tmp_path, source, target, "--force", *incremental_options(backing))
    assert_restores(full, full_pit)
    assert_restores(inc, inc_pit)
