"""The repository's objects and rules without a mount (cowfs/repo/FORMAT.md).

Why: another tool must be able to read a repository from FORMAT.md alone, and the
rules that keep data (retention, gc, the locks between gc and backups) must hold
whatever the order of events. These run on a directory store, which answers as S3.
"""

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta

import pytest
import zstandard

from cowfs.repo.format import (
    CHUNK_MAGIC,
    ZERO_HASH,
    Index,
    Manifest,
    chunk_key,
    decode_chunk,
    encode_chunk,
    snapshot_key,
    split_snapshot,
    stamp_of,
)
from cowfs.repo.maintenance import Retention, gc, to_keep, verify
from cowfs.repo.repository import Repository
from cowfs.repo.store import RepoError


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Repository.init(str(tmp_path / "repo"), None, 1 << 20)


def test_chunk_object_is_magic_codec_and_a_zstd_frame_named_by_its_sha256():
    data = b"cowfs" * 50000
    obj = encode_chunk(data)
    assert obj[:8] == CHUNK_MAGIC and obj[8] == 1
    assert zstandard.ZstdDecompressor().decompress(obj[9:]) == data
    digest = hashlib.sha256(data).digest()
    assert decode_chunk(obj, digest, len(data)) == data
    assert chunk_key(digest) == f"chunks/{digest.hex()[:2]}/{digest.hex()[2:4]}/{digest.hex()}"


def test_incompressible_chunk_is_stored_raw_and_damage_is_found():
    data = os.urandom(100000)
    obj = encode_chunk(data)
    assert obj[8] == 0 and obj[9:] == data
    digest = hashlib.sha256(data).digest()
    damaged = bytearray(obj)
    damaged[5000] ^= 1
    with pytest.raises(ValueError, match="SHA-256"):
        decode_chunk(bytes(damaged), digest, len(data))


def test_index_round_trips_and_refuses_damage():
    hashes = [hashlib.sha256(bytes([i])).digest() for i in range(3)] + [ZERO_HASH]
    index = Index(1 << 20, (3 << 20) + 5, hashes)
    data = index.encode()
    again = Index.decode(data, "x")
    assert again.hashes == hashes and again.size == index.size
    assert again.extent(3) == (3 << 20, 5)
    for pos in (0, 20, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 1
        with pytest.raises(RepoError):
            Index.decode(bytes(bad), "x")


def test_snapshot_names():
    t = datetime(2026, 11, 30, 2, 0, 0, 123456, tzinfo=UTC)
    assert stamp_of(t, False) == "2026-11-30T02:00:00Z"
    assert stamp_of(t, True) == "2026-11-30T02:00:00.123456Z"
    assert split_snapshot("vda.img@2026-11-30T02:00:00Z") == ("vda.img", "2026-11-30T02:00:00Z")
    for bad in ("vda.img", "@x", "a/b@x", "vda@"):
        with pytest.raises(RepoError):
            split_snapshot(bad)
    # any file name: spaces, UTF-8 and `@` too, percent-encoded in keys only
    assert split_snapshot("my disk é@1.img@T") == ("my disk é@1.img", "T")
    key = snapshot_key("my disk é@1.img", "T", ".json")
    assert key == "snapshots/my%20disk%20%C3%A9%401.img/T.json"


def _manifest(image: str, when: datetime) -> Manifest:
    stamp = stamp_of(when, False)
    return Manifest(
        image, f"{image}@{stamp}", 1, 1 << 20, 65536, when.isoformat(), None,
        f"snapshots/{image}/{stamp}.index", "", 1, 0, 0, 0, 0,
    )  # fmt: skip


def test_retention_keeps_the_newest_of_each_period_and_always_the_newest():
    start = datetime(2026, 1, 1, 3, tzinfo=UTC)
    daily = [_manifest("a", start + timedelta(days=d)) for d in range(60)]
    kept = to_keep(daily, Retention(daily=7))
    assert kept == {m.snapshot for m in daily[-7:]}
    kept = to_keep(daily, Retention(weekly=4))
    weeks = {m.time.isocalendar()[:2] for m in daily if m.snapshot in kept}
    assert len(kept) == 4 and len(weeks) == 4
    assert daily[-1].snapshot in kept
    monthly = to_keep(daily, Retention(monthly=2))
    assert monthly == {daily[-1].snapshot, daily[58].snapshot}  # Mar 1 and Feb 28
    assert to_keep(daily, Retention(last=1)) == {daily[-1].snapshot}


def _put_snapshot(repo: Repository, image: str, when: datetime, chunks: list[bytes]) -> Manifest:
    hashes = []
    for data in chunks:
        digest = hashlib.sha256(data).digest()
        repo.put_chunk(digest, data)
        hashes.append(digest)
    size = len(chunks) << 20
    manifest = _manifest(image, when)
    manifest.size, manifest.chunks = size, len(chunks)
    repo.put_snapshot(manifest, Index(1 << 20, size, hashes))
    return manifest


def test_gc_deletes_exactly_the_unreferenced_chunks_and_raises_the_generation(repo):
    when = datetime(2026, 11, 30, tzinfo=UTC)
    a, b, c = (bytes([n]) * (1 << 20) for n in (1, 2, 3))
    old = _put_snapshot(repo, "vda", when, [a, b])
    _put_snapshot(repo, "vda", when + timedelta(days=1), [a, c])
    assert len(repo.known_chunks()) == 3
    repo.delete_snapshot(old)
    assert gc(repo, timedelta(hours=1)).deleted == 0  # b is young: spared
    report = gc(repo, timedelta(0))
    assert report.deleted == 1 and report.referenced == 2
    keys = {info.key for info in repo.chunk_infos()}
    assert keys == {chunk_key(hashlib.sha256(x).digest()) for x in (a, c)}
    assert repo.generation() == 2
    assert len(repo.known_chunks()) == 2  # the cache was rebuilt: b is no longer known


def test_verify_names_the_snapshots_a_bad_chunk_breaks(repo):
    when = datetime(2026, 11, 30, tzinfo=UTC)
    a, b = bytes([1]) * (1 << 20), os.urandom(1 << 20)
    s1 = _put_snapshot(repo, "vda", when, [a, b])
    s2 = _put_snapshot(repo, "vdb", when, [b])
    s3 = _put_snapshot(repo, "vdc", when, [a])
    assert not verify(repo).broken
    path = repo.store.root / chunk_key(hashlib.sha256(b).digest())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(data)
    report = verify(repo)
    assert set(report.broken) == {s1.snapshot, s2.snapshot}
    assert s3.snapshot not in report.broken
    assert repo.bad_chunks() == {hashlib.sha256(b).digest()}
    assert json.loads((repo.store.root / "bad-chunks.json").read_text())["chunks"]


def test_gc_and_backups_exclude_each_other(repo):
    repo.lock_backup("job1")
    with pytest.raises(RepoError, match="a backup runs"):
        gc(repo, timedelta(0))
    repo.unlock_backup("job1")
    repo.lock_gc()
    with pytest.raises(RepoError, match="a gc runs"):
        repo.lock_backup("job2")
    repo.unlock_gc()
    repo.lock_backup("job2")
    repo.unlock_backup("job2")


def test_a_dead_backups_lock_does_not_stop_gc(repo):
    lock = repo.store.root / "locks" / "backup-dead.json"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7, "started": "x"}))
    gc(repo, timedelta(0))
    assert not lock.exists()


def test_chunks_holding_equals_chunk_by_chunk():
    """The run-walking count under the barrier gives what checking each chunk gives."""
    import random

    from bitarray import bitarray

    from cowfs.repo.chunker import chunks_holding

    rng = random.Random(5)
    for _ in range(200):
        n, per = rng.randrange(1, 300), rng.choice([1, 2, 4, 16, 64])
        bits = bitarray([rng.random() < rng.choice([0.01, 0.2, 0.9]) for _ in range(n)])
        slow = {i for i in range(-(-n // per)) if bits[i * per : (i + 1) * per].any()}
        assert chunks_holding(bits, per) == slow
