"""Real tools on the live file while the copier runs: dd, qemu-io, fio, fallocate, O_DIRECT.

A VM or a backup script drives the live file with these tools, not with Python's
pwrite, and they take paths (O_DIRECT, Linux AIO, fallocate) that plain buffered
writes never reach. Each test writes through the mount while a speed-limited
copier is still at work, finishes, and then checks both halves of the guarantee:
the target equals the copy of the source taken before the mount (point in time),
and the source holds exactly what the tool wrote (the live file is the source).
"""

import ctypes
import errno
import json
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import CowfsRunner, Mounted, run_cowfs

SIZE = 8 << 20
SPEED = "4M"
"""8 MiB at 4 MiB/s: the copier needs well over a second, so writes near the end of the
image race it (copy-before-write), yet finishing costs about two seconds per test."""
TOOL_TIMEOUT = 30.0
KIB = 1 << 10


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path]:
    """The source and a plain copy of it taken before the mount (the expected target)."""
    source = make_image(tmp_path / "disk.img", SIZE, seed=7, holes=False)
    before = tmp_path / "before.img"
    shutil.copyfile(source, before)
    return source, before


def expected_copy(before: Path, dest: Path) -> Path:
    """A plain copy to which a test applies the same writes as the tool does."""
    shutil.copyfile(before, dest)
    return dest


def pwrite_file(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def tool(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """Run a tool to completion (killed on timeout by subprocess.run)."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TOOL_TIMEOUT
    )


def finish_and_check(m: Mounted, before: Path, expected_source: Path) -> dict:
    """Finish the backup; the target is the point in time, the source what was written."""
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("complete")
    assert not m.is_mounted()
    assert files_equal(m.target, before), "target differs from the point in time"
    assert files_equal(m.source, expected_source), "source differs from what was written"
    info = run_cowfs("info", m.target, "--json")
    assert info.returncode == 0, info.stdout + info.stderr
    return json.loads(info.stdout)


def test_dd_oflag_direct(cowfs: CowfsRunner, image: tuple[Path, Path], tmp_path: Path) -> None:
    source, before = image
    expected = expected_copy(before, tmp_path / "expected.img")
    m = cowfs.mount(source, None, "--speed", SPEED)
    writes = [
        # (block size, seek in blocks, count): near the end first so that it races the copier,
        # then 4 KiB blocks straddling a cluster boundary, then the very last block.
        (64 * KIB, SIZE // (64 * KIB) - 20, 3),
        (4 * KIB, (3 << 20) // (4 * KIB) - 3, 8),
        (4 * KIB, SIZE // (4 * KIB) - 1, 1),
    ]
    for n, (bs, seek, count) in enumerate(writes):
        data = os.urandom(bs * count)
        chunk = tmp_path / f"chunk{n}.bin"
        chunk.write_bytes(data)
        done = tool(
            "dd",
            f"if={chunk}",
            f"of={m.live}",
            f"bs={bs}",
            f"seek={seek}",
            f"count={count}",
            "conv=notrunc",
            "oflag=direct",
            "status=none",
        )
        assert done.returncode == 0, done.stderr
        pwrite_file(expected, data, seek * bs)
    assert m.live.stat().st_size == SIZE
    # Read back through the mount with O_DIRECT too.
    readback = tmp_path / "readback.img"
    done = tool("dd", f"if={m.live}", f"of={readback}", "bs=1M", "iflag=direct", "status=none")
    assert done.returncode == 0, done.stderr
    assert files_equal(readback, expected)
    record = finish_and_check(m, before, expected)
    assert record["bytes_cbw"] > 0, "the writes did not race the copier"


@pytest.mark.parametrize("aio", ["native", "threads"])
def test_qemu_io_nocache_aio(
    cowfs: CowfsRunner, image: tuple[Path, Path], tmp_path: Path, aio: str
) -> None:
    source, before = image
    expected = expected_copy(before, tmp_path / "expected.img")
    m = cowfs.mount(source, None, "--speed", SPEED)
    writes = [  # (pattern, offset, length): end of the image first, to race the copier
        (0xAB, SIZE - 64 * KIB, 64 * KIB),
        (0xCD, (6 << 20) - 4 * KIB, 8 * KIB),  # straddles a cluster boundary
        (0xEF, 0, 4 * KIB),
        (0x5A, (5 << 20) + 512, 1536),  # sector-aligned, not page-aligned
        (0x11, SIZE - 192 * KIB, 128 * KIB),
    ]
    commands: list[str] = []
    for pattern, offset, length in writes:
        commands += ["-c", f"write -P {pattern:#x} {offset} {length}"]
        pwrite_file(expected, bytes([pattern]) * length, offset)
    # Read every write back with pattern verification, and some untouched data.
    for pattern, offset, length in writes[1:]:
        commands += ["-c", f"read -P {pattern:#x} {offset} {length}"]
    commands += ["-c", "flush"]
    done = tool("qemu-io", "-n", "-f", "raw", "--aio", aio, *commands, m.live)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout + done.stderr, done.stdout + done.stderr
    # The first write was overwritten partly by the last one: verify the survivor.
    done = tool(
        "qemu-io",
        "-n",
        "-f",
        "raw",
        "--aio",
        aio,
        "-r",
        "-c",
        f"read -P 0xab {SIZE - 64 * KIB} {64 * KIB}",
        m.live,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = finish_and_check(m, before, expected)
    assert record["bytes_cbw"] > 0, "the writes did not race the copier"


def fio_args(filename: Path, *extra: str) -> list[str]:
    return [
        "fio",
        "--name=cowfs-randwrite",
        f"--filename={filename}",
        "--rw=randwrite",
        "--bs=4k",
        f"--size={SIZE}",
        "--io_size=2M",
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=1234",
        "--output-format=terse",
        "--verify_state_save=0",  # no state file in the working directory
        *extra,
    ]


def test_fio_randwrite_verify(cowfs: CowfsRunner, image: tuple[Path, Path]) -> None:
    source, before = image
    m = cowfs.mount(source, None, "--speed", SPEED)
    done = tool(*fio_args(m.live))
    assert done.returncode == 0, done.stdout + done.stderr
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("complete")
    assert files_equal(m.target, before), "target differs from the point in time"
    # The source holds what fio wrote: replay the same seeded workload in verify-only mode.
    done = tool(*fio_args(source, "--verify_only"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not files_equal(source, before)
    info = run_cowfs("info", m.target)
    assert info.returncode == 0, info.stdout


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate_errno(path: Path, mode: int, offset: int, length: int) -> int:
    """errno of a raw fallocate(2) (0 on success); glibc's posix_fallocate would emulate."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, mode, offset, length) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(fd)


def test_fallocate_fails_and_changes_nothing(
    cowfs: CowfsRunner, image: tuple[Path, Path], tmp_path: Path
) -> None:
    source, before = image
    m = cowfs.mount(source, None, "--speed", SPEED)
    punch = tool("fallocate", "--punch-hole", "-o", str(SIZE - 256 * KIB), "-l", "128K", m.live)
    assert punch.returncode != 0, "punch-hole through the mount succeeded"
    grow = tool("fallocate", "-l", str(2 * SIZE), m.live)
    assert grow.returncode != 0, "fallocate -l through the mount succeeded"
    zero = tool("fallocate", "--zero-range", "-o", "0", "-l", "64K", m.live)
    assert zero.returncode != 0, "zero-range through the mount succeeded"
    punch_mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert _fallocate_errno(m.live, punch_mode, SIZE - 128 * KIB, 64 * KIB) == errno.EOPNOTSUPP
    assert _fallocate_errno(m.live, 0, 0, 2 * SIZE) == errno.EOPNOTSUPP
    # Nothing changed: not the live file (read through the mount), nor its size.
    assert m.live.stat().st_size == SIZE
    assert files_equal(m.live, before)
    assert m.status()["state"] == "running"
    finish_and_check(m, before, before)
    assert source.stat().st_size == SIZE


def test_python_o_direct(cowfs: CowfsRunner, image: tuple[Path, Path], tmp_path: Path) -> None:
    source, before = image
    expected = expected_copy(before, tmp_path / "expected.img")
    m = cowfs.mount(source, None, "--speed", SPEED)
    length = 128 * KIB
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    data = os.urandom(length)
    buf.write(data)
    offsets = [SIZE - length, (4 << 20) - 8 * KIB]  # end first; then across a cluster boundary
    fd = os.open(m.live, os.O_RDWR | os.O_DIRECT)
    try:
        for offset in offsets:
            assert os.pwrite(fd, buf, offset) == length
            pwrite_file(expected, data, offset)
        os.fsync(fd)
        back = mmap.mmap(-1, length)
        for offset in offsets:
            assert os.preadv(fd, [back], offset) == length
            assert back[:] == data
    finally:
        os.close(fd)
    record = finish_and_check(m, before, expected)
    assert record["bytes_cbw"] > 0, "the writes did not race the copier"
