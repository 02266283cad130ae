"""Backups into a deduplicating chunk repository (cowfs/repo/FORMAT.md), on a directory
and on a real S3 engine (radosgw), each test with a repository of its own.

Why: a snapshot in a repository is worth what it restores, and a repository is worth
what its maintenance leaves intact. Every backup here is taken as a VM's would be: a
long-lived mount of two images (`cowfs mount A B MP`), writers on both live files, and
`cowfs backup MP --repo REPO --wait` while they write, so that copy-before-write does
real work. The expected image is a copy of each live file taken while the writers are
held, just before `backup`; the writers go on once the job id is printed. Then:

1. a full and three incrementals under writers: every snapshot's index is the image at
   its point in time (read here per FORMAT.md, not through cowfs), and restores to it,
   plainly and live;
2. dedup: a copy of an image uploads nothing new, and an incremental uploads at most
   the chunks its writes touched; a chunk two images share is stored once;
3. a damaged or missing chunk: verify names exactly the snapshots that reference it,
   a restore of one fails naming it, and the next backup uploads it again;
4. prune keeps the newest per image (--dry-run deletes nothing), gc deletes exactly the
   chunks nothing references any more, and a chunk gc deleted is uploaded again;
5. kill -9 mid-upload leaves no snapshot and orphans that gc deletes; gc and backup
   refuse to run together;
6. bad input: one line, exit 2, nothing changed, the mount keeps serving;
7. a chunk whose upload failed is uploaded by the next backup (the store refused it: a
   file in its folder's place, or 500s from a proxy in front of radosgw).

Bugs these found, fixed since: `cowfs cancel` of a repository job read a record file
that does not exist; a chunk two images of one job share was uploaded twice; a chunk
whose upload failed was taken as stored by the next backup.
"""

import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.live_restore import LiveRestores
from helpers.mounting import (
    COWFS,
    CURRENT,
    TIMEOUT,
    Cli,
    CowfsRunner,
    Mounted,
    ok,
    pid_gone,
    run_cowfs,
    wait_until,
)
from helpers.radosgw import Endpoint, make_bucket
from helpers.repo import (
    ZERO,
    DirObjects,
    Repo,
    S3Objects,
    chunk_hashes,
    chunk_key,
    dir_repo,
    restore_snapshot,
)
from helpers.s3faults import FaultProxy
from helpers.sizes import KiB, MiB
from helpers.views import Writers, assert_refused, clusters

from cowfs.control import send_command
from cowfs.record import FINAL_STATES

CHUNK = 1 * MiB
"""`repo init --chunk-size 1M`: a 16 MiB image is 16 chunks."""
CLUSTER = 64 * KiB
SIZE_A = 16 * MiB
SIZE_B = 20 * MiB - 3000
"""Not a whole number of clusters: the last chunk (and cluster) is short."""
BITMAP = "nightly"
FULL_SPEED = "16M"
"""Per image: a full copy takes about a second, the writes land while it copies."""
INC_SPEED = "8M"
BEFORE = 24
"""Writes on each image between two backups: the next incremental's dirty data."""
DURING = 24
"""Writes on each image once `backup` has fixed the point in time, while the job copies."""
LINE = re.compile(r"^(?P<image>\S+): (?P<state>\w+)  ->  (?P<target>\S+)$")


# -- repositories --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remembered endpoints and the cache of known chunks stay in the test's directory
    (the daemons inherit these too: the daemon keeps the cache)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint comes from init


@pytest.fixture(params=["dir", "radosgw"])
def repo(
    request: pytest.FixtureRequest,
    cowfs: CowfsRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Repo]:
    """A repository not yet initialised: a directory, or a fresh bucket on the session's
    radosgw (conftest's fixture) with its keys in the environment, as a user has them.
    The bucket goes after the test's daemons (a job of a failed test may still upload)."""
    if request.param == "dir":
        yield dir_repo(tmp_path / "repo")
        return
    rgw: Endpoint = request.getfixturevalue("radosgw")
    for name, value in rgw.env().items():
        if name.startswith("AWS_"):  # the endpoint is given to `repo init` and remembered
            monkeypatch.setenv(name, value)
    bucket = f"cowfs-repo-{uuid.uuid4().hex[:16]}"
    make_bucket(rgw, bucket)
    objects = S3Objects(rgw.url, rgw.access_key, rgw.secret_key, bucket)
    try:
        yield Repo("s3", f"s3://{bucket}/repo", objects, endpoint=rgw.url)
    finally:
        try:
            cowfs.teardown()  # the daemons first
        finally:
            objects.remove_bucket()


def s3_only(repo: Repo) -> None:
    if repo.kind != "s3":
        pytest.skip("an S3 case")


# -- mounts, writers and backups ---------------------------------------------------------------


@dataclass
class Snap:
    image: str
    name: str
    """IMAGE@TIME."""
    pit: Path
    """A copy of the live file at the snapshot's point in time."""
    since: set[int]
    """Chunks the writes since the previous snapshot's point in time touched."""


def serve_two(cowfs: CowfsRunner, tmp_path: Path, seed: int, b_copy_of_a: bool = False) -> Mounted:
    a = make_image(tmp_path / "a.img", SIZE_A, seed)
    if b_copy_of_a:
        b = tmp_path / "b.img"
        shutil.copyfile(a, b)
    else:
        b = make_image(tmp_path / "b.img", SIZE_B, seed + 100)
    return cowfs.serve(tmp_path / "mnt", a, b)


def live(m: Mounted, image: str) -> Path:
    return m.mountpoint / image


def pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def first_line(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args} in {timeout} s"
    return proc.stdout.readline().strip()


def parse_done(repo: Repo, out: str) -> dict[str, str]:
    """`IMAGE: complete  ->  REPO/IMAGE@TIME` lines of `backup --wait`: image -> IMAGE@TIME."""
    done = {}
    for line in out.splitlines()[1:]:
        match = LINE.match(line)
        assert match, f"not an `IMAGE: STATE  ->  TARGET` line: {line!r} in {out!r}"
        assert match["state"] == "complete", out
        target = match["target"]
        assert target.startswith(repo.url + "/"), (repo.url, out)
        name = target[len(repo.url) + 1 :]
        assert name.startswith(match["image"] + "@"), out
        done[match["image"]] = name
    return done


def backup(m: Mounted, repo: Repo, *options: str) -> dict[str, str]:
    """`cowfs backup MP --repo REPO OPTIONS --wait` that must end complete."""
    result = ok("backup", m.mountpoint, "--repo", repo.url, *options, "--wait")
    assert result.stdout.splitlines()[0].isdigit(), result.stdout
    return parse_done(repo, result.stdout)


def backup_under_writers(
    m: Mounted,
    writers: dict[str, Writers],
    repo: Repo,
    marks: dict[str, int],
    *options: str,
    speed: str,
) -> dict[str, Snap]:
    """`cowfs backup MP --repo REPO OPTIONS --wait` while the writers write: BEFORE writes
    on each image, then (writers held) the point-in-time copies, then the backup; DURING
    writes each as soon as it printed its job id. Every image must end complete, with
    copy-before-write done for it. `marks`: how many writes each image's writers had
    issued at the previous point in time (updated)."""
    for w in writers.values():
        w.grant(BEFORE)
    for w in writers.values():
        w.settle()
    pits, since = {}, {}
    for image, w in writers.items():
        pit = m.mountpoint.parent / f"{image}.pit{len(w.intended)}"
        shutil.copyfile(live(m, image), pit)
        pits[image] = pit
        with w.cond:
            writes = w.intended[marks.get(image, 0) :]
            marks[image] = len(w.intended)
        since[image] = clusters(writes, CHUNK)
    command = [*COWFS, "backup", str(m.mountpoint), "--repo", repo.url, "--speed", speed]
    proc = subprocess.Popen(
        [*command, *options, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        first = first_line(proc)
        if first.isdigit():  # the job's id: the point in time is fixed
            for w in writers.values():
                w.grant(DURING)
            for w in writers.values():
                w.settle()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (proc.returncode, first, out, err)
    done = parse_done(repo, first + "\n" + out)
    assert sorted(done) == sorted(writers), (done, out)
    snaps = {}
    for image, name in done.items():
        record = repo.manifest(name)["record"]
        assert record["status"] == "complete" and record["format"] == "repo", record
        assert record["bytes_cbw"] > 0, f"no write overlapped the job of {image}: {record}"
        snaps[image] = Snap(image, name, pits[image], since[image])
    return snaps


def writers_on(m: Mounted, image: str, seed: int) -> Writers:
    return Writers(live(m, image), os.path.getsize(live(m, image)), seed, paced=True)


# -- checks -------------------------------------------------------------------------------------


def assert_snapshot_is(repo: Repo, snap: Snap, rows: list[dict], stored: set[bytes]) -> dict:
    """The manifest and index of `snap`, read per FORMAT.md, describe its point-in-time
    copy: one SHA-256 per chunk of the image (zero chunks stored nowhere), every chunk
    it references `stored`; `repo list --json` (its `rows`) says the same."""
    manifest = repo.manifest(snap.name)
    data = snap.pit.read_bytes()
    index = repo.index(snap.name)
    assert index.size == manifest["size"] == len(data), (index.size, len(data))
    assert index.chunk_size == manifest["chunk_size"] == CHUNK
    assert manifest["cluster_size"] == CLUSTER, manifest
    expected = chunk_hashes(data, CHUNK)
    wrong = [i for i, (h, e) in enumerate(zip(index.hashes, expected, strict=True)) if h != e]
    assert not wrong, f"{snap.name}: chunks {wrong} are not the image at its point in time"
    assert manifest["zero_chunks"] == expected.count(ZERO), manifest
    nonzero = sum(min(CHUNK, len(data) - i * CHUNK) for i, h in enumerate(expected) if h != ZERO)
    assert manifest["data_bytes"] == nonzero, (manifest["data_bytes"], nonzero)
    assert index.chunks() <= stored, f"{snap.name} references chunks not stored"
    row = next(r for r in rows if r["snapshot"] == snap.name)
    for key in ("size", "point_in_time", "parent", "new_bytes", "data_bytes", "chunks"):
        assert row[key] == manifest[key], (key, row, manifest)
    return manifest


def assert_restores(repo: Repo, snap: Snap, tmp_path: Path) -> None:
    dest = tmp_path / f"restored-{snap.name.replace(':', '')}.img"
    restore_snapshot(repo, snap.name, dest)
    assert files_equal(dest, snap.pit), f"restore of {snap.name} is not its point in time"
    assert dest.stat().st_size == snap.pit.stat().st_size
    dest.unlink()


def assert_live_restores(repo: Repo, snap: Snap, restores: LiveRestores, tmp_path: Path) -> None:
    """`cowfs restore REPO/IMAGE@TIME DEST --live MP`: the live file reads as the point in
    time at once (chunks fetched on demand), and after the unmount DEST is it too."""
    dest = tmp_path / f"live-{snap.image}"
    mountpoint = tmp_path / f"live-mnt-{snap.image}"
    r = restores.start(repo.snapshot_url(snap.name), dest, mountpoint)  # type: ignore[arg-type]
    assert files_equal(r.live, snap.pit), f"the live file of {snap.name} differs"
    result = r.unmount()
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.splitlines()[:2] == [f"unmounted {mountpoint}", "complete"], result
    assert files_equal(dest, snap.pit), f"DEST of the live restore of {snap.name} differs"


# -- 1. a full and three incrementals under writers -------------------------------------------


def test_full_and_incrementals_under_writers_restore(
    cowfs: CowfsRunner, repo: Repo, restores: LiveRestores, tmp_path: Path
) -> None:
    repo.init("1M")
    m = serve_two(cowfs, tmp_path, seed=1)
    images = ["a.img", "b.img"]
    spool = tmp_path / "spool"
    spool.mkdir()
    snaps: list[dict[str, Snap]] = []
    marks: dict[str, int] = {}
    ws = {image: writers_on(m, image, seed=10 + n) for n, image in enumerate(images)}
    with contextlib.ExitStack() as stack:
        for w in ws.values():
            stack.enter_context(w)
        for n in range(4):
            sync, speed = ("full", FULL_SPEED) if n == 0 else ("incremental", INC_SPEED)
            options = ["--sync", sync, "--bitmap", BITMAP, "--spool", str(spool)]
            snaps.append(backup_under_writers(m, ws, repo, marks, *options, speed=speed))
    assert not os.listdir(spool), "the spool left files behind"

    rows = repo.rows()
    stored = repo.chunks()
    names = [row["snapshot"] for row in rows]
    assert sorted(names) == sorted(s.name for round_ in snaps for s in round_.values())
    for n, round_ in enumerate(snaps):
        pits = {repo.manifest(s.name)["point_in_time"] for s in round_.values()}
        assert len(pits) == 1, f"one point in time for the group: {pits}"
        for image, snap in round_.items():
            manifest = assert_snapshot_is(repo, snap, rows, set(stored))
            assert manifest["record"]["sync"] == ("full" if n == 0 else "incremental")
            assert manifest["record"]["bitmap"] == BITMAP
            assert manifest["parent"] == (None if n == 0 else snaps[n - 1][image].name)
            if n:  # only chunks that the writes since the parent touched
                assert manifest["new_chunks"] <= len(snap.since), (manifest, sorted(snap.since))
    manifests = repo.manifests().values()
    assert sum(mf["new_chunks"] for mf in manifests) == len(stored), "a chunk uploaded twice"
    assert sum(mf["new_bytes"] for mf in manifests) == sum(stored.values())
    repo.assert_verifies(snapshots=8)

    for round_ in snaps:
        for snap in round_.values():
            assert_restores(repo, snap, tmp_path)
    assert_live_restores(repo, snaps[0]["b.img"], restores, tmp_path)
    assert_live_restores(repo, snaps[-1]["a.img"], restores, tmp_path)


# -- 2. dedup ----------------------------------------------------------------------------------


def test_dedup_across_images_and_incrementals(
    cowfs: CowfsRunner, repo: Repo, tmp_path: Path
) -> None:
    """b.img starts as a copy of a.img: its full uploads nothing. Then a whole chunk
    written with the same data in both images is stored once; an incremental uploads
    at most the chunks its writes touched. Chunks of the default size (4 MiB)."""
    big = 4 * MiB
    repo.init(chunk_size=None)
    assert repo.config()["chunk_size"] == big
    a = make_image(tmp_path / "a.img", 24 * MiB, seed=2, holes=False)
    b = tmp_path / "b.img"
    shutil.copyfile(a, b)
    m = cowfs.serve(tmp_path / "mnt", a, b)
    distinct = {h for h in chunk_hashes(a.read_bytes(), big) if h != ZERO}

    full_a = backup(m, repo, "--image", "a.img", "--bitmap", BITMAP)["a.img"]
    ma = repo.manifest(full_a)
    assert ma["new_chunks"] == len(distinct), ma
    stored = repo.stored_bytes()
    assert ma["new_bytes"] == stored > 0, (ma, stored)

    full_b = backup(m, repo, "--image", "b.img", "--bitmap", BITMAP)["b.img"]
    mb = repo.manifest(full_b)
    assert (mb["new_chunks"], mb["new_bytes"]) == (0, 0), mb
    assert repo.stored_bytes() == stored
    assert repo.index(full_b) == repo.index(full_a)
    rows = {r["snapshot"]: r for r in repo.rows()}
    assert rows[full_b]["new_bytes"] == 0 and rows[full_b]["data_bytes"] == 24 * MiB, rows

    # a.img: new data into chunk 1, and X into chunk 2; b.img: the same X into chunk 2
    # and a few bytes into chunks 1 and 4
    rng = random.Random(3)
    same = rng.randbytes(big)
    pwrite(live(m, "a.img"), rng.randbytes(big), 1 * big)
    for image in ("a.img", "b.img"):
        pwrite(live(m, image), same, 2 * big)
    for chunk in (1, 4):
        pwrite(live(m, "b.img"), rng.randbytes(1000), chunk * big + 12345)
    inc_a = backup(m, repo, "--image", "a.img", "--sync", "incremental", "--bitmap", BITMAP)
    ia = repo.manifest(inc_a["a.img"])
    assert ia["new_chunks"] == 2, ia
    assert repo.stored_bytes() == stored + ia["new_bytes"]
    stored += ia["new_bytes"]
    inc_b = backup(m, repo, "--image", "b.img", "--sync", "incremental", "--bitmap", BITMAP)
    ib = repo.manifest(inc_b["b.img"])
    assert ib["new_chunks"] == 2, f"b's chunk 2 is a's chunk 2, stored already: {ib}"
    assert repo.stored_bytes() == stored + ib["new_bytes"]
    stored += ib["new_bytes"]

    # random writes through writers: at most the chunks they touched are new
    with writers_on(m, "b.img", seed=4) as w:
        w.grant(12)
        w.settle()
        touched = w.touched(big)
    inc_b2 = backup(m, repo, "--image", "b.img", "--sync", "incremental", "--bitmap", BITMAP)
    ib2 = repo.manifest(inc_b2["b.img"])
    assert 0 < ib2["new_chunks"] <= len(touched), (ib2, sorted(touched))
    assert repo.stored_bytes() == stored + ib2["new_bytes"]

    for name, image in ((inc_a["a.img"], a), (inc_b2["b.img"], b)):
        pit = tmp_path / f"{image.name}.now"
        shutil.copyfile(live(m, image.name), pit)
        snap = Snap(image.name, name, pit, set())
        manifest = repo.manifest(name)
        assert repo.index(name).hashes == chunk_hashes(pit.read_bytes(), big), manifest
        assert_restores(repo, snap, tmp_path)
    repo.assert_verifies(snapshots=5)


# -- 3. a bad chunk -----------------------------------------------------------------------------


def copy_live(m: Mounted, image: str, into: Path) -> Path:
    """The live file now (no job or writer running): the image at the next point in time."""
    shutil.copyfile(live(m, image), into)
    return into


@pytest.mark.parametrize(
    ("damage", "then"),
    [("damaged", "incremental"), ("missing", "full")],
    ids=["flipped-byte-then-incremental", "deleted-then-full"],
)
def test_a_bad_chunk_is_named_and_uploaded_again(
    cowfs: CowfsRunner, repo: Repo, tmp_path: Path, damage: str, then: str
) -> None:
    """A chunk of a.img that its two snapshots share (and b.img's do not): verify names
    exactly those two and lists it in bad-chunks.json, a restore of one fails naming it,
    a snapshot without it still restores; the next backup of a.img uploads it again and
    every snapshot verifies and restores."""
    repo.init("1M")
    m = serve_two(cowfs, tmp_path, seed=3)
    first = backup(m, repo, "--bitmap", BITMAP)
    pit_a1 = copy_live(m, "a.img", tmp_path / "a1.pit")
    rng = random.Random(3)
    for chunk in (3, 7):
        pwrite(live(m, "a.img"), rng.randbytes(5000), chunk * CHUNK + 100)
    second = backup(m, repo, "--sync", "incremental", "--bitmap", BITMAP)
    pit_a2 = copy_live(m, "a.img", tmp_path / "a2.pit")
    pit_b = copy_live(m, "b.img", tmp_path / "b.pit")
    repo.assert_verifies(snapshots=4)

    a1, a2 = first["a.img"], second["a.img"]
    theirs = repo.referenced([first["b.img"], second["b.img"]])
    shared = repo.index(a1).chunks() & repo.index(a2).chunks()
    victim = sorted(shared - theirs)[0]
    assert repo.users(victim) == {a1, a2}
    if damage == "damaged":
        repo.damage_chunk(victim)
    else:
        repo.objects.delete(chunk_key(victim))

    result = repo.verify()
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    broken = [line for line in lines if line.startswith("broken: ")]
    named = {line.split(": ")[1] for line in broken}
    assert named == {a1, a2}, result.stdout
    for line in broken:
        assert f": chunk {victim.hex()} {damage}" in line, line
    assert lines[-1].startswith("verify: FAILED: 1 bad chunk(s) break 2 of 4 snapshot(s)"), lines
    assert json.loads(repo.objects.get("bad-chunks.json")) == {"chunks": [victim.hex()]}

    dest = tmp_path / "broken.img"
    failed = repo.cowfs("restore", repo.snapshot_url(a1), dest)
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert victim.hex() in failed.stdout + failed.stderr, (failed.stdout, failed.stderr)
    assert_restores(repo, Snap("b.img", second["b.img"], pit_b, set()), tmp_path)

    third = backup(m, repo, "--image", "a.img", "--sync", then, "--bitmap", BITMAP)["a.img"]
    manifest = repo.manifest(third)
    assert manifest["new_chunks"] == 1, f"only the bad chunk is uploaded again: {manifest}"
    assert victim in repo.chunks()
    repo.assert_verifies(snapshots=5)
    for name, pit in ((a1, pit_a1), (a2, pit_a2), (third, pit_a2)):
        assert_restores(repo, Snap("a.img", name, pit, set()), tmp_path)


# -- 4. prune and gc ----------------------------------------------------------------------------


def test_prune_keeps_the_newest_and_gc_deletes_what_nothing_references(
    cowfs: CowfsRunner, repo: Repo, tmp_path: Path
) -> None:
    """Three snapshots of each image, whole chunks rewritten between them. prune
    --keep-last 2 (--dry-run first: nothing changes) deletes the oldest of each; gc
    within the grace period deletes nothing, gc --grace 0 exactly the chunks only those
    referenced; the kept snapshots verify and restore. Then a chunk gc deleted is
    written again: the next backup must upload it, not take it for stored."""
    repo.init("1M")
    m = serve_two(cowfs, tmp_path, seed=4)
    images = ["a.img", "b.img"]
    rng = random.Random(4)
    rounds: list[dict[str, Snap]] = []
    for n in range(3):
        if n:
            for image in images:
                for chunk in rng.sample(range(16), 4):
                    pwrite(live(m, image), rng.randbytes(CHUNK), chunk * CHUNK)
        sync = "full" if n == 0 else "incremental"
        done = backup(m, repo, "--sync", sync, "--bitmap", BITMAP)
        rounds.append(
            {
                image: Snap(image, name, copy_live(m, image, tmp_path / f"{image}.{n}"), set())
                for image, name in done.items()
            }
        )
    oldest = {snap.name for snap in rounds[0].values()}
    kept = {snap.name for round_ in rounds[1:] for snap in round_.values()}
    before = repo.fingerprint()
    chunks = set(repo.chunks())
    assert chunks == repo.referenced()

    result = repo.repo("prune", "--keep-last", "2", "--dry-run")
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert {line.removeprefix("would delete: ") for line in lines[:-1]} == oldest, lines
    assert len(lines) == 3 and lines[-1].startswith("prune: kept 4, would delete 2 "), lines
    assert repo.fingerprint() == before, "prune --dry-run changed the repository"

    result = repo.repo("prune", "--keep-last", "2")
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert {line.removeprefix("deleted: ") for line in lines[:-1]} == oldest, lines
    assert len(lines) == 3 and lines[-1].startswith("prune: kept 4, deleted 2 "), lines
    assert set(repo.snapshot_names()) == kept
    left = set(repo.objects.listing("snapshots/"))
    assert left == {
        f"snapshots/{name.replace('@', '/')}{ext}" for name in kept for ext in (".json", ".index")
    }
    assert set(repo.chunks()) == chunks, "prune deletes no chunk (gc does)"

    orphans = chunks - repo.referenced(kept)
    assert orphans, "the rewritten chunks are referenced by the pruned snapshots only"
    result = repo.gc("3600")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("gc: deleted 0 chunk(s)"), result.stdout
    assert f"{len(orphans)} unreferenced within the grace period" in result.stdout
    assert set(repo.chunks()) == chunks

    result = repo.gc("0")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"gc: deleted {len(orphans)} chunk(s)"), result.stdout
    assert set(repo.chunks()) == chunks - orphans == repo.referenced()
    assert json.loads(repo.objects.get("gc.json"))["generation"] == 2
    assert repo.locks() == []
    repo.assert_verifies(snapshots=4)
    for round_ in rounds[1:]:
        for snap in round_.values():
            assert_restores(repo, snap, tmp_path)

    # a chunk gc deleted, written again: the daemon knew it (its first backup uploaded
    # it), but gc raised the generation since
    a1 = rounds[0]["a.img"]
    hashes = repo_hashes = chunk_hashes(a1.pit.read_bytes(), CHUNK)
    back = next(i for i, h in enumerate(hashes) if h in orphans)
    old = a1.pit.read_bytes()[back * CHUNK : (back + 1) * CHUNK]
    pwrite(live(m, "a.img"), old, back * CHUNK)
    done = backup(m, repo, "--image", "a.img", "--sync", "incremental", "--bitmap", BITMAP)
    assert repo_hashes[back] in repo.chunks(), "a chunk gc deleted was taken for stored"
    repo.assert_verifies(snapshots=5)
    now = Snap("a.img", done["a.img"], copy_live(m, "a.img", tmp_path / "a.now"), set())
    assert_restores(repo, now, tmp_path)


# -- 5. kill -9 mid-upload; gc and backup exclude each other ------------------------------------


def rewrite_every_chunk(m: Mounted, image: str, seed: int) -> None:
    """A few new bytes in every chunk: whatever the next backup uploads is new."""
    rng = random.Random(seed)
    for chunk in range(os.path.getsize(live(m, image)) // CHUNK):
        pwrite(live(m, image), rng.randbytes(4096), chunk * CHUNK + 777)


def start_slow_backup(m: Mounted, repo: Repo, *options: str) -> int:
    """`cowfs backup MP --repo REPO --speed 2M` (no --wait): its job id."""
    result = ok("backup", m.mountpoint, "--repo", repo.url, "--speed", "2M", *options)
    assert result.stdout.strip().isdigit(), result.stdout
    return int(result.stdout)


def test_kill9_mid_upload_leaves_no_snapshot_and_gc_deletes_the_orphans(
    cowfs: CowfsRunner, repo: Repo, tmp_path: Path
) -> None:
    repo.init("1M")
    source = make_image(tmp_path / "a.img", 24 * MiB, seed=5, holes=False)
    m = cowfs.serve(tmp_path / "mnt", source)
    first = backup(m, repo, "--bitmap", BITMAP)["a.img"]
    pit = copy_live(m, "a.img", tmp_path / "a1.pit")
    rewrite_every_chunk(m, "a.img", seed=5)
    rows = repo.rows()
    snapshots = repo.objects.listing("snapshots/")
    chunks = set(repo.chunks())

    job = start_slow_backup(m, repo, "--sync", "full")

    def uploading() -> bool:
        assert m.job(job)["state"] == "running", m.job(job)
        return len(set(repo.chunks()) - chunks) >= 2 and len(repo.locks()) == 1

    wait_until(uploading, TIMEOUT, "the backup to upload two chunks")
    os.kill(m.pid, signal.SIGKILL)
    wait_until(lambda: pid_gone(m.pid), TIMEOUT, "the killed daemon to go")
    orphans = set(repo.chunks()) - chunks
    assert orphans

    assert repo.rows() == rows, "a killed backup left a snapshot"
    assert repo.objects.listing("snapshots/") == snapshots
    assert len(repo.locks()) == 1, "the dead backup's lock stays (gc takes it for dead)"
    repo.assert_verifies(snapshots=1)
    result = repo.gc("0")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"gc: deleted {len(orphans)} chunk(s)"), result.stdout
    assert set(repo.chunks()) == chunks == repo.referenced()
    assert repo.locks() == []
    repo.assert_verifies(snapshots=1)
    assert_restores(repo, Snap("a.img", first, pit, set()), tmp_path)


def cancel(m: Mounted, job: int) -> None:
    """Cancel `job` as the teardown does (in-process: `cowfs cancel` of a repository's
    job fails, see test_cancel_of_a_repository_job), and wait for its end."""
    send_command(m.mountpoint, "cancel", job=job)
    wait_until(lambda: m.job(job)["state"] in FINAL_STATES, TIMEOUT, f"job {job} to end")
    assert m.job(job)["state"] == "cancelled", m.job(job)


def gc_lock(repo: Repo, pid: int) -> None:
    doc = {"host": socket.gethostname(), "pid": pid, "started": datetime.now(UTC).isoformat()}
    repo.objects.put("locks/gc.json", json.dumps(doc).encode())


def jobs(m: Mounted) -> list[tuple[int, str]]:
    return sorted((j["id"], j["image"]) for j in m.poll()["jobs"])


def assert_serves(m: Mounted, seed: int) -> None:
    """The live file takes a write and reads it back."""
    data = random.Random(seed).randbytes(10000)
    pwrite(m.live, data, 123456)
    with open(m.live, "rb") as f:
        f.seek(123456)
        assert f.read(len(data)) == data


def test_gc_and_backup_exclude_each_other(cowfs: CowfsRunner, repo: Repo, tmp_path: Path) -> None:
    """A gc while a backup runs is refused (exit 2, one line) and deletes nothing; once
    the backup is cancelled its chunks are orphans gc deletes. A backup while a live gc
    holds its lock is refused and changes nothing; a dead gc's lock does not stop it."""
    repo.init("1M")
    source = make_image(tmp_path / "a.img", 24 * MiB, seed=6, holes=False)
    m = cowfs.serve(tmp_path / "mnt", source)
    backup(m, repo, "--bitmap", BITMAP)
    rewrite_every_chunk(m, "a.img", seed=6)
    referenced = set(repo.chunks())

    job = start_slow_backup(m, repo, "--sync", "incremental", "--bitmap", BITMAP)
    wait_until(lambda: len(repo.locks()) == 1, TIMEOUT, "the backup's lock")
    during = set(repo.chunks())
    line = assert_refused(repo.gc("0"), "gc while a backup runs")
    assert "a backup runs" in line, line
    assert set(repo.chunks()) >= during, "a refused gc deleted chunks"
    assert "locks/gc.json" not in repo.locks()
    assert "gc.json" not in repo.objects.listing()
    cancel(m, job)
    wait_until(lambda: repo.locks() == [], TIMEOUT, "the cancelled backup's lock to go")
    assert len(repo.snapshot_names()) == 1
    result = repo.gc("0")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert set(repo.chunks()) == referenced == repo.referenced()

    gc_lock(repo, os.getpid())  # a gc of this host that runs
    before, running = repo.fingerprint(), jobs(m)
    result = run_cowfs("backup", m.mountpoint, "--repo", repo.url, "--wait")
    line = assert_refused(result, "backup while a gc runs")
    assert "a gc runs" in line, line
    assert repo.fingerprint() == before, "a refused backup changed the repository"
    assert jobs(m) == running, "a refused backup started a job"
    assert_serves(m, seed=6)

    dead = subprocess.Popen(["true"])
    dead.wait()
    gc_lock(repo, dead.pid)  # this host's gc that died
    backup(m, repo, "--sync", "incremental", "--bitmap", BITMAP)
    repo.assert_verifies(snapshots=2)


# -- 6. bad input ---------------------------------------------------------------------------------


BAD_INPUT = {  # case: what the error line says
    "init-twice": "is a cowfs repository already",
    "never-initialised": "is no cowfs repository",
    "repo-and-target": "--repo takes no --target",
    "sync-top": "a repository takes --sync full or incremental, not top",
    "incremental-without-full-in-repo": "not a snapshot of",
    "incremental-without-bitmap-anchor": "has no bitmap 'other'",
    "restore-missing-snapshot": "no snapshot a.img@2000-01-01T00:00:00Z",
    "restore-garbage-name": "names no snapshot",
    "bad-credentials": "access denied",
    "missing-bucket": "no bucket",
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_and_changes_nothing(
    cowfs: CowfsRunner,
    repo: Repo,
    tmp_path: Path,
    case: str,
) -> None:
    """One line `cowfs: error: ...`, exit 2, nothing on stdout; the repository (for S3:
    every bucket's objects this test can see), the mount's jobs and the files beside it
    unchanged; the mount keeps serving."""
    if case in ("bad-credentials", "missing-bucket"):
        s3_only(repo)
    repo.init("1M")
    m = serve_two(cowfs, tmp_path, seed=7)
    backup(m, repo, "--bitmap", BITMAP)
    other = dir_repo(tmp_path / "other")
    if repo.kind == "s3":
        assert isinstance(repo.objects, S3Objects)
        objects = repo.objects.beside("other")
        other = Repo("s3", f"s3://{objects.bucket}/other", objects, endpoint=repo.endpoint)
    if repo.kind == "dir":
        (tmp_path / "other").mkdir()  # an empty directory
    endpoint = [] if repo.endpoint is None else ["--endpoint", repo.endpoint]
    running = jobs(m)
    before = repo.fingerprint()
    files = sorted(p.name for p in tmp_path.iterdir())
    mp = m.mountpoint

    if case == "init-twice":
        args: list[str | Path] = ["repo", "init", repo.url, "--chunk-size", "4M"]
    elif case == "never-initialised":  # for S3: a bucket that exists, a prefix without one
        args = ["backup", mp, "--repo", other.url, "--bitmap", BITMAP, "--wait", *endpoint]
    elif case == "repo-and-target":
        args = ["backup", mp, "--repo", repo.url, "--target", tmp_path / "t.img", "--wait"]
    elif case == "sync-top":
        args = ["backup", mp, "--repo", repo.url, "--sync", "top", "--wait"]
    elif case == "incremental-without-full-in-repo":
        other.init("1M")  # a repository of its own: the bitmap counts since a snapshot of `repo`
        before = repo.fingerprint()
        files = sorted(p.name for p in tmp_path.iterdir())
        args = ["backup", mp, "--repo", other.url, "--sync", "incremental", "--bitmap", BITMAP]
    elif case == "incremental-without-bitmap-anchor":
        args = ["backup", mp, "--repo", repo.url, "--sync", "incremental", "--bitmap", "other"]
    elif case == "restore-missing-snapshot":
        missing = repo.snapshot_url("a.img@2000-01-01T00:00:00Z")
        args = ["restore", missing, tmp_path / "dest.img"]
    elif case == "restore-garbage-name":
        args = ["restore", repo.snapshot_url("a.img@"), tmp_path / "dest.img"]
    elif case == "bad-credentials":
        args = ["backup", mp, "--repo", repo.url, "--bitmap", BITMAP, "--wait"]
    else:
        assert case == "missing-bucket"
        args = ["backup", mp, "--repo", f"s3://no-{uuid.uuid4().hex[:12]}/repo"]
        args += ["--endpoint", str(repo.endpoint), "--bitmap", BITMAP, "--wait"]

    cli = CURRENT
    if case == "bad-credentials":
        cli = Cli(env=os.environ | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    line = assert_refused(cli.cowfs(*args), case)
    assert BAD_INPUT[case] in line, line
    assert repo.fingerprint() == before, f"{case} changed the repository"
    assert sorted(p.name for p in tmp_path.iterdir()) == files, f"{case} made files"
    if case == "never-initialised" and repo.kind == "dir":
        assert DirObjects(tmp_path / "other").fingerprint() == {}
    assert jobs(m) == running, f"{case} started a job"
    assert_serves(m, seed=7)
    repo.assert_verifies(snapshots=2)


# -- a failed upload; the chunks two images of one job share -------------------------------------


def test_a_chunk_whose_upload_failed_is_uploaded_by_the_next_backup(
    cowfs: CowfsRunner, repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload of one chunk fails (a directory: a file where its folder goes; S3: the
    endpoint answers its PUT with 500 until healed) and the backup fails. Once the store
    takes it again, the next backup in the same daemon must upload that chunk: a chunk
    is known to the repository only once its upload succeeded (a regression test: the
    daemon's shared set of known chunks once took it before its upload)."""
    source = make_image(tmp_path / "a.img", 4 * MiB, seed=8, holes=False)
    digest = chunk_hashes(source.read_bytes(), CHUNK)[1]
    with contextlib.ExitStack() as stack:
        if repo.kind == "s3":
            assert repo.endpoint is not None
            proxy = stack.enter_context(FaultProxy(repo.endpoint))
            repo.endpoint = proxy.url  # remembered by init: every command goes through it
            monkeypatch.setenv("COWFS_S3_MAX_ATTEMPTS", "2")
        repo.init("1M")
        m = cowfs.serve(tmp_path / "mnt", source)
        blocker = Path(repo.url) / "chunks" / digest.hex()[:2]
        if repo.kind == "s3":
            proxy.fail(500, methods=["PUT"], path_contains=digest.hex())
        else:
            blocker.parent.mkdir(parents=True)
            blocker.write_bytes(b"")  # mkdir chunks/AB/CD fails: ENOTDIR
        result = run_cowfs("backup", m.mountpoint, "--repo", repo.url, "--bitmap", BITMAP, "--wait")
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "a.img: failed" in result.stdout, result.stdout
        assert repo.snapshot_names() == []
        if repo.kind == "s3":
            proxy.heal()
        else:
            blocker.unlink()

        name = backup(m, repo, "--bitmap", BITMAP)["a.img"]
        assert digest in repo.index(name).hashes
        assert digest in repo.chunks(), (
            f"{name} says complete but its chunk {digest.hex()} was never uploaded"
        )
        repo.assert_verifies(snapshots=1)


def test_cancel_of_a_repository_job(cowfs: CowfsRunner, repo: Repo, tmp_path: Path) -> None:
    """`cowfs cancel MP JOB` of a running backup into a repository: the job ends
    cancelled, leaves no snapshot and no lock, and the command says so with exit 0, as
    for a file target."""
    repo.init("1M")
    source = make_image(tmp_path / "a.img", 24 * MiB, seed=9, holes=False)
    m = cowfs.serve(tmp_path / "mnt", source)
    job = start_slow_backup(m, repo, "--bitmap", BITMAP)
    wait_until(lambda: len(repo.locks()) == 1, TIMEOUT, "the backup's lock")
    result = run_cowfs("cancel", m.mountpoint, str(job))
    assert "Traceback" not in result.stderr, result.stderr
    wait_until(lambda: m.job(job)["state"] in FINAL_STATES, TIMEOUT, f"job {job} to end")
    assert m.job(job)["state"] == "cancelled", m.job(job)
    wait_until(lambda: repo.locks() == [], TIMEOUT, "the cancelled backup's lock to go")
    assert repo.snapshot_names() == []
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "cancelled" in result.stdout, result.stdout


def test_two_images_of_one_job_upload_a_shared_chunk_once(
    cowfs: CowfsRunner, repo: Repo, tmp_path: Path
) -> None:
    """b.img is a copy of a.img; one grouped full backup of both (their copiers run side
    by side): every distinct chunk is uploaded once, so the two snapshots' new chunks
    add up to the distinct chunks, and their new bytes to the bytes stored."""
    repo.init("1M")
    m = serve_two(cowfs, tmp_path, seed=12, b_copy_of_a=True)
    done = backup(m, repo, "--bitmap", BITMAP)
    distinct = {h for h in chunk_hashes((tmp_path / "a.img").read_bytes(), CHUNK) if h != ZERO}
    assert set(repo.chunks()) == distinct
    manifests = [repo.manifest(name) for name in done.values()]
    uploads = [(mf["snapshot"], mf["new_chunks"], mf["new_bytes"]) for mf in manifests]
    assert sum(mf["new_chunks"] for mf in manifests) == len(distinct), uploads
    assert sum(mf["new_bytes"] for mf in manifests) == repo.stored_bytes(), uploads
