"""Bad input to `cowfs mount`: one clear line, exit 2, and nothing changed.

Backup scripts run unattended. A refused request must say why in one line a
person can read in a cron mail (`cowfs: error: ...`, no usage block, no
traceback), exit 2 so that the script can tell it from an incomplete backup
(1), and leave no trace: no target, record or log created, an existing target
untouched, no mount left behind and the mountpoint as it was.
"""

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import (
    COWFS,
    STOP_TEST,
    TIMEOUT,
    CowfsRunner,
    is_mounted,
    run_cowfs,
    serving_pids,
    take_down,
)

SIZE = 1 << 20


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """tmp_path with a source `disk.img` and an empty mountpoint `mnt`."""
    make_image(tmp_path / "disk.img", SIZE, seed=3, holes=False)
    (tmp_path / "mnt").mkdir()
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything observable under root: type, mode, size, mtime and content of each entry.

    Does not descend into mount points, nor open anything but regular files."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if os.path.ismount(os.path.join(dirpath, name)):
                dirnames.remove(name)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content: str | None = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            entries[os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                st.st_mtime_ns,
                content,
            )
    return entries


def mounts_under(root: Path) -> set[str]:
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f if line.split()[1].startswith(str(root))}


def clean_stray_mount(mountpoint: Path) -> None:
    """If a refused request mounted anyway (a bug), take that daemon down."""
    if is_mounted(mountpoint):
        take_down(mountpoint, serving_pids(mountpoint), STOP_TEST)


def assert_refused(
    result: subprocess.CompletedProcess, root: Path, before: dict, mounts: set[str]
) -> None:
    try:
        assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, f"want one line, got: {result.stderr!r}"
        assert lines[0].startswith("cowfs: error: "), lines[0]
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        assert mounts_under(root) == mounts, "a mount was left behind"
        assert snapshot(root) == before, "a refused request changed files"
    finally:
        for mountpoint in mounts_under(root) - mounts:
            clean_stray_mount(Path(mountpoint))


def refuse(root: Path, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    """Run `cowfs mount ARGS` in root and assert it is refused without a trace."""
    before, mounts = snapshot(root), mounts_under(root)
    result = run_cowfs("mount", *args)
    assert_refused(result, root, before, mounts)
    return result


# -- each case: a function that prepares `area` and returns the mount arguments ------------

Case = Callable[[Path], list[str | os.PathLike]]


def _std(area: Path, *extra: str) -> list[str | os.PathLike]:
    return [area / "disk.img", area / "mnt", "--target", area / "target.img", *extra]


def missing_source(a: Path) -> list:
    return [a / "nope.img", a / "mnt", "--target", a / "target.img"]


def source_is_directory(a: Path) -> list:
    (a / "srcdir").mkdir()
    return [a / "srcdir", a / "mnt", "--target", a / "target.img"]


def source_is_dev_null(a: Path) -> list:
    return ["/dev/null", a / "mnt", "--target", a / "target.img"]


def source_is_fifo(a: Path) -> list:
    os.mkfifo(a / "fifo")
    return [a / "fifo", a / "mnt", "--target", a / "target.img"]


def source_is_symlink_to_directory(a: Path) -> list:
    (a / "srcdir").mkdir()
    (a / "srclink").symlink_to(a / "srcdir")
    return [a / "srclink", a / "mnt", "--target", a / "target.img"]


def existing_target(a: Path) -> list:
    (a / "target.img").write_bytes(b"an older backup" * 1000)
    return _std(a)


def existing_target_with_record(a: Path) -> list:
    (a / "target.img").write_bytes(b"an older backup" * 1000)
    (a / "target.img.cowfs.json").write_text('{"status": "complete"}\n')
    return _std(a)


def target_is_source(a: Path) -> list:
    return [a / "disk.img", a / "mnt", "--target", a / "disk.img"]


def target_is_source_relative(a: Path) -> list:
    return [a / "disk.img", a / "mnt", "--target", a / "mnt" / ".." / "disk.img"]


def target_symlink_to_source(a: Path) -> list:
    (a / "link.img").symlink_to(a / "disk.img")
    return [a / "disk.img", a / "mnt", "--target", a / "link.img"]


def target_via_directory_symlink(a: Path) -> list:
    (a / "dirlink").symlink_to(a)
    return [a / "disk.img", a / "mnt", "--target", a / "dirlink" / "disk.img"]


def target_hard_link_to_source(a: Path) -> list:
    os.link(a / "disk.img", a / "hard.img")
    return [a / "disk.img", a / "mnt", "--target", a / "hard.img"]


def target_is_directory(a: Path) -> list:
    (a / "target.img").mkdir()
    return _std(a, "--force")


def mountpoint_missing(a: Path) -> list:
    return [a / "disk.img", a / "nomnt", "--target", a / "target.img"]


def mountpoint_not_directory(a: Path) -> list:
    (a / "file").write_bytes(b"x")
    return [a / "disk.img", a / "file", "--target", a / "target.img"]


def mountpoint_not_empty(a: Path) -> list:
    (a / "mnt" / "something").write_bytes(b"x")
    return _std(a)


def mountpoint_is_the_source(a: Path) -> list:
    return [a / "disk.img", a / "disk.img", "--target", a / "target.img"]


def target_inside_mountpoint(a: Path) -> list:
    return [a / "disk.img", a / "mnt", "--target", a / "mnt" / "target.img"]


def target_directory_missing(a: Path) -> list:
    return [a / "disk.img", a / "mnt", "--target", a / "nodir" / "target.img"]


def target_with_two_images(a: Path) -> list:
    shutil.copyfile(a / "disk.img", a / "other.img")
    return [a / "disk.img", a / "other.img", a / "mnt", "--target", a / "target.img"]


def two_images_of_one_name(a: Path) -> list:
    (a / "sub").mkdir()
    shutil.copyfile(a / "disk.img", a / "sub" / "disk.img")
    return [a / "disk.img", a / "sub" / "disk.img", a / "mnt"]


def no_mountpoint(a: Path) -> list:
    return [a / "disk.img"]


def unknown_sync_mode(a: Path) -> list:
    return _std(a, "--sync", "bogus")


def unknown_option(a: Path) -> list:
    return _std(a, "--bogus")


def _with(*extra: str) -> Case:
    def case(a: Path) -> list:
        return _std(a, *extra)

    return case


CASES: dict[str, Case] = {
    "missing source": missing_source,
    "source is a directory": source_is_directory,
    "source is /dev/null": source_is_dev_null,
    "source is a fifo": source_is_fifo,
    "source is a symlink to a directory": source_is_symlink_to_directory,
    "existing target": existing_target,
    "existing target with record": existing_target_with_record,
    "target is a directory, --force": target_is_directory,
    "mountpoint missing": mountpoint_missing,
    "mountpoint not a directory": mountpoint_not_directory,
    "mountpoint not empty": mountpoint_not_empty,
    "mountpoint is the source": mountpoint_is_the_source,
    "target inside the mountpoint": target_inside_mountpoint,
    "target directory missing": target_directory_missing,
    "--target with two images": target_with_two_images,
    "two images of one name": two_images_of_one_name,
    "no mountpoint": no_mountpoint,
    "unknown sync mode": unknown_sync_mode,
    "unknown option": unknown_option,
}
for _size in ("3K", "2097153", "1K", "32M", "abc", "0", "64Q"):
    CASES[f"cluster size {_size}"] = _with("--cluster-size", _size)
for _speed in ("fast", "-1", "=-1", "1.5M"):
    flag = "--speed" + _speed if _speed.startswith("=") else "--speed"
    value = () if _speed.startswith("=") else (_speed,)
    CASES[f"speed {_speed}"] = _with(flag, *value)

SAME_FILE: dict[str, Case] = {
    "same path": target_is_source,
    "same path, other spelling": target_is_source_relative,
    "symlink": target_symlink_to_source,
    "via a directory symlink": target_via_directory_symlink,
    "hard link": target_hard_link_to_source,
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refused(area: Path, case: Case) -> None:
    refuse(area, *case(area))


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", SAME_FILE.values(), ids=SAME_FILE.keys())
def test_target_is_the_source(area: Path, case: Case, force: bool) -> None:
    source_before = (area / "disk.img").read_bytes()
    result = refuse(area, *case(area), *(["--force"] if force else []))
    assert "source" in result.stderr
    assert (area / "disk.img").read_bytes() == source_before


def test_existing_target_message_mentions_force(area: Path) -> None:
    existing_target(area)
    result = refuse(area, *_std(area))
    assert "--force" in result.stderr


# -- mountpoints that are already mounted -------------------------------------------------


@pytest.fixture
def tmpfs_on_mnt(area: Path) -> Iterator[Path]:
    mnt = area / "mnt"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "cowfs-test", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_mountpoint_is_a_tmpfs(area: Path, tmpfs_on_mnt: Path) -> None:
    refuse(area, *_std(area))
    assert os.path.ismount(tmpfs_on_mnt)
    assert os.listdir(tmpfs_on_mnt) == []


def test_mountpoint_has_a_cowfs_mount(area: Path, cowfs: CowfsRunner) -> None:
    other = make_image(area / "other.img", 4 << 20, seed=5, holes=False)
    shutil.copyfile(other, area / "other-before.img")
    m = cowfs.mount(other, area / "other-target.img", "--speed", "1M")
    assert m.mountpoint == area / "mnt"
    result = refuse(area, *_std(area))
    assert "mount" in result.stderr
    # The first job did not notice.
    assert m.is_mounted()
    assert m.status()["state"] == "running"
    assert os.listdir(m.mountpoint) == ["other.img"]
    run_cowfs("set-speed", m.mountpoint, "0", check=True)
    done = m.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    assert files_equal(m.target, area / "other-before.img")


# -- permissions: root ignores mode bits, so ask as an unprivileged user ----------------------


@pytest.fixture
def nobody_area() -> Iterator[Path]:
    """A world-accessible directory (tmp_path is root's alone) for a run as `nobody`."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    probe = subprocess.run(
        [*NOBODY, sys.executable, "-c", "import cowfs"], capture_output=True, text=True
    )
    if probe.returncode:
        pytest.skip(f"cannot run cowfs as nobody: {probe.stderr.strip()[-200:]}")
    root = Path(tempfile.mkdtemp(prefix="cowfs-nobody-"))
    try:
        root.chmod(0o777)
        make_image(root / "disk.img", SIZE, seed=9, holes=False)
        (root / "mnt").mkdir()
        os.chown(root / "mnt", 65534, 65534)
        yield root
    finally:
        clean_stray_mount(root / "mnt")
        shutil.rmtree(root)


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.mark.parametrize("mode", [0o000, 0o444, 0o222], ids=["000", "444", "222"])
def test_source_without_access(nobody_area: Path, mode: int) -> None:
    (nobody_area / "disk.img").chmod(mode)
    before, mounts = snapshot(nobody_area), mounts_under(nobody_area)
    args = _std(nobody_area)
    result = subprocess.run(
        [*NOBODY, *COWFS, "mount", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert_refused(result, nobody_area, before, mounts)
    assert "disk.img" in result.stderr
