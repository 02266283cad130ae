"""`cowfs verify` and `cowfs restore` of backups taken under writers (DESIGN.md, "Restore").

Why: a backup is worth what it restores. Every backup here is taken the way a VM's
would be: a long-lived mount (`cowfs mount SRC MP`), writers that keep writing to the
live file, and `cowfs backup MP --target T ... --wait` while they write, so that
copy-before-write does real work. The expected image is a copy of the live file taken
while the writers are held (nothing in flight) just before `backup`; the writers go on
as soon as `backup` has printed its job id (the point in time is fixed) and while the
job still runs. Then:

* `verify` of every link passes, and `restore` of every link, raw (byte for byte,
  sparse) and qcow2 (`qemu-img compare`, `qemu-img check`), gives the point-in-time
  copy, for full raw and qcow2, top of a sparse source, compressed, and a chain of
  three (full + two incrementals);
* damage is found and named: a flipped bit in each link of the chain (the offset of
  the cluster too), a truncated or missing link, a damaged or missing checksum file,
  a link whose record does not say complete. `verify` exits 1, `restore` fails;
* an existing DEST needs --force, a DEST that is part of the chain is refused, a
  missing TARGET is bad input; a restore killed with -9 (or Ctrl-C) resumes and ends
  whole;
* `qemu-img commit` changes the backing file under its checksums: `verify` of that
  base fails and names it (what it says about the top is printed, not asserted);
  `cowfs commit` merges with the checksums and record, and the chain still verifies
  and restores; a merge that fails leaves the backing file untrusted.
"""

import json
import os
import random
import select
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import COWFS, TIMEOUT, CowfsRunner, Mounted, pid_gone, run_cowfs, wait_until
from helpers.mounts import assert_one_error_line, info, record, refused_mount
from helpers.qemu import assert_identical, check_clean, qemu_img, qemu_io_holding, qemu_json
from helpers.sizes import KiB, MiB
from helpers.views import Writers, allocated

from cowfs.record import record_path
from cowfs.restore import MAP_HEADER, map_path
from cowfs.sums import sums_path

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

SIZE = 16 * MiB
CLUSTER = 64 * KiB
"""The jobs' cluster size (cowfs's default) and so the restore's unit."""
BITMAP = "nightly"
FULL_SPEED = "16M"
"""A full copy of SIZE takes about a second: the writes land while it copies."""
INC_SPEED = "4M"
"""An incremental of the writes below (a few MiB) copies for about a second."""
BEFORE = 40
"""Writes between two backups (all writers together): the next incremental's dirty data."""
DURING = 30
"""Writes issued once `backup` has fixed the point in time, while the job copies."""
SLACK = 256 * KiB
"""File system metadata counted in st_blocks beyond the data of a sparse file."""


# -- backups under writers -------------------------------------------------------------------


@dataclass
class Link:
    target: Path
    pit: Path
    """A copy of the live file at the link's point in time."""


def first_line(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """The first line a command prints, without waiting longer than `timeout`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args} in {timeout} s"
    return proc.stdout.readline().strip()


def backup_under_writers(
    m: Mounted, writers: Writers, target: Path, *options: str, speed: str = FULL_SPEED
) -> Link:
    """`cowfs backup MP --target TARGET OPTIONS --wait` while the writers write: BEFORE
    writes, then (writers held) the point-in-time copy, then the backup; DURING writes
    as soon as it has printed its job id. The backup must end complete, with its checksum
    file beside it, and with copy-before-write done for it (a write overlapped the
    copier: the paced copier is surely still at work when the first writes land)."""
    writers.grant(BEFORE)
    writers.settle()
    pit = target.with_name(target.name + ".pit")
    shutil.copyfile(m.live, pit)
    command = [*COWFS, "backup", str(m.mountpoint), "--target", str(target), "--speed", speed]
    proc = subprocess.Popen(
        [*command, *options, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if first_line(proc).isdigit():  # the job's id: the point in time is fixed
            writers.grant(DURING)
            writers.settle()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert f"{m.source.name}: complete" in out, out
    rec = record(target)
    assert rec["status"] == "complete" and rec["checksums"], rec
    assert rec["bytes_cbw"] > 0, f"no write overlapped the job: {rec}"
    assert sums_path(target).is_file()
    return Link(target, pit)


def writers_on(m: Mounted, seed: int) -> Writers:
    """An O_DIRECT and two buffered writers on the live file, paced by the test."""
    return Writers(m.live, m.source.stat().st_size, seed, paced=True)


def compressible_image(path: Path, size: int, seed: int) -> Path:
    """Clusters of random 16-byte runs among zeros (each deflates to a few hundred
    bytes), and every fourth cluster zero."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for n in range(size // CLUSTER):
            zero = n % 4 == 3
            f.write(bytes(CLUSTER) if zero else (rng.randbytes(16) + bytes(48)) * (CLUSTER // 64))
    return path


# -- verify and restore ------------------------------------------------------------------------


def verify(target: Path) -> subprocess.CompletedProcess:
    result = run_cowfs("verify", target)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_intact(target: Path, links: int) -> None:
    result = verify(target)
    assert result.returncode == 0, (result.stdout, result.stderr)
    last = result.stdout.splitlines()[-1]
    assert last.startswith(f"verify: ok: {links} link(s)"), result.stdout
    assert record(target)["point_in_time"] in last, result.stdout


def assert_verify_finds(target: Path, bad: Path, offset: int | None = None) -> str:
    """`verify TARGET` exits 1, its last line says FAILED, and a `bad:` line names `bad`
    (with the cluster's offset, if given). Returns the output."""
    result = verify(target)
    out = result.stdout
    assert result.returncode == 1, (result.returncode, out, result.stderr)
    assert out.splitlines()[-1].startswith("verify: FAILED"), out
    wanted = f"bad: {bad}: cluster at offset {offset}:" if offset is not None else f"bad: {bad}"
    assert any(line.startswith(wanted) for line in out.splitlines()), (wanted, out)
    return out


def restore(target: Path, dest: Path, *options: str) -> subprocess.CompletedProcess:
    result = run_cowfs("restore", target, dest, *options)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def nonzero_clusters(path: Path) -> int:
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(CLUSTER):
            count += chunk.count(0) != len(chunk)
    return count


def assert_restores(link: Link, fmt: str) -> None:
    """`restore LINK DEST --format FMT`: exit 0, DEST's record complete, and DEST is the
    point-in-time copy (raw: byte for byte, the size of the image, and sparse; qcow2:
    QEMU's compare and check)."""
    dest = link.target.with_name(f"{link.target.name}.restored.{fmt}")
    result = restore(link.target, dest, "--format", fmt)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"restored: {dest} ({fmt}, "), result.stdout
    assert info(dest) == (0, "complete"), info(dest)
    assert not map_path(dest).exists()
    if fmt == "raw":
        assert dest.stat().st_size == link.pit.stat().st_size
        assert files_equal(dest, link.pit), f"{dest} differs from {link.pit}"
        data = nonzero_clusters(link.pit) * CLUSTER
        assert data < dest.stat().st_size, "the test needs zero clusters"
        assert allocated(dest) <= data + SLACK, (allocated(dest), data)
    else:
        check_clean(dest)
        assert_identical(dest, link.pit)
    dest.unlink()
    record_path(dest).unlink()


# -- 1. a restore is the point in time ---------------------------------------------------------

SCENARIOS = {  # target, options, source, seed, size
    "full-raw": ("full.img", ["--sync", "full"], "random", 1, SIZE),
    "full-qcow2": ("full.qcow2", ["--sync", "full"], "random", 2, SIZE),
    "top-sparse": ("top.img", ["--sync", "top"], "sparse", 3, SIZE - 3000),  # a partial cluster
    "compressed": ("full.qcow2", ["--sync", "full", "--compress"], "compressible", 4, SIZE),
}


@pytest.mark.parametrize(
    "scenario",
    [
        *(s for s in SCENARIOS if s != "compressed"),
        "compressed",
    ],
)
def test_restore_is_the_point_in_time(cowfs: CowfsRunner, tmp_path: Path, scenario: str) -> None:
    """One backup under writers; verify passes; raw and qcow2 restores are the PIT copy.
    Then one flipped bit in a data cluster of the backup is found, with its offset."""
    name, options, kind, seed, size = SCENARIOS[scenario]
    source = tmp_path / "disk.img"
    if kind == "compressible":
        compressible_image(source, size, seed)
    else:
        make_image(source, size, seed, holes=kind == "sparse")
    m = cowfs.serve(tmp_path / "mnt", source)
    with writers_on(m, seed) as writers:
        link = backup_under_writers(m, writers, tmp_path / name, *options)
    if kind == "compressible":
        report = check_clean(link.target)
        assert report.get("compressed-clusters", 0) > 0, report

    assert_intact(link.target, 1)
    for fmt in ("raw", "qcow2"):
        assert_restores(link, fmt)

    if kind != "compressible":  # a compressed cluster has no host offset in qemu-img map
        guest, host = data_cluster(link.target, depth=0)
        flip_bit(link.target, host + 1000)
        assert_verify_finds(link.target, link.target, guest)


# -- 1 (chain). three links under writers --------------------------------------------------------


@dataclass
class Chain:
    links: list[Link]
    """full, inc1, inc2."""

    def copy(self, into: Path) -> list[Path]:
        """The links with their records and checksums in `into` (the backing names are
        relative: the copy is a chain of its own). Returns the copies, full first."""
        into.mkdir()
        copies = []
        for link in self.links:
            for path in (link.target, record_path(link.target), sums_path(link.target)):
                shutil.copyfile(path, into / path.name)
            copies.append(into / link.target.name)
        return copies


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """full.qcow2 (--bitmap) <- inc1.qcow2 <- inc2.qcow2 (--sync incremental --backing),
    each backed up under writers on one long-lived mount, unmounted before the tests."""
    workdir = tmp_path_factory.mktemp("chain")
    source = make_image(workdir / "disk.img", SIZE, seed=11, holes=True)
    runner = CowfsRunner(workdir)
    links: list[Link] = []
    try:
        m = runner.serve(workdir / "mnt", source)
        with writers_on(m, seed=12) as writers:
            for n, name in enumerate(("full.qcow2", "inc1.qcow2", "inc2.qcow2")):
                if n == 0:
                    options = ["--sync", "full", "--bitmap", BITMAP]
                    speed = FULL_SPEED
                else:
                    options = ["--sync", "incremental", "--bitmap", BITMAP]
                    options += ["--backing", str(links[-1].target)]
                    speed = INC_SPEED
                target = workdir / name
                links.append(backup_under_writers(m, writers, target, *options, speed=speed))
    finally:
        runner.teardown()
    assert not m.is_mounted() and pid_gone(m.pid)
    yield Chain(links)


def test_chain_restores_every_link(chain: Chain) -> None:
    """Each link verifies (with every link below it) and restores to its own PIT copy."""
    for n, link in enumerate(chain.links):
        if n:
            assert record(link.target)["sync"] == "incremental"
            assert link.target.stat().st_size < chain.links[0].target.stat().st_size
        assert_intact(link.target, n + 1)
        for fmt in ("raw", "qcow2"):
            assert_restores(link, fmt)


# -- 2. damage is found and named ---------------------------------------------------------------


def clusters_held(image: Path, which: Callable[[dict], bool], *options: str) -> dict[int, int]:
    """Guest offset -> host offset of the data clusters `qemu-img map IMAGE` reports in
    the extents `which` accepts (the host offset is in the file at that extent's depth)."""
    held = {}
    for extent in qemu_json("map", *options, image):
        if extent["data"] and "offset" in extent and which(extent):
            for guest in range(extent["start"], extent["start"] + extent["length"], CLUSTER):
                held[guest] = extent["offset"] + guest - extent["start"]
    return held


def data_cluster(top: Path, depth: int) -> tuple[int, int]:
    """(guest offset, host offset) of a data cluster of the link `depth` below `top` that
    no link above it shadows: one that this link gives the image, as QEMU reads it."""
    held = clusters_held(top, lambda extent: extent["depth"] == depth)
    assert held, f"no data cluster at depth {depth} of {top}"
    guest = sorted(held)[len(held) // 2]
    return guest, held[guest]


def flip_bit(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        (byte,) = os.pread(fd, 1, offset)
        assert os.pwrite(fd, bytes([byte ^ 0x10]), offset) == 1
    finally:
        os.close(fd)


def set_status(link: Path, status: str) -> None:
    rec = record(link)
    rec["status"] = status
    record_path(link).write_text(json.dumps(rec, indent=2))


def damage(case: str, links: list[Path]) -> tuple[Path, int | None]:
    """Damage the copied chain (full, inc1, inc2) as `case` says; returns the file that
    must be named, and the guest offset of the bad cluster if there is one."""
    full, inc1, inc2 = links
    if case.startswith("flip"):
        depth = {"flip-inc2": 0, "flip-inc1": 1, "flip-full": 2}[case]
        guest, host = data_cluster(inc2, depth)
        victim = links[2 - depth]
        flip_bit(victim, host + CLUSTER // 3)
        return victim, guest
    if case == "truncated":
        os.truncate(full, full.stat().st_size // 2)
        return full, None
    if case == "missing":
        inc1.rename(inc1.with_name("inc1.qcow2.away"))
        return inc1, None
    if case == "sums-flipped":
        flip_bit(sums_path(full), sums_path(full).stat().st_size // 2)
        return sums_path(full), None
    if case == "sums-deleted":
        sums_path(inc1).unlink()
        return sums_path(inc1), None
    if case in ("record-failed", "record-running"):
        victim = inc1 if case == "record-failed" else full
        set_status(victim, case.split("-")[1])
        return victim, None
    raise AssertionError(case)


DAMAGE = [
    "flip-full",
    "flip-inc1",
    "flip-inc2",
    "truncated",
    "missing",
    "sums-flipped",
    "sums-deleted",
    "record-failed",
    "record-running",
]


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_is_found_and_named(chain: Chain, tmp_path: Path, case: str) -> None:
    """verify of the top exits 1 and names the damaged file (and the cluster's offset);
    restore fails and names it too, and DEST is not complete."""
    links = chain.copy(tmp_path / "chain")
    top = links[-1]
    assert_intact(top, 3)  # the copy itself is sound
    bad, offset = damage(case, links)
    if case.startswith("flip"):
        check_clean(bad)  # QEMU sees nothing wrong: only the checksums tell
    assert_verify_finds(top, bad, offset)

    dest = tmp_path / "restored.img"
    result = restore(top, dest)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert str(bad) in out, out
    if offset is not None:  # the restore reads that very cluster: it stops there
        assert result.returncode == 1, out
        assert f"restore: FAILED: {bad}: cluster at offset {offset}:" in result.stdout, out
        assert f"incomplete: {dest}" in result.stdout, out
    if result.returncode == 2:  # the chain could not be opened: nothing was created
        assert_one_error_line(result)
        assert not dest.exists() and not record_path(dest).exists()
    else:
        assert result.returncode == 1, out
        assert record(dest)["status"] == "failed", record(dest)
        assert info(dest) == (1, "failed"), info(dest)


def test_damage_in_a_shadowed_cluster_is_found(chain: Chain, tmp_path: Path) -> None:
    """verify reads the clusters an upper link shadows too: a flipped bit in a cluster of
    the full that inc2 replaced (no restore of inc2 reads it) is still found."""
    full, _, inc2 = chain.copy(tmp_path / "chain")
    mine = clusters_held(inc2, lambda e: e["depth"] == 0)  # what inc2 gives the image
    below = clusters_held(full, lambda e: True, "-f", "qcow2")  # the full alone
    shadowed = sorted(set(mine) & set(below))
    assert shadowed, "inc2 shadows no data cluster of the full"
    guest = shadowed[len(shadowed) // 2]
    flip_bit(full, below[guest] + 7)
    assert_verify_finds(inc2, full, guest)
    restored = restore(inc2, tmp_path / "restored.img")
    print(f"restore of inc2 with that bit flipped in the full: exit {restored.returncode}")


# -- 3. restore's edge cases --------------------------------------------------------------------


def test_existing_dest_needs_force(chain: Chain, tmp_path: Path) -> None:
    """An existing DEST is refused with one line and left as it was; --force replaces it."""
    link = chain.links[1]
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"precious" * 1000)
    before = dest.stat()
    result = restore(link.target, dest)
    assert_one_error_line(result)
    assert str(dest) in result.stderr and "--force" in result.stderr, result.stderr
    after = dest.stat()
    assert dest.read_bytes() == b"precious" * 1000
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert not record_path(dest).exists() and not map_path(dest).exists()

    forced = restore(link.target, dest, "--force")
    assert forced.returncode == 0, (forced.stdout, forced.stderr)
    assert files_equal(dest, link.pit)
    assert info(dest) == (0, "complete")


KILL_SIZE = 64 * MiB
KILL_SPEED = "16M"
"""An interrupted restore copies for four seconds: it is stopped after its first map
save (one second in), with about a quarter of the image restored and the rest to do."""


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    """A complete full backup of a KILL_SIZE image, and the image."""
    workdir = tmp_path_factory.mktemp("big")
    source = make_image(workdir / "disk.img", KILL_SIZE, seed=21, holes=False)
    link = Link(workdir / "full.qcow2", workdir / "full.pit")
    shutil.copyfile(source, link.pit)
    runner = CowfsRunner(workdir)
    try:
        m = runner.mount(source, link.target)
        finished = m.finish()
        assert finished.returncode == 0, finished.stdout + finished.stderr
        m.wait_exit()
    finally:
        runner.teardown()
    yield link


def restored_clusters(dest: Path) -> int:
    """Clusters the restored map beside DEST calls restored (0 while it has none)."""
    try:
        data = map_path(dest).read_bytes()
    except FileNotFoundError:
        return 0
    bits = data[MAP_HEADER.size : MAP_HEADER.size + KILL_SIZE // CLUSTER // 8]
    return sum(bin(byte).count("1") for byte in bits)


def interrupted_restore(link: Link, dest: Path, sig: signal.Signals) -> tuple[int, str]:
    """A paced `restore LINK DEST`, sent `sig` once its map names restored clusters and
    DEST holds data. Returns its exit status and output."""
    command = [*COWFS, "restore", str(link.target), str(dest), "--speed", KILL_SPEED]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:

        def partly_restored() -> bool:
            assert proc.poll() is None, proc.communicate()
            return restored_clusters(dest) > 0 and allocated(dest) > 0

        wait_until(partly_restored, 20, "the restore's first map save")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out + err


def assert_resumes(link: Link, dest: Path) -> None:
    """DEST is an unfinished restore: `restore` again (no --force) resumes ("resuming"),
    copies only what its map does not name, and DEST is then the image, complete."""
    resumed = restored_clusters(dest) * CLUSTER
    assert 0 < resumed < KILL_SIZE, resumed
    code, first = info(dest)
    assert code == 1 and first != "complete", (code, first)
    again = restore(link.target, dest)
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert again.stdout.startswith("resuming: "), again.stdout
    assert f"restored: {dest}" in again.stdout, again.stdout
    assert record(dest)["bytes_copier"] == KILL_SIZE - resumed, record(dest)
    assert files_equal(dest, link.pit), "the resumed restore differs from the image"
    assert info(dest) == (0, "complete")
    assert not map_path(dest).exists()


def test_kill9_then_restore_resumes(big: Link, tmp_path: Path) -> None:
    """kill -9 in the middle: DEST's record is not complete, and `restore` again resumes
    from the map the killed one saved, to a DEST that is the image."""
    dest = tmp_path / "dest.img"
    status, _ = interrupted_restore(big, dest, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert_resumes(big, dest)


def test_ctrl_c_then_restore_resumes(big: Link, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) stops a restore with its own message and exit 1; it resumes."""
    dest = tmp_path / "dest.img"
    status, output = interrupted_restore(big, dest, signal.SIGINT)
    assert_resumes(big, dest)  # this part works
    assert "Traceback" not in output, output
    assert status == 1, (status, output)
    assert f"cowfs: interrupted; {dest} is incomplete" in output, output


def test_bad_input_is_refused_and_changes_nothing(chain: Chain, tmp_path: Path) -> None:
    """A TARGET that does not exist (verify, restore), and a DEST that is a link of the
    chain, even with --force: exit 2, one line, nothing created or changed."""
    missing = tmp_path / "missing.qcow2"
    assert_one_error_line(verify(missing))
    dest = tmp_path / "dest.img"
    assert_one_error_line(restore(missing, dest))
    assert not dest.exists() and not record_path(dest).exists()

    full, _, inc2 = chain.copy(tmp_path / "chain")
    before = full.read_bytes()
    result = restore(inc2, full, "--force")
    assert_one_error_line(result)
    assert str(full) in result.stderr, result.stderr
    assert full.read_bytes() == before
    assert_intact(inc2, 3)


@pytest.mark.parametrize("which", ["checksums of the full", "record of inc1"])
def test_restore_never_replaces_a_file_of_the_chain(
    chain: Chain, tmp_path: Path, which: str
) -> None:
    full, inc1, inc2 = chain.copy(tmp_path / "chain")
    victim = sums_path(full) if which.startswith("checksums") else record_path(inc1)
    before = victim.read_bytes()
    result = restore(inc2, victim, "--force")
    assert victim.read_bytes() == before, f"restore replaced {victim.name}"
    assert_one_error_line(result)
    assert_intact(inc2, 3)


def test_a_target_named_like_a_checksum_file_is_refused(
    cowfs: CowfsRunner, chain: Chain, tmp_path: Path
) -> None:
    """As for a record or a log: `mount --target X.cowfs.sums` is refused with one line
    and changes nothing (here X.cowfs.sums is the checksum file of a chain's link)."""
    full, _, inc2 = chain.copy(tmp_path / "chain")
    source = make_image(tmp_path / "disk.img", 1 * MiB, seed=31)
    refused_mount(cowfs, tmp_path, source, sums_path(full), "--force")
    assert_intact(inc2, 3)


# -- 4. qemu-img commit: the base changes under its checksums -----------------------------------


@pytest.mark.parametrize("keep_top", [True, False], ids=["commit-d", "commit"])
def test_qemu_img_commit_is_reported(chain: Chain, tmp_path: Path, keep_top: bool) -> None:
    """`qemu-img commit [-d] inc1` writes inc1's clusters into full: full no longer
    matches the checksums its backup recorded, and `verify` of it fails naming it. What
    verify of the top says is printed (run with -s), not asserted."""
    full, inc1, _ = chain.copy(tmp_path / "chain")
    committed = qemu_img("commit", *(["-d"] if keep_top else []), "-f", "qcow2", inc1)
    assert committed.returncode == 0, committed.stderr
    base = assert_verify_finds(full, full)
    print(f"verify {full.name} after qemu-img commit{' -d' * keep_top}:\n{base}")
    top = verify(inc1)
    print(f"verify {inc1.name} (exit {top.returncode}):\n{top.stdout}{top.stderr}")
    restored = restore(inc1, tmp_path / "restored.img")
    print(f"restore {inc1.name} (exit {restored.returncode}):\n{restored.stdout}")


def test_cowfs_commit_keeps_the_chain_verified(chain: Chain, tmp_path: Path) -> None:
    """`cowfs commit inc2` merges it into inc1 the way cowfs can vouch for: inc1 then
    verifies on its own as the image at inc2's point in time, inc2 over it still
    verifies and restores, and the merged file carries inc2's job, so the bitmap's next
    incremental may name it as its backing."""
    full, inc1, inc2 = chain.copy(tmp_path / "chain")
    result = run_cowfs("commit", inc2)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert record(inc1)["point_in_time"] == record(inc2)["point_in_time"]
    assert record(inc1)["job"] == record(inc2)["job"]
    assert record(inc1)["merged"] == [str(inc2)]
    assert_intact(inc1, links=2)
    assert_intact(inc2, links=3)
    for top in (inc1, inc2):
        dest = tmp_path / f"{top.name}.img"
        assert restore(top, dest).returncode == 0
        assert files_equal(dest, chain.links[2].pit)
    assert run_cowfs("commit", full).returncode == 2  # nothing below it to merge into


def test_a_merge_that_fails_leaves_the_backing_file_untrusted(chain: Chain, tmp_path: Path) -> None:
    """qemu-img commit refused (the top is busy: QEMU's lock held by qemu-io): the
    backing file's record no longer says complete, so nothing trusts mixed content."""
    _, inc1, inc2 = chain.copy(tmp_path / "chain")
    with qemu_io_holding(inc2, fmt="qcow2"):
        result = run_cowfs("commit", inc2)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "qemu-img commit failed" in result.stderr
    assert record(inc1)["status"] == "running"
    assert verify(inc2).returncode == 1
