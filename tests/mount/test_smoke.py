"""The shortest real path: mount, write through the live file, finish, compare."""

import os
import shutil

from conftest import files_equal, make_image


def test_write_then_finish_gives_point_in_time(cowfs, tmp_path):
    source = make_image(tmp_path / "disk.img", 8 << 20, seed=1)
    shutil.copyfile(source, tmp_path / "before.img")
    m = cowfs.mount(source, None, "--speed", "4M")
    fd = os.open(m.live, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 100_000, 12345)
    finally:
        os.close(fd)
    result = m.finish()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("complete")
    assert files_equal(m.target, tmp_path / "before.img")
    assert not m.is_mounted()
