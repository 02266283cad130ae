"""Who may reach the live file: the mounting user only, or with --allow-other anyone the
source's owner and mode admit (default_permissions), checked as the user `nobody`."""

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_image

SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory `nobody` can traverse (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="cowfs-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SETPRIV, *command], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("allow_other", [False, True])
def test_who_can_read_and_write(cowfs, tmp_path: Path, public_dir: Path, allow_other: bool):
    source = make_image(tmp_path / "disk.img", 1 << 20, seed=5)
    source.chmod(0o644)
    mnt = public_dir / "mnt"
    m = cowfs.mount(source, None, *(["--allow-other"] if allow_other else []), mountpoint=mnt)
    st, live = os.stat(source), os.stat(m.live)
    assert (live.st_mode, live.st_uid, live.st_gid) == (st.st_mode, st.st_uid, st.st_gid)

    read = as_nobody("dd", f"if={m.live}", "of=/dev/null", "bs=64k", "count=1")
    write = as_nobody("dd", "if=/dev/zero", f"of={m.live}", "bs=4k", "count=1", "conv=notrunc")
    assert write.returncode != 0  # 0644 root: never writable by nobody
    if allow_other:
        assert read.returncode == 0, read.stderr
        assert "Permission denied" in write.stderr
    else:
        assert read.returncode != 0 and "Permission denied" in read.stderr

    if allow_other:  # the kernel checks the source's mode as it is now
        os.chmod(m.live, 0o600)
        assert os.stat(source).st_mode & 0o777 == 0o600
        denied = as_nobody("dd", f"if={m.live}", "of=/dev/null", "bs=64k", "count=1")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert m.finish().returncode == 0
