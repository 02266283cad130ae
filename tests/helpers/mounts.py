"""Real-mount helpers: write through the live file, read a target's record, and check
that a daemon is gone or that a command failed with one clear line."""

import json
import os
import subprocess
from pathlib import Path

from helpers.mounting import CowfsRunner, Mounted, cowfs_mounts, pid_gone, run_cowfs


def write_live(m: Mounted, data: bytes, offset: int) -> None:
    fd = os.open(m.live, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def info(target: Path) -> tuple[int, str]:
    """`cowfs info TARGET`: exit code and first line of its output."""
    result = run_cowfs("info", target)
    lines = (result.stdout or result.stderr).splitlines()
    return result.returncode, lines[0] if lines else ""


def record(target: Path) -> dict:
    return json.loads(Path(f"{target}.cowfs.json").read_text())


def assert_one_error_line(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cowfs: error: "), result.stderr
    assert "Traceback" not in result.stderr


def assert_gone(m: Mounted) -> None:
    """The daemon has exited and its mount is gone; the mountpoint is an empty directory."""
    assert pid_gone(m.pid), f"daemon {m.pid} still running"
    assert not m.is_mounted(), f"{m.mountpoint} still mounted"
    assert m.mountpoint.is_dir() and not os.listdir(m.mountpoint)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: to prove nothing changed."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return found


def refused_mount(
    cowfs: CowfsRunner, tmp_path: Path, source: Path, target: Path, *options: str
) -> str:
    """A mount that must be refused: exit 2 with one line, and nothing created or
    changed (no target, no record, no log, bitmaps untouched, nothing mounted).
    Returns the error line."""
    mnt = tmp_path / "mnt-refused"
    mnt.mkdir(exist_ok=True)
    files = tree(tmp_path)
    result = run_cowfs("mount", source, mnt, "--target", target, *options)
    cowfs.adopt(mnt, source, target)  # a daemon that came up anyway (a bug) goes at teardown
    assert_one_error_line(result)
    assert str(mnt) not in cowfs_mounts()
    assert not os.listdir(mnt)
    assert tree(tmp_path) == files
    return result.stderr.strip()
