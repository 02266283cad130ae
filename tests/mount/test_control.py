"""Controlling a job: whatever the names, after the mount is gone, and against races.

An outside user found that job control broke in ordinary situations: a truncating
open of the live file (`cp`, `dd` without conv=notrunc) kept the old size and tail;
a source named `.cowfs-control` took the control file's place, so that pause wrote
into the guest's disk and status crashed; a mountpoint with a non-ASCII name could
not be controlled at all; two mounts racing for one mountpoint both succeeded and
stacked; after `fusermount3 -u` a job that was still copying could no longer be
reached (no status, no set-speed, no cancel), and Ctrl-C of `cowfs finish` lost
track of it; Ctrl-C during a slow start left a target, an `incomplete` record and a
traceback behind; `resume` of a job that was not paused claimed success. Scripts
drive cowfs unattended and decide from exit codes, so each of these is checked on
a real mount with real tools: exit codes, effects on the source, the target and the
record, and no traceback anywhere.
"""

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FaultyFS, files_equal, make_image
from helpers.mounting import (
    COWFS,
    TIMEOUT,
    UNMOUNT,
    CowfsRunner,
    Mounted,
    mounts_at,
    ok,
    pid_gone,
    run_cowfs,
    status,
    take_down,
    wait_until,
)
from helpers.mounts import assert_one_error_line, record, write_live

SLOW = "512K"
"""A copier that needs half a minute for 16 MiB: the job is surely still copying."""


class Job(Mounted):
    """A job's daemon whose pid is read from its record, not asked of `status`: status is
    what these tests check (and a broken one must not hide the daemon from teardown)."""

    def read_pid(self) -> int:
        return int(record(self.target)["pid"])


STOP_TERM_FIRST = ((signal.SIGTERM, 10.0), (UNMOUNT, 20.0), (signal.SIGKILL, 10.0))
"""SIGTERM (cancel) before the usual unmount: a daemon that still copies slowly after its
mount went away would otherwise hold teardown up for 20 s."""


def image(path: Path, size: int, seed: int) -> tuple[Path, Path]:
    """A source without holes and a copy of it: what a complete target must equal."""
    make_image(path, size, seed, holes=False)
    before = path.with_name(path.name + ".before")
    shutil.copyfile(path, before)
    return path, before


def start(runner: CowfsRunner, source: Path, target: Path, *options: str, mountpoint: Path) -> Job:
    """`cowfs mount` as a user runs it; the daemon is handed to the fixture's teardown."""
    return runner.add(Job(source, mountpoint, target, options, stop=runner.stop)).start()


def unmount(job: Job) -> None:
    subprocess.run(["fusermount3", "-u", str(job.mountpoint)], check=True)
    wait_until(lambda: not job.is_mounted(), 10, "the mount to go away")


def finish_complete(job: Job, before: Path) -> None:
    """`cowfs finish` says complete, and the target is the source at the point in time."""
    result = ok("finish", job.mountpoint)
    assert result.stdout.splitlines()[0] == "complete", result.stdout
    job.wait_exit(15)
    assert record(job.target)["status"] == "complete"
    assert files_equal(job.target, before)


@pytest.fixture
def runner(cowfs: CowfsRunner) -> CowfsRunner:
    """`cowfs`, whose teardown ends daemons with SIGTERM first (`STOP_TERM_FIRST`)."""
    cowfs.stop = STOP_TERM_FIRST
    return cowfs


# -- 5: a truncating open through the mount truncates --------------------------------------

WRITERS: dict[str, Callable[[Path, Path], object]] = {
    "dd": lambda new, live: subprocess.run(
        ["dd", f"if={new}", f"of={live}", "bs=1M", "status=none"], check=True
    ),
    "cp": lambda new, live: subprocess.run(["cp", str(new), str(live)], check=True),
    "python": lambda new, live: live.write_bytes(new.read_bytes()),  # open(live, "wb")
}


@pytest.mark.parametrize("speed", ["0", "1M"], ids=["copied", "slow-copier"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_truncating_open_replaces_the_content(
    runner: CowfsRunner, tmp_path: Path, writer: str, speed: str
) -> None:
    """With a slow copier, copy-before-write must save what the truncate throws away."""
    source, before = image(tmp_path / "d.img", 8 << 20, seed=51)
    new = tmp_path / "new.img"
    new.write_bytes(os.urandom((1 << 20) + 4321))
    options = ("--sync", "full", "--speed", speed)
    job = start(runner, source, tmp_path / "t.img", *options, mountpoint=tmp_path / "mnt")
    WRITERS[writer](new, job.live)
    assert job.live.stat().st_size == new.stat().st_size
    assert files_equal(job.live, new)
    assert source.stat().st_size == new.stat().st_size
    assert files_equal(source, new)
    if speed != "0":  # an unlimited job may have ended complete already
        ok("set-speed", job.mountpoint, "0")
    finish_complete(job, before)


# -- 6: a source may be named like the control file ----------------------------------------


def test_source_named_like_the_control_file(runner: CowfsRunner, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    source, before = image(tmp_path / "src" / ".cowfs-control", 8 << 20, seed=61)
    job = start(runner, source, tmp_path / "t.img", "--speed", SLOW, mountpoint=tmp_path / "mnt")
    assert "running" in ok("status", job.mountpoint).stdout
    ok("pause", job.mountpoint)
    assert status(job.mountpoint)["state"] == "paused"
    ok("set-speed", job.mountpoint, "1M")
    assert status(job.mountpoint)["speed"] == 1 << 20
    ok("resume", job.mountpoint)
    st = status(job.mountpoint)
    assert (st["state"], st["pid"]) == ("running", job.pid)
    assert files_equal(source, before), "control commands reached the guest's disk"
    assert files_equal(job.live, before)
    ok("set-speed", job.mountpoint, "0")
    finish_complete(job, before)


# -- 7: any name works for source, target and mountpoint -----------------------------------

ODD_NAMES = {"utf8": "mnt é", "space": "with space", "tab": "tab\there", "newline": "new\nline"}


@pytest.mark.parametrize("name", ODD_NAMES.values(), ids=ODD_NAMES.keys())
def test_odd_names(runner: CowfsRunner, tmp_path: Path, name: str) -> None:
    source, before = image(tmp_path / f"{name}.img", 4 << 20, seed=71)
    mnt = tmp_path / name
    job = start(runner, source, tmp_path / f"{name}.bak", "--speed", "1M", mountpoint=mnt)
    assert job.is_mounted() and os.listdir(mnt) == [source.name]
    st = status(mnt)
    assert (st["state"], st["source"], st["mountpoint"]) == ("running", str(source), str(mnt))
    ok("status", mnt)
    ok("pause", mnt)
    assert status(mnt)["state"] == "paused"
    write_live(job, b"odd" * 1000, 5000)  # copy-before-write goes on while paused
    ok("resume", mnt)
    ok("set-speed", mnt, "0")
    finish_complete(job, before)
    assert not os.listdir(mnt)


# -- 8: one mount per mountpoint -----------------------------------------------------------


def race(tmp_path: Path, pairs: list[tuple[Path, Path]], tag: str) -> None:
    """Launch two mounts of different sources at once on each pair's empty mountpoint:
    exactly one wins, the other is refused, and no mountpoint ever has two mounts."""
    mnts = [tmp_path / f"mnt-{tag}{i}" for i in range(len(pairs))]
    targets = [[tmp_path / f"t-{tag}{i}-{k}.img" for k in (0, 1)] for i in range(len(pairs))]
    procs = []
    try:
        for mnt, pair, tgts in zip(mnts, pairs, targets, strict=True):
            mnt.mkdir()
            for source, target in zip(pair, tgts, strict=True):
                args = [*COWFS, "mount", str(source), str(mnt), "--target", str(target)]
                procs.append(subprocess.Popen(args, stderr=subprocess.PIPE, text=True))
        most = 0  # polled without pause: never miss a stack, and load the host meanwhile
        while any(p.poll() is None for p in procs):
            most = max([most, *map(mounts_at, mnts)])
        most = max([most, *map(mounts_at, mnts)])
        errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
        codes = [p.returncode for p in procs]
        assert most == 1, f"two mounts stacked on one mountpoint; exit codes {codes}"
        for i, tgts in enumerate(targets):
            assert sorted(codes[2 * i : 2 * i + 2]) == [0, 2], (codes, errs)
            loser = 2 * i + codes[2 * i : 2 * i + 2].index(2)
            assert len(errs[loser].splitlines()) == 1, errs[loser]
            assert errs[loser].startswith("cowfs: error:"), errs[loser]
            assert not tgts[loser % 2].exists()
            assert not Path(f"{tgts[loser % 2]}.cowfs.json").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(TIMEOUT)
        for mnt, tgts in zip(mnts, targets, strict=True):
            pids = [record(t)["pid"] for t in tgts if Path(f"{t}.cowfs.json").exists()]
            take_down(mnt, pids, ((UNMOUNT, 10.0), (signal.SIGKILL, 10.0)))


def test_racing_mounts_on_one_mountpoint(tmp_path: Path) -> None:
    """Eight races at once (the load widens each one's window, as on a busy host)."""
    pairs = []
    for i in range(8):
        pair = (tmp_path / f"a{i}.img", tmp_path / f"b{i}.img")
        for k, source in enumerate(pair):
            make_image(source, 1 << 20, seed=80 + 2 * i + k)
        pairs.append(pair)
    race(tmp_path, pairs, "plain")


def test_racing_mounts_of_sources_on_a_slow_filesystem(faulty: FaultyFS, tmp_path: Path) -> None:
    """Sources on slow storage make every start slower: the race must not get wider. Here
    each source has a dirty bitmap whose file reads take a second (faultfs delay)."""
    names = ("a.img", "b.img")
    for seed, name in enumerate(names):
        make_image(faulty.backing_path(name), 1 << 20, seed=90 + seed)
        ok("bitmap", "add", faulty.path(name), "nightly")
        faulty.fail(f".{name}.cowfs-bitmaps.json", "read", length=1, errno=0, delay=1.0)
    race(tmp_path, [(faulty.path(names[0]), faulty.path(names[1]))], "slow")
    assert faulty.hits() >= 1  # the winner's start was slow (the loser may not get as far)
    faulty.clear()


def test_mount_on_a_mounted_mountpoint_is_refused(runner: CowfsRunner, tmp_path: Path) -> None:
    first, before = image(tmp_path / "a.img", 4 << 20, seed=81)
    other, _ = image(tmp_path / "b.img", 4 << 20, seed=82)
    job = start(runner, first, tmp_path / "a.bak", "--speed", "1M", mountpoint=tmp_path / "mnt")
    result = run_cowfs("mount", other, job.mountpoint, "--target", tmp_path / "b.bak")
    assert_one_error_line(result)
    assert mounts_at(job.mountpoint) == 1
    assert not (tmp_path / "b.bak").exists()
    assert status(job.mountpoint)["source"] == str(first)
    ok("set-speed", job.mountpoint, "0")
    finish_complete(job, before)


# -- 9: control after the mount is gone ----------------------------------------------------


@pytest.fixture
def slow_job(runner: CowfsRunner, tmp_path: Path) -> tuple[Job, Path]:
    """A 16 MiB job copying at 512 KiB/s, with one copy-before-write, still mounted."""
    source, before = image(tmp_path / "disk.img", 16 << 20, seed=91)
    job = start(runner, source, tmp_path / "t.img", "--speed", SLOW, mountpoint=tmp_path / "mnt")
    write_live(job, os.urandom(70_000), (16 << 20) - 100_000)
    assert status(job.mountpoint)["state"] == "running"
    return job, before


def test_status_and_set_speed_after_unmount(slow_job: tuple[Job, Path]) -> None:
    job, before = slow_job
    mounted = status(job.mountpoint).get("mounted")
    unmount(job)
    text = ok("status", job.mountpoint)
    assert "state:" in text.stdout, text.stdout
    st = status(job.mountpoint)
    assert st["mounted"] is False, st
    assert st["state"] in ("running", "completing"), st
    assert st["pid"] == job.pid and st["bytes_done"] < st["bytes_total"], st
    assert mounted is True, "status while mounted must say mounted: true"
    ok("set-speed", job.mountpoint, "0")
    job.wait_exit(15)
    assert record(job.target)["status"] == "complete"
    assert files_equal(job.target, before)


def test_cancel_after_unmount(slow_job: tuple[Job, Path]) -> None:
    job, _ = slow_job
    unmount(job)
    result = ok("cancel", job.mountpoint)
    assert "cancelled" in result.stdout, result.stdout
    job.wait_exit(15)
    assert record(job.target)["status"] == "cancelled"


def test_finish_after_unmount_waits_and_reports(slow_job: tuple[Job, Path]) -> None:
    job, before = slow_job
    unmount(job)
    ok("set-speed", job.mountpoint, "4M")  # what is left takes a few seconds
    result = ok("finish", job.mountpoint)
    assert result.stdout.splitlines()[0] == "complete", result.stdout
    assert pid_gone(job.pid), "finish returned before the job ended"
    assert record(job.target)["status"] == "complete"
    assert files_equal(job.target, before)


def test_ctrl_c_of_finish_keeps_the_job(slow_job: tuple[Job, Path]) -> None:
    job, before = slow_job
    finish = subprocess.Popen(
        [*COWFS, "finish", str(job.mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: not job.is_mounted(), 10, "finish to unmount")
        finish.send_signal(signal.SIGINT)
        _, err = finish.communicate(timeout=TIMEOUT)
    finally:
        if finish.poll() is None:
            finish.kill()
            finish.wait(TIMEOUT)
    assert finish.returncode != 0
    assert "Traceback" not in err, err
    assert not pid_gone(job.pid), "Ctrl-C of finish took the job down"
    ok("set-speed", job.mountpoint, "0")
    job.wait_exit(15)
    assert record(job.target)["status"] == "complete"
    assert files_equal(job.target, before)


# -- 10: Ctrl-C of a slow start leaves nothing behind --------------------------------------


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, but not the fusermount3 that libfuse's auto_unmount
    leaves watching the mount (it must stay to remove a mount whose daemon died)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        todo += children
        found += children
    return [p for p in found if not _is_fusermount(p)]


def _is_fusermount(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0]) == b"fusermount3"
    except FileNotFoundError:
        return True


def test_ctrl_c_during_a_slow_start(runner: CowfsRunner, tmp_path: Path) -> None:
    """A qcow2 target with a backing file over a 512 GiB sparse source: the start
    zero-flags every cluster, which takes seconds (about 6 s on a 2-core VM)."""
    source = tmp_path / "huge.img"
    with open(source, "xb"):
        pass
    os.truncate(source, 512 << 30)
    assert os.stat(source).st_blocks == 0
    backups = tmp_path / "backups"
    backups.mkdir()
    base = backups / "base.img"
    first = start(runner, source, base, mountpoint=tmp_path / "mnt")
    assert ok("finish", first.mountpoint).stdout.splitlines()[0] == "complete"
    first.wait_exit(15)
    keep = set(os.listdir(backups))

    mnt, target = tmp_path / "mnt2", backups / "t.qcow2"
    mnt.mkdir()
    args = [*COWFS, "mount", str(source), str(mnt), "--target", str(target)]
    args += ["--sync", "full", "--backing", str(base)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemons: list[int] = []
    try:
        # The mount comes before the slow part (fixing the point in time needs it).
        wait_until(lambda: mounts_at(mnt) or proc.poll() is not None, 20, "the mount")
        assert proc.poll() is None, "the start was too quick to interrupt: a bigger source"
        daemons = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
        with contextlib.suppress(TimeoutError):  # what lingers is asserted after cleanup
            wait_until(lambda: not mounts_at(mnt) and all(map(pid_gone, daemons)), 30)
        lingering = [pid for pid in daemons if not pid_gone(pid)], mounts_at(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        take_down(mnt, daemons, ((signal.SIGKILL, 10.0),))
    left = set(os.listdir(backups)) - keep
    assert left <= {"t.qcow2.cowfs.log"}, f"left behind: {sorted(left)}"
    assert lingering == ([], 0), "daemons still alive, mounts still there"
    assert not os.listdir(mnt)
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    for log in backups.glob("*.cowfs.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text()


# -- 11: pause and resume say when they cannot -----------------------------------------------


def test_resume_and_pause_refuse_the_wrong_state(runner: CowfsRunner, tmp_path: Path) -> None:
    source, before = image(tmp_path / "disk.img", 8 << 20, seed=111)
    job = start(runner, source, tmp_path / "t.img", "--speed", SLOW, mountpoint=tmp_path / "mnt")
    assert_one_error_line(run_cowfs("resume", job.mountpoint))
    assert status(job.mountpoint)["state"] == "running"
    ok("pause", job.mountpoint)
    assert_one_error_line(run_cowfs("pause", job.mountpoint))
    st = status(job.mountpoint)
    assert (st["state"], st["paused_reason"]) == ("paused", "user"), st
    ok("resume", job.mountpoint)
    assert status(job.mountpoint)["state"] == "running"
    ok("set-speed", job.mountpoint, "0")
    finish_complete(job, before)


def test_resume_of_a_failed_job_is_refused(
    runner: CowfsRunner, faulty: FaultyFS, tmp_path: Path
) -> None:
    make_image(faulty.backing_path("disk.img"), 4 << 20, seed=112, holes=False)
    faulty.fail("disk.img", "read", offset=3 << 20, length=4096)
    job = start(runner, faulty.path("disk.img"), tmp_path / "t.img", mountpoint=tmp_path / "mnt")
    wait_until(lambda: status(job.mountpoint)["state"] == "failed", 20, "the job to fail")
    assert_one_error_line(run_cowfs("resume", job.mountpoint))
    assert status(job.mountpoint)["state"] == "failed"
    result = run_cowfs("finish", job.mountpoint)
    assert result.returncode == 1, result.stdout + result.stderr
    assert record(job.target)["status"] == "failed"
