"""Checksums (cowfs/sums.py), reading links back (cowfs/target/reader.py), chains
(cowfs/chainread.py) and merging checksums (cowfs/commit.py), without a mount.

Why: verify and restore trust nothing but these. A link is read on its own (which
clusters the file itself holds), every cluster is checked against the checksum of
the link that holds it, and a damaged file, table or checksum file must be named.
Chains here are built with the real target writers and the real checksum recorder,
with links of different cluster sizes, compressed and zero clusters and a partial
last cluster; QEMU's `qemu-img convert` is the judge of what the chain reads as.
"""

import os
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers.qemu import qemu_img

from cowfs.chainread import BackupChain, CorruptCluster
from cowfs.commit import merged_sums
from cowfs.errors import CowfsError
from cowfs.record import Record, record_path, write_record
from cowfs.sums import ABSENT, DATA, ZERO, Checksums, Recording, sums_path
from cowfs.target import Qcow2Target, RawTarget
from cowfs.target.reader import Qcow2Link, open_link
from cowfs.transfer import write_nonzero

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

KiB, MiB = 1 << 10, 1 << 20
SIZE = 3 * MiB + 5000  # a partial last cluster


def make_link(
    path: Path,
    image: bytearray,
    clusters: list[int],
    cs: int,
    backing: Path | None = None,
    compress: bool = False,
    raw: bool = False,
) -> Checksums:
    """A complete link holding `clusters` of `image` (written as the copier writes:
    zero clusters as zeros), with its checksums and record beside it."""
    if raw:
        target: RawTarget | Qcow2Target = RawTarget.create(path, len(image))
    else:
        name = None if backing is None else Path(backing.name)
        target = Qcow2Target.create(path, len(image), cs, name, "qcow2", compress=compress)
    sums = Checksums(len(image), cs)
    writer = Recording(target, sums)
    for c in clusters:
        offset = c * cs
        length = min(cs, len(image) - offset)
        write_nonzero(writer, bytearray(image[offset : offset + length]), offset, length, cs)
    target.fsync()
    target.close()
    now = datetime.now(UTC).isoformat()
    record = Record(
        status="complete",
        source="src",
        target=str(path),
        format="raw" if raw else "qcow2",
        size=len(image),
        cluster_size=cs,
        sync="incremental" if backing else "full",
        point_in_time=now,
        pid=os.getpid(),
        started=now,
        job=os.urandom(16).hex(),
        checksums=sums.save(sums_path(path)),
    )
    write_record(record_path(path), record, reserve=False)
    return sums


def image_data(rng: random.Random) -> bytearray:
    data = bytearray(rng.randbytes(SIZE))
    for start in range(0, SIZE, 256 * KiB):  # some zero clusters
        data[start : start + 64 * KiB] = bytes(len(data[start : start + 64 * KiB]))
    return data


@pytest.fixture
def chain3(tmp_path: Path) -> tuple[Path, bytes]:
    """base (64 KiB clusters, all) <- mid (4 KiB, compressed) <- top (16 KiB, a few):
    returns the top and the image it must read as."""
    rng = random.Random(7)
    image = image_data(rng)
    base = tmp_path / "base.qcow2"
    make_link(base, image, list(range(-(-SIZE // (64 * KiB)))), 64 * KiB)
    mid = tmp_path / "mid.qcow2"
    mid_clusters = sorted(rng.sample(range(-(-SIZE // (4 * KiB))), 100)) + [SIZE // (4 * KiB)]
    for c in mid_clusters:
        image[c * 4 * KiB : (c + 1) * 4 * KiB] = rng.randbytes(len(image[c * 4 * KiB :][: 4 * KiB]))
    image[: 4 * KiB] = bytes(4 * KiB)  # a cluster that becomes zero over a data one
    make_link(mid, image, [0, *mid_clusters], 4 * KiB, backing=base, compress=True)
    top = tmp_path / "top.qcow2"
    top_clusters = [1, 5, 6, 100, SIZE // (16 * KiB)]
    for c in top_clusters:
        image[c * 16 * KiB : (c + 1) * 16 * KiB] = rng.randbytes(
            len(image[c * 16 * KiB :][: 16 * KiB])
        )
    assert len(image) == SIZE
    make_link(top, image, top_clusters, 16 * KiB, backing=mid)
    return top, bytes(image)


def read_all(chain: BackupChain) -> bytes:
    return b"".join(chain.read(offset, length) for offset, length in chain.blocks())


def flip(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0x10]), offset)
    finally:
        os.close(fd)


def test_checksum_file_round_trip_and_damage(tmp_path: Path) -> None:
    sums = Checksums(SIZE, 64 * KiB)
    sums.data(0, memoryview(b"x" * 64 * KiB))
    sums.zero(64 * KiB, 128 * KiB)
    path = tmp_path / "t.cowfs.sums"
    sha = sums.save(path)
    loaded = Checksums.load(path, sha)
    assert loaded.states[:4] == bytes([DATA, ZERO, ZERO, ABSENT])
    assert loaded.digest_of(0) == sums.digest_of(0) != bytes(16)
    flip(path, 30)
    with pytest.raises(CowfsError, match="damaged"):
        Checksums.load(path, sha)


def test_chain_reads_what_qemu_reads(chain3: tuple[Path, bytes], tmp_path: Path) -> None:
    top, expected = chain3
    chain = BackupChain.open(top)
    try:
        assert [link.sums.cluster_size for link in chain.links] == [16 * KiB, 4 * KiB, 64 * KiB]
        assert chain.cluster_size == 64 * KiB
        assert read_all(chain) == expected
        assert list(chain.verify()) == []
    finally:
        chain.close()
    out = tmp_path / "qemu.raw"
    assert qemu_img("convert", "-O", "raw", top, out).returncode == 0
    assert out.read_bytes()[:SIZE] == expected


def test_reader_structure_matches_qemu_check(chain3: tuple[Path, bytes]) -> None:
    top, _ = chain3
    for path in (top, top.with_name("mid.qcow2"), top.with_name("base.qcow2")):
        link = open_link(path)
        assert isinstance(link, Qcow2Link)
        try:
            assert link.check(SIZE) == []
        finally:
            link.close()
        assert qemu_img("check", path).returncode == 0


@pytest.mark.parametrize("victim", ["top", "mid", "base"])
def test_a_flipped_bit_in_any_link_is_found(chain3: tuple[Path, bytes], victim: str) -> None:
    top, _ = chain3
    path = top.with_name(f"{victim}.qcow2")
    link = open_link(path)
    assert isinstance(link, Qcow2Link)
    sums = Checksums.load(sums_path(path), _record_sha(path))
    i = next(i for i in range(sums.count) if sums.states[i] == DATA)
    guest = i * sums.cluster_size
    entry = link._entry(guest)
    link.close()
    host = entry & ((1 << 56) - 1) & ~511
    if entry & (1 << 62):  # compressed: the host offset has no flag bits to strip
        host = entry & ((1 << (62 - (sums.cluster_size.bit_length() - 1 - 8))) - 1)
    flip(path, host + 3)
    chain = BackupChain.open(top)
    try:
        problems = list(chain.verify())
    finally:
        chain.close()
    assert problems and str(path) in problems[0] and f"offset {guest}" in problems[0]


def test_a_refcount_or_table_out_of_the_file_is_found(chain3: tuple[Path, bytes]) -> None:
    top, _ = chain3
    base = top.with_name("base.qcow2")
    os.truncate(base, os.path.getsize(base) - 128 * KiB)
    link = open_link(base)
    try:
        problems = link.check(SIZE)
    finally:
        link.close()
    assert any("beyond the end of the file" in p for p in problems), problems
    chain = BackupChain.open(top)
    try:
        with pytest.raises(CorruptCluster):
            read_all(chain)
    finally:
        chain.close()


def test_a_raw_link_with_data_in_a_hole_is_found(tmp_path: Path) -> None:
    image = image_data(random.Random(3))
    path = tmp_path / "top.raw"
    cs = 64 * KiB
    held = [c for c in range(-(-SIZE // cs)) if c % 3]  # as a `top` job: holes left out
    for c in range(-(-SIZE // cs)):
        if c not in held:
            image[c * cs : (c + 1) * cs] = bytes(len(image[c * cs : (c + 1) * cs]))
    assert len(image) == SIZE
    make_link(path, image, held, cs, raw=True)
    chain = BackupChain.open(path)
    try:
        assert read_all(chain) == bytes(image[:SIZE])
        flip(path, 0 * cs + 77)  # cluster 0 is a hole
        assert any("hole of the backup holds data" in p for p in chain.verify())
    finally:
        chain.close()


def test_merged_checksums_are_the_upper_over_the_base() -> None:
    base, upper = Checksums(4 * 64 * KiB, 64 * KiB), Checksums(5 * 64 * KiB, 64 * KiB)
    for i in range(4):
        base.data(i * 64 * KiB, memoryview(bytes([i + 1]) * 64 * KiB))
    upper.data(64 * KiB, memoryview(b"u" * 64 * KiB))
    upper.zero(2 * 64 * KiB, 64 * KiB)
    merged = merged_sums(upper, base)
    assert merged.states == bytearray([DATA, DATA, ZERO, DATA, ABSENT])
    assert merged.digest_of(0) == base.digest_of(0)
    assert merged.digest_of(1) == upper.digest_of(1)
    assert merged.digest_of(3) == base.digest_of(3)


def _record_sha(path: Path) -> str:
    from cowfs.record import read_record

    sha = read_record(path).checksums
    assert sha is not None
    return sha
