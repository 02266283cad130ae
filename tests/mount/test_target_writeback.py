"""The copier has the kernel write the target back as it goes (cowfs/target/writeback.py).

Why: left to the kernel, everything the copier wrote stays dirty in the page cache until
the kernel's dirty threshold or its 30 s expiry, and the job's final fsync waits for it
all at once. Once the guest is gone (after `finish` unmounted the live file) nothing is
spared by waiting. Seen per file with cachestat(2): while the copier goes on after the
unmount, the target's dirty pages stay within one writeback step.
"""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import COWFS, CowfsRunner, wait_for, wait_until
from helpers.pagecache import cachestat
from helpers.qemu import assert_identical, check_clean

from cowfs.control import read_status
from cowfs.errors import CowfsError
from cowfs.target.writeback import EVERY

MiB = 1 << 20
SIZE = 192 * MiB
BOUND = EVERY + 4 * MiB
"""Writeback was started at most EVERY bytes ago, and a batch may be on its way."""


def dirty_bytes(path: Path) -> int:
    return cachestat(path).nr_dirty * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_copied_data_goes_to_disk_once_the_guest_is_gone(
    cowfs: CowfsRunner, tmp_path: Path, fmt: str
) -> None:
    source = make_image(tmp_path / "disk.img", SIZE, seed=71, holes=False)
    fd = os.open(source, os.O_RDONLY)
    os.fsync(fd)  # the source's own dirty pages are not the target's
    os.close(fd)
    target = tmp_path / f"target.{fmt}"
    m = cowfs.mount(source, target, "--sync", "full", "--speed", "32M")
    finisher = subprocess.Popen([*COWFS, "finish", str(m.mountpoint)], stdout=subprocess.PIPE)
    try:
        wait_until(lambda: not m.is_mounted(), 20, "finish to unmount")
        wait_until(lambda: m.status()["bytes_done"] >= SIZE // 2, 30, "the copier half-way")

        samples: list[str] = []

        def drained_or_ended() -> bool:
            dirty = dirty_bytes(target)  # sampled before the look at the job: if it still
            try:  # copies, the sample was taken before its final fsync began
                st = read_status(m.mountpoint)
                copying = st["bytes_done"] < st["bytes_total"]
            except CowfsError:  # the daemon is gone: the job is over
                copying = False
            samples.append(f"{dirty // MiB} MiB" if copying else "the job ended")
            return not copying or dirty <= BOUND

        # Without the writeback, at least the half copied would stay dirty (the kernel
        # writes back after 30 s) until the job's final fsync.
        assert wait_for(drained_or_ended, 20) and samples[-1] != "the job ended", (
            f"the target's dirty bytes while the copier ran, last samples: {samples[-6:]}"
        )
        out, _ = finisher.communicate(timeout=60)
    finally:
        finisher.kill()
        finisher.wait()
    assert finisher.returncode == 0 and out.startswith(b"complete"), out
    if fmt == "raw":
        assert files_equal(target, source)
    else:
        check_clean(target)
        assert_identical(target, source)
