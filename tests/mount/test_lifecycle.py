"""How a backup job ends, and what it says about itself while it runs.

A job can end in many ways: `cowfs finish`, an unmount by `fusermount3 -u` or
`umount`, `cowfs cancel`, SIGTERM/SIGINT, kill -9. Each must leave the mount gone,
the daemon gone, and a record that tells the truth (only a finished job says
`complete`), because scripts decide from `cowfs info`'s exit code whether a
target can be trusted. A crashed job must not block the next one.
"""

import os
import shutil
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import (
    TIMEOUT,
    CowfsRunner,
    Mounted,
    cowfs_mounts,
    pid_gone,
    run_cowfs,
    wait_until,
)
from helpers.mounts import assert_gone, assert_one_error_line, info, record, write_live

SIZE = 8 << 20
SLOW = "1M"
"""A copier that needs several seconds: the job is surely still copying when a test acts."""
FAST = "16M"
"""Still running when the mount returns, but finishing costs only a fraction of a second."""


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", SIZE, seed=11, holes=False)


@pytest.fixture
def before(source: Path, tmp_path: Path) -> Path:
    """A copy of the source taken before the mount: what a complete target must equal."""
    copy = tmp_path / "before.img"
    shutil.copyfile(source, copy)
    return copy


def start_running(cowfs: CowfsRunner, source: Path, *options: str) -> Mounted:
    """A slow job with one copy-before-write near the end, verified to be copying."""
    m = cowfs.mount(source, None, "--speed", SLOW, *options)
    write_live(m, b"w" * 70_000, SIZE - 100_000)
    st = m.status()
    assert st["state"] == "running"
    assert st["bytes_done"] < st["bytes_total"]
    return m


# -- ending well ------------------------------------------------------------------


def test_finish(cowfs: CowfsRunner, source: Path, before: Path) -> None:
    m = cowfs.mount(source, None, "--speed", FAST)
    write_live(m, b"x" * 200_000, SIZE - 300_000)
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "complete"
    assert_gone(m)
    assert info(m.target) == (0, "complete")
    assert files_equal(m.target, before)
    assert record(m.target)["status"] == "complete"


@pytest.mark.parametrize(
    "unmount", [["fusermount3", "-u"], ["umount"]], ids=["fusermount3", "umount"]
)
def test_unmount_finishes(
    cowfs: CowfsRunner, source: Path, before: Path, unmount: list[str]
) -> None:
    m = cowfs.mount(source, None, "--speed", FAST)
    write_live(m, os.urandom(300_000), SIZE - 310_000)
    done = subprocess.run([*unmount, str(m.mountpoint)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m.wait_exit()  # on the daemon's pid: it copies the rest before exiting
    assert_gone(m)
    assert info(m.target) == (0, "complete")
    assert files_equal(m.target, before)


# -- ending early -----------------------------------------------------------------


def test_cancel(cowfs: CowfsRunner, source: Path) -> None:
    m = start_running(cowfs, source)
    result = run_cowfs("cancel", m.mountpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "cancelled"
    assert_gone(m)
    assert info(m.target) == (1, "cancelled")
    assert record(m.target)["status"] == "cancelled"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_cancels(cowfs: CowfsRunner, source: Path, signum: signal.Signals) -> None:
    m = start_running(cowfs, source)
    os.kill(m.pid, signum)
    m.wait_exit()
    wait_until(lambda: not m.is_mounted(), 10, "the mount to go away")
    assert_gone(m)
    assert info(m.target) == (1, "cancelled")
    assert any(signum.name in e for e in record(m.target)["errors"])


def test_kill9_leaves_incomplete_and_next_mount_works(
    cowfs: CowfsRunner, source: Path, tmp_path: Path
) -> None:
    m = start_running(cowfs, source)
    os.kill(m.pid, signal.SIGKILL)
    m.wait_exit()
    # auto_unmount removes the mount by itself; fusermount3 -u clears it if it has not yet.
    try:
        wait_until(lambda: not m.is_mounted(), 5, "auto_unmount after kill -9")
    except TimeoutError:
        done = subprocess.run(
            ["fusermount3", "-u", str(m.mountpoint)], capture_output=True, text=True
        )
        assert done.returncode == 0 or "not mounted" in done.stderr, done.stderr
    assert not m.is_mounted()
    code, first = info(m.target)
    assert code == 1
    assert first.startswith("incomplete"), first
    assert record(m.target)["status"] != "complete"

    # The next job on the same source and mountpoint works and completes.
    again = tmp_path / "again.img"
    shutil.copyfile(source, again)  # includes the write of the killed job
    m2 = cowfs.mount(source, None, "--speed", FAST, "--force", mountpoint=m.mountpoint)
    write_live(m2, b"y" * 1000, 12345)
    result = m2.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert info(m2.target) == (0, "complete")
    assert files_equal(m2.target, again)


# -- one job per source -------------------------------------------------------------


def test_second_mount_of_same_source_fails(
    cowfs: CowfsRunner, source: Path, before: Path, tmp_path: Path
) -> None:
    m = cowfs.mount(source, None, "--speed", FAST)
    mnt2, target2 = tmp_path / "mnt2", tmp_path / "target2.img"
    mnt2.mkdir()
    result = run_cowfs("mount", source, mnt2, "--target", target2)
    cowfs.adopt(mnt2, source, target2)  # a daemon that came up anyway (a bug) goes at teardown
    assert_one_error_line(result)
    assert "in use" in result.stderr
    assert [mp for mp in cowfs_mounts() if mp.startswith(str(tmp_path))] == [str(m.mountpoint)]
    assert not os.listdir(mnt2)
    assert not target2.exists() and not Path(f"{target2}.cowfs.json").exists()
    # The first job did not notice (it may have ended complete while mounted).
    assert m.status()["state"] in ("running", "complete")
    write_live(m, b"z" * 5000, 4096)
    done = m.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    assert files_equal(m.target, before)


@pytest.mark.parametrize("victim", ["target", "source"])
def test_force_onto_a_file_of_a_running_job_fails(
    cowfs: CowfsRunner, source: Path, before: Path, tmp_path: Path, victim: str
) -> None:
    """QEMU refuses (image locking); cowfs must not replace a file another job is using
    (still copying at SLOW: a job that completed has let go of its target)."""
    m = cowfs.mount(source, None, "--speed", SLOW)
    other = make_image(tmp_path / "other.img", 1 << 20, seed=12, holes=False)
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    target2 = m.target if victim == "target" else source
    source_inode = source.stat().st_ino
    result = run_cowfs("mount", other, mnt2, "--target", target2, "--force")
    cowfs.adopt(mnt2, other, target2)  # a daemon that came up anyway (the bug) goes at teardown
    assert_one_error_line(result)
    assert not os.listdir(mnt2)
    assert source.stat().st_ino == source_inode
    assert run_cowfs("set-speed", m.mountpoint, "0").returncode == 0  # the rest at once
    done = m.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    assert files_equal(m.target, before)
    assert files_equal(source, before)


# -- while it runs -------------------------------------------------------------------


def test_status_while_running(cowfs: CowfsRunner, source: Path, before: Path) -> None:
    m = cowfs.mount(source, None, "--speed", "4M", "--cluster-size", "128K")
    st = m.status()
    assert st["state"] == "running"
    assert st["source"] == str(source.absolute())
    assert st["target"] == str(m.target.absolute())
    assert st["mountpoint"] == str(m.mountpoint.absolute())
    assert st["pid"] == m.pid and not pid_gone(m.pid)
    assert st["sync"] == "full"
    assert st["format"] == "raw"
    assert st["cluster_size"] == 128 << 10
    assert st["speed"] == 4 << 20
    assert st["size"] == SIZE
    assert st["bytes_total"] == SIZE
    assert 0 <= st["bytes_done"] < SIZE
    assert st["bytes_cbw"] == 0
    assert st["errors"] == []
    datetime.fromisoformat(st["point_in_time"])
    for key in ("bytes_copier", "bytes_written", "rate", "elapsed_s"):
        assert st[key] >= 0, key
    assert "eta_s" in st

    write_live(m, b"c" * 5, SIZE - 5)  # the last cluster: surely not copied yet
    after = m.status()
    assert after["bytes_cbw"] == 128 << 10
    assert after["bytes_done"] >= st["bytes_done"] + (128 << 10)
    assert after["point_in_time"] == st["point_in_time"]

    text = run_cowfs("status", m.mountpoint)
    assert text.returncode == 0, text.stderr
    assert "state: running" in text.stdout.splitlines()
    for word in ("point in time:", "progress:", "copy-before-write", "rate:"):
        assert word in text.stdout, text.stdout

    assert m.finish().returncode == 0
    assert files_equal(m.target, before)
    assert record(m.target)["bytes_cbw"] == 128 << 10


# -- foreground ------------------------------------------------------------------------


def test_foreground_exits_0_when_complete(cowfs: CowfsRunner, source: Path, before: Path) -> None:
    m = cowfs.mount(source, None, "--speed", FAST, foreground=True)
    assert m.proc is not None and m.proc.poll() is None
    write_live(m, b"f" * 65536, SIZE - 65536)
    done = subprocess.run(["fusermount3", "-u", str(m.mountpoint)], capture_output=True)
    assert done.returncode == 0, done.stderr
    out, err = m.proc.communicate(timeout=TIMEOUT)
    assert m.proc.returncode == 0, out + err
    assert out.splitlines()[0] == "complete", out
    assert_gone(m)
    assert files_equal(m.target, before)
    assert info(m.target) == (0, "complete")


def test_foreground_sigint_exits_1(cowfs: CowfsRunner, source: Path) -> None:
    m = cowfs.mount(source, None, "--speed", SLOW, foreground=True)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGINT)
    out, err = m.proc.communicate(timeout=TIMEOUT)
    assert m.proc.returncode == 1, out + err
    assert out.splitlines()[0] == "cancelled", out
    assert_gone(m)
    assert info(m.target) == (1, "cancelled")


# -- commands without a job -------------------------------------------------------------


def test_info_without_record(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"not a backup")
    assert_one_error_line(run_cowfs("info", plain))
    assert_one_error_line(run_cowfs("info", tmp_path / "missing.img"))
    assert plain.read_bytes() == b"not a backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.img"]


@pytest.mark.parametrize("command", ["status", "finish", "cancel"])
def test_job_commands_without_mount(tmp_path: Path, command: str) -> None:
    assert_one_error_line(run_cowfs(command, tmp_path))
    assert_one_error_line(run_cowfs(command, tmp_path / "missing"))
