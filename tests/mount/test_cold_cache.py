"""Copy-before-write and reads when the source is not in the page cache.

The daemon serves cached data inline and sends reads that would block on the
disk to a worker thread (RWF_NOWAIT first). These tests evict the source from
the page cache, prove the eviction took (a RWF_NOWAIT read of it comes back
short or EAGAIN), and check that both paths still keep the point in time and
return what was written.
"""

import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.pagecache import evict

CLUSTER = 64 << 10


def cached(path: Path, offset: int, length: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(length)], offset, os.RWF_NOWAIT) == length
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("sync", ["none", "full"])
def test_cold_source_keeps_point_in_time(cowfs, tmp_path: Path, sync: str) -> None:
    size = 6 * (1 << 20) + 12345
    source = make_image(tmp_path / "disk.img", size, seed=7, holes=False)
    before = tmp_path / "before.img"
    shutil.copyfile(source, before)
    evict(source)
    m = cowfs.mount(source, None, "--sync", sync, "--speed", "2M")
    rng = random.Random(7)
    model = bytearray(before.read_bytes())
    touched: set[int] = set()
    fd = os.open(m.live, os.O_RDWR)
    try:
        for _ in range(40):
            offset = rng.randrange(size - 200_000)
            data = rng.randbytes(rng.randrange(1, 200_000))
            os.pwrite(fd, data, offset)
            touched.update(range(offset // CLUSTER, (offset + len(data) - 1) // CLUSTER + 1))
            model[offset : offset + len(data)] = data
            evict(source)
            length = rng.randrange(1, 300_000)
            at = rng.randrange(size)
            assert os.pread(fd, length, at) == bytes(model[at : at + length])
    finally:
        os.close(fd)
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert source.read_bytes() == bytes(model)
    if sync == "full":
        assert files_equal(m.target, before)
    else:
        target, old = m.target.read_bytes(), before.read_bytes()
        for c in range(-(-size // CLUSTER)):
            chunk = slice(c * CLUSTER, (c + 1) * CLUSTER)
            want = old[chunk] if c in touched else bytes(len(old[chunk]))
            assert target[chunk] == want, f"cluster {c}"


def test_eviction_is_real(tmp_path: Path) -> None:
    """The premise of the tests above: after evict(), a RWF_NOWAIT read cannot be served."""
    source = make_image(tmp_path / "disk.img", 4 << 20, seed=3, holes=False)
    assert cached(source, 1 << 20, 65536)
    evict(source)
    assert not cached(source, 1 << 20, 65536)
