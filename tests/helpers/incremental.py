"""Incremental backups through real mounts: dirty bitmaps, random writes between and
during backups, backups that must complete, and qcow2 chain links judged by QEMU."""

import json
import random
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from conftest import files_equal

from helpers.mounting import CowfsRunner, run_cowfs
from helpers.mounts import assert_gone, write_live
from helpers.qemu import assert_identical, check_clean, qemu_img
from helpers.sizes import KiB, MiB

SIZE = 16 * MiB
CLUSTER = 64 * KiB
"""The default cluster size of a job and granularity of a bitmap."""
BITMAP = "nightly"
FULL_SPEED = "16M"
"""A full copy of SIZE takes about a second: the writes of a test surely land during it."""
INC_SPEED = "2M"
"""An incremental of a few hundred KiB is still copying while the test writes."""
BUDGET = SIZE // CLUSTER // 40
"""Clusters touched by the writes of one phase (2.5 %): an incremental copies two
phases' worth, under 10 % of the image."""

Write = tuple[int, bytes]


def bitmaps_file(source: Path) -> Path:
    """Where all bitmaps of `source` live: one JSON file beside it."""
    return source.with_name(f".{source.name}.cowfs-bitmaps.json")


def bitmaps(source: Path) -> dict[str, dict]:
    """`cowfs bitmap list SOURCE --json`, by name."""
    result = run_cowfs("bitmap", "list", source, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = json.loads(result.stdout)
    assert isinstance(listed, list), listed
    return {b["name"]: b for b in listed}


def clusters_of(writes: Iterable[Write], granularity: int = CLUSTER) -> set[int]:
    """Indices of the clusters (of `granularity` bytes) the writes touch."""
    touched: set[int] = set()
    for offset, data in writes:
        if data:
            last = offset + len(data) - 1
            touched.update(range(offset // granularity, last // granularity + 1))
    return touched


def assert_dirty(source: Path, name: str, writes: Iterable[Write]) -> None:
    """Bitmap `name` is consistent and holds exactly the clusters `writes` touched."""
    bitmap = bitmaps(source)[name]
    assert bitmap["consistent"] is True, bitmap
    granularity = bitmap["granularity"]
    size = source.stat().st_size
    dirty = clusters_of(writes, granularity)
    whole = len(dirty) * granularity
    clamped = sum(min(granularity, size - c * granularity) for c in dirty)
    assert bitmap["dirty_bytes"] in (whole, clamped), (bitmap, sorted(dirty))


def random_writes(
    rng: random.Random, size: int, budget: int, hot: Iterable[int] = (), most: int = 40
) -> list[Write]:
    """Writes touching at most `budget` clusters: random data of any length (1 B to
    128 KiB) and alignment, whole zero clusters (an incremental must store them as
    zeros, not leave them to the backing file), whole compressible clusters, and some
    aimed at the `hot` clusters (dirty ones, which the copier has still to copy)."""
    hot = sorted(hot)
    whole_clusters = size // CLUSTER
    writes: list[Write] = []
    touched: set[int] = set()
    while len(writes) < most:
        kind = rng.random()
        if kind < 0.3:
            offset = rng.randrange(whole_clusters) * CLUSTER
            if hot and rng.random() < 0.5:
                offset = min(rng.choice(hot), whole_clusters - 1) * CLUSTER
            data = bytes(CLUSTER) if kind < 0.15 else (rng.randbytes(16) + bytes(48)) * 1024
        else:
            length = int(2 ** rng.uniform(0, 17))
            if hot and rng.random() < 0.4:
                offset = min(rng.choice(hot) * CLUSTER + rng.randrange(CLUSTER), size - 1)
            else:
                offset = rng.randrange(size)
            data = rng.randbytes(min(length, size - offset))
        grown = touched | clusters_of([(offset, data)])
        if len(grown) > budget:
            break
        touched = grown
        writes.append((offset, data))
    assert writes, "budget too small for one write"
    return writes


def snapshot(source: Path, copy: Path) -> Path:
    shutil.copyfile(source, copy)
    return copy


def backup(
    cowfs: CowfsRunner,
    source: Path,
    target: Path,
    *options: str,
    writes: Sequence[Write] = (),
    speed: str = FULL_SPEED,
) -> Path:
    """One backup that must complete, with `writes` through the live file while it runs.
    Returns the PIT copy: the source as it was just before the mount."""
    pit = snapshot(source, target.with_name(target.name + ".pit"))
    m = cowfs.mount(source, target, "--speed", speed, *options)
    for offset, data in writes:
        write_live(m, data, offset)
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[0] == "complete", result.stdout
    assert_gone(m)
    return pit


def full_backup(
    cowfs: CowfsRunner, source: Path, target: Path, writes: Sequence[Write] = (), *extra: str
) -> Path:
    return backup(cowfs, source, target, "--bitmap", BITMAP, *extra, writes=writes)


def writes_between(cowfs: CowfsRunner, source: Path, target: Path, writes: Sequence[Write]) -> None:
    """Writes through a mount that backs up nothing of interest (`--sync none` into a
    throwaway target): a VM running on the live file between two backups."""
    backup(cowfs, source, target, "--sync", "none", writes=writes)


def incremental_options(backing: Path, name: str = BITMAP) -> list[str]:
    return ["--sync", "incremental", "--bitmap", name, "--backing", str(backing)]


def assert_restores(link: Path, pit: Path) -> dict:
    """A link judged by QEMU: check clean, compare identical to its PIT copy, and a
    `qemu-img convert` to raw gives back the PIT copy byte for byte. Returns the
    check report."""
    report = check_clean(link)
    assert_identical(link, pit)
    restored = link.with_name(link.name + ".restored")
    done = qemu_img("convert", "-f", "qcow2", "-O", "raw", link, restored)
    assert done.returncode == 0, done.stderr
    size = pit.stat().st_size
    assert restored.stat().st_size == -(-size // 512) * 512  # QEMU counts whole sectors
    assert files_equal(restored, pit, limit=size)
    with open(restored, "rb") as f:
        f.seek(size)
        assert not any(f.read())
    restored.unlink()
    return report


def changed_clusters(a: Path, b: Path) -> set[int]:
    """The clusters in which two images differ."""
    changed = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for index in range(-(-max(a.stat().st_size, b.stat().st_size) // CLUSTER)):
            if fa.read(CLUSTER) != fb.read(CLUSTER):
                changed.add(index)
    return changed
