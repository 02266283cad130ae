"""Whether a `complete` can be trusted: real mounts against an outside user's report.

Why: cowfs's one promise is that a record saying `complete` (and `cowfs info` exiting
0) means the target restores the source at its point in time. The report found ways to
get a `complete` over a target that does not: two mounts racing for one target (under
different spellings of its path), a chain link whose backing is a cancelled link or
skips a link, a `--sync top` link whose new holes read through to old data, `info`
trusting a chain whose lower link failed or is gone, a target named like cowfs's own
bitmap, record or log file, an outside write hidden by restoring the mtime, and a
`--sync none` target (old content of overwritten clusters only) that says plain
`complete`. Each test builds the situation with real mounts and tools and judges the
result by exit codes, bytes, records and `qemu-img compare`, never by whole messages.
"""

import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import pytest
from conftest import files_equal, make_image
from helpers.incremental import (
    BITMAP,
    CLUSTER,
    assert_restores,
    backup,
    bitmaps,
    bitmaps_file,
    full_backup,
    incremental_options,
    snapshot,
)
from helpers.mounting import TIMEOUT, CowfsRunner, cowfs_mounts, run_cowfs
from helpers.mounts import (
    assert_gone,
    assert_one_error_line,
    info,
    record,
    refused_mount,
    write_live,
)
from helpers.sizes import MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

SIZE = 8 * MiB
SMALL = 4 * MiB
ROUNDS = 6
"""Rounds of the mount race per spelling: released together, today both win within 3."""

Write = tuple[int, bytes]


# -- helpers ---------------------------------------------------------------------------------


def writing(writes: Sequence[Write]) -> Callable[[Path], None]:
    def act(live: Path) -> None:
        fd = os.open(live, os.O_RDWR)
        try:
            for offset, data in writes:
                assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)

    return act


def scattered(seed: int, count: int, stride: int = 4 * CLUSTER) -> list[Write]:
    """`count` whole clusters of random data, `stride` apart."""
    rng = random.Random(seed)
    return [(i * stride, rng.randbytes(CLUSTER)) for i in range(count)]


def live_session(cowfs: CowfsRunner, source: Path, name: str, act: Callable[[Path], None]):
    """A VM using the live file between two backups: a mount that backs up nothing of
    interest (`--sync none` into a throwaway target `name`), `act` on the live file."""
    m = cowfs.mount(source, source.with_name(name), "--sync", "none")
    act(m.live)
    done = m.finish()
    assert done.returncode == 0 and done.stdout.startswith("complete"), done.stdout + done.stderr
    assert_gone(m)


GATED_CLI = """
import os, sys
import cowfs.cli, cowfs.mount
ready = int(sys.argv.pop(1))
os.write(ready, b"r")
os.close(ready)
os.read(0, 1)
sys.exit(cowfs.cli.main(sys.argv[1:]))
"""
"""The `cowfs` console script (`sys.exit(cowfs.cli.main())`) behind a start gate: it
says when its imports are done, then waits for a byte on stdin. Two of them released
together race for real, not by the jitter of their interpreters' start."""


def run_together(commands: list[tuple[list[str], Path | None]]) -> list:
    """`cowfs ARGS` run in cwd for each (args, cwd), all released at the same instant;
    their CompletedProcesses once all have exited. The cowfs the tests use is found
    through the current directory (conftest's COWFS): PYTHONPATH keeps it in another."""
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path}
    procs: list[subprocess.Popen] = []
    readies: list[int] = []
    try:
        for args, cwd in commands:
            ready, tell = os.pipe()
            readies.append(ready)
            try:
                command = [sys.executable, "-c", GATED_CLI, str(tell), *args]
                pipes = {"stdin": PIPE, "stdout": PIPE, "stderr": PIPE, "pass_fds": (tell,)}
                procs.append(subprocess.Popen(command, cwd=cwd, env=env, text=True, **pipes))
            finally:
                os.close(tell)
        for ready in readies:  # EOF if it died first: then it is released to its end
            select.select([ready], [], [], TIMEOUT)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("g")
            proc.stdin.flush()
    finally:
        for ready in readies:
            os.close(ready)
        results = []
        for proc in procs:  # one that hangs is killed, and reads as failed
            try:
                out, err = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def refused_quietly(result, mnt: Path) -> None:
    assert_one_error_line(result)
    assert str(mnt) not in cowfs_mounts()
    assert not os.listdir(mnt)


# -- 1. two mounts, one target -----------------------------------------------------------------


@dataclass
class RaceArea:
    """Sources A and B, their mountpoints, and one target T in `dir` (also reachable as
    `link/T.img`, link -> dir)."""

    a: Path
    b: Path
    ma: Path
    mb: Path
    dir: Path
    target: Path


@pytest.fixture
def area(tmp_path: Path) -> RaceArea:
    folder = tmp_path / "dir"
    folder.mkdir()
    (tmp_path / "link").symlink_to(folder)
    mnts = [tmp_path / "mA", tmp_path / "mB"]
    for mnt in mnts:
        mnt.mkdir()
    a = make_image(tmp_path / "A.img", SMALL, seed=41, holes=False)
    b = make_image(tmp_path / "B.img", SMALL, seed=42, holes=False)
    return RaceArea(a, b, *mnts, folder, folder / "T.img")


SPELLINGS: dict[str, Callable[[Path], tuple[str, Path | None]]] = {
    "the same path": lambda d: (str(d / "T.img"), None),
    "dir/../dir": lambda d: (str(d / ".." / d.name / "T.img"), None),
    "a symlinked directory": lambda d: (str(d.parent / "link" / "T.img"), None),
    "a relative path": lambda d: ("T.img", d),  # run in dir
}
"""How the second mount names T: (the --target argument, the cwd to run it in)."""


def mount_together(cowfs: CowfsRunner, area: RaceArea, jobs: list, *options: str) -> list:
    """Each (source, mountpoint, --target, cwd) mounted, all at once; returns [(source,
    mountpoint, CompletedProcess)]. Whatever started is torn down by the fixture."""
    commands = [(["mount", str(s), str(m), "--target", t, *options], cwd) for s, m, t, cwd in jobs]
    try:
        results = run_together(commands)
    finally:
        for source, mnt, *_ in jobs:
            cowfs.adopt(mnt, source, area.target)
    return [(s, m, r) for r, (s, m, *_) in zip(results, jobs, strict=True)]


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_two_mounts_racing_for_one_target(
    cowfs: CowfsRunner, area: RaceArea, spelling: str
) -> None:
    """At most one of two simultaneous mounts onto one target wins; the loser is refused
    and leaves nothing; the winner's backup is complete and is the winner's source at its
    point in time, and its record names that source."""
    wins = 0
    for round_ in range(ROUNDS):
        befores = {
            src: snapshot(src, src.with_name(src.name + ".before")) for src in (area.a, area.b)
        }
        second, cwd = SPELLINGS[spelling](area.dir)
        jobs = [(area.a, area.ma, str(area.target), None), (area.b, area.mb, second, cwd)]
        results = mount_together(cowfs, area, jobs)
        codes = sorted(r.returncode for _, _, r in results)
        assert codes in ([0, 2], [2, 2]), (round_, [(r.returncode, r.stderr) for *_, r in results])
        winner = None
        for source, mnt, result in results:
            if result.returncode:
                refused_quietly(result, mnt)
            else:
                winner = source, mnt
        assert all(name.startswith("T.img") for name in os.listdir(area.dir)), os.listdir(area.dir)
        if winner is None:
            assert not area.target.exists()
            continue
        source, mnt = winner
        wins += 1
        writing([(round_ * CLUSTER, os.urandom(5000))])(mnt / source.name)
        done = run_cowfs("finish", mnt)
        assert done.returncode == 0, (round_, done.stdout + done.stderr)
        assert done.stdout.splitlines()[0] == "complete", done.stdout
        assert files_equal(area.target, befores[source]), (round_, source.name)
        assert os.path.samefile(record(area.target)["source"], source), (round_, source.name)
        for leftover in area.dir.iterdir():
            leftover.unlink()
    assert wins, "no mount ever won the race"


@pytest.mark.parametrize("spelling", sorted(set(SPELLINGS) - {"the same path"}))
def test_force_onto_the_target_of_a_running_job(
    cowfs: CowfsRunner, area: RaceArea, spelling: str
) -> None:
    """While A's job writes T, B's mount with --force and T spelled otherwise is refused
    and A's job neither notices nor loses its target."""
    before = snapshot(area.a, area.a.with_name("A.before"))
    m = cowfs.mount(area.a, area.target, "--speed", "1M", mountpoint=area.ma)
    inode = area.target.stat().st_ino
    second, cwd = SPELLINGS[spelling](area.dir)
    [(*_, result)] = mount_together(cowfs, area, [(area.b, area.mb, second, cwd)], "--force")
    refused_quietly(result, area.mb)
    assert area.target.stat().st_ino == inode
    assert m.status()["state"] == "running"
    write_live(m, os.urandom(70_000), SMALL - 100_000)
    assert run_cowfs("set-speed", m.mountpoint, "0").returncode == 0
    done = m.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "complete"
    assert files_equal(area.target, before)
    assert os.path.samefile(record(area.target)["source"], area.a)


# -- 2. chain links with a wrong backing -------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", SIZE, seed=43, holes=False)


def test_incremental_onto_a_cancelled_link_is_refused(
    cowfs: CowfsRunner, tmp_path: Path, source: Path
) -> None:
    """inc1 was cancelled: it holds part of its clusters, so a link on top of it would
    read the rest through to the full, from before. Onto the full it is right."""
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full)
    live_session(cowfs, source, "between1.img", writing(scattered(44, 64, 2 * CLUSTER)))  # 4 MiB
    inc1 = tmp_path / "inc1.qcow2"
    m = cowfs.mount(source, inc1, "--speed", "256K", *incremental_options(full))
    st = m.status()
    assert st["state"] == "running" and st["bytes_done"] < st["bytes_total"], st
    assert run_cowfs("cancel", m.mountpoint).returncode == 0
    assert_gone(m)
    assert info(inc1) == (1, "cancelled")
    assert record(inc1)["status"] == "cancelled"

    inc2 = tmp_path / "inc2.qcow2"
    message = refused_mount(cowfs, tmp_path, source, inc2, *incremental_options(inc1))
    assert "inc1.qcow2" in message, message
    pit = backup(cowfs, source, inc2, *incremental_options(full), writes=scattered(45, 3))
    assert_restores(inc2, pit)


def test_incremental_that_skips_a_link_is_refused(
    cowfs: CowfsRunner, tmp_path: Path, source: Path
) -> None:
    """The bitmap holds the writes since inc8; a link onto full7 would miss those
    between full7 and inc8. Refused, and the bitmap is still good for inc9 onto inc8."""
    full7, inc8, inc9 = (tmp_path / f"{n}.qcow2" for n in ("full7", "inc8", "inc9"))
    full_backup(cowfs, source, full7)
    live_session(cowfs, source, "between1.img", writing(scattered(46, 6)))
    backup(cowfs, source, inc8, *incremental_options(full7))
    live_session(cowfs, source, "between2.img", writing(scattered(47, 4, stride=5 * CLUSTER)))

    message = refused_mount(cowfs, tmp_path, source, inc9, *incremental_options(full7))
    assert "full7.qcow2" in message, message
    assert bitmaps(source)[BITMAP]["consistent"] is True
    pit = backup(cowfs, source, inc9, *incremental_options(inc8), writes=scattered(48, 2))
    assert_restores(inc9, pit)


def test_top_onto_a_backing_after_the_source_gained_a_hole(
    cowfs: CowfsRunner, tmp_path: Path, source: Path
) -> None:
    """A hole of the source reads as zeros; in a `--sync top` link onto a backing it must
    read as zeros too, not as the backing's old data."""
    cut = SIZE - 6 * CLUSTER - 1234
    with open(source, "r+b") as f:  # data the hole will replace: surely not zeros
        f.seek(cut)
        f.write(random.Random(49).randbytes(SIZE - cut))
    base = tmp_path / "base.qcow2"
    backup(cowfs, source, base)

    def shrink_and_regrow(live: Path) -> None:
        os.truncate(live, cut)
        os.truncate(live, SIZE)

    live_session(cowfs, source, "between.img", shrink_and_regrow)
    fd = os.open(source, os.O_RDONLY)
    try:
        assert os.lseek(fd, cut, os.SEEK_HOLE) < SIZE, "the regrown part is no hole"
    finally:
        os.close(fd)

    top = tmp_path / "top.qcow2"
    pit = backup(cowfs, source, top, "--sync", "top", "--backing", str(base))
    assert_restores(top, pit)


def _fail_record(link: Path) -> None:
    path = Path(f"{link}.cowfs.json")
    doc = json.loads(path.read_text())
    doc["status"] = "failed"
    path.write_text(json.dumps(doc))


BREAKS: dict[str, Callable[[Path], None]] = {
    "its record says failed": _fail_record,
    "its file is gone": lambda link: link.rename(link.with_name(link.name + ".moved")),
}


@pytest.mark.parametrize("damage", sorted(BREAKS))
def test_info_distrusts_a_chain_with_a_bad_lower_link(
    cowfs: CowfsRunner, tmp_path: Path, source: Path, damage: str
) -> None:
    """`cowfs info LINK` exits 0 only if LINK and every link below it can be trusted;
    otherwise it exits 1 and names the link that cannot."""
    full, inc1, inc2 = (tmp_path / f"{n}.qcow2" for n in ("full", "inc1", "inc2"))
    full_backup(cowfs, source, full)
    for n, link in enumerate((inc1, inc2)):
        live_session(cowfs, source, f"between{n}.img", writing(scattered(50 + n, 3)))
        backup(cowfs, source, link, *incremental_options(full if link == inc1 else inc1))
    assert run_cowfs("info", inc2).returncode == 0

    BREAKS[damage](full)
    for link in (inc2, inc1):
        shown = run_cowfs("info", link)
        assert shown.returncode == 1, (link.name, shown.stdout + shown.stderr)
        assert "full.qcow2" in shown.stdout + shown.stderr, shown.stdout + shown.stderr


# -- 3. a target named like cowfs's own files --------------------------------------------------

OWN_FILES: dict[str, Callable[[Path], Path]] = {
    "the source's bitmap file": bitmaps_file,
    "another target's record": lambda source: source.with_name("other.img.cowfs.json"),
    "another target's log": lambda source: source.with_name("other.img.cowfs.log"),
}


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["no-force", "force"])
@pytest.mark.parametrize("exists", [True, False], ids=["existing", "not-yet"])
@pytest.mark.parametrize("kind", sorted(OWN_FILES))
def test_target_named_like_a_cowfs_file_is_refused(
    cowfs: CowfsRunner, tmp_path: Path, kind: str, exists: bool, force: list[str]
) -> None:
    """Such a target would be replaced by cowfs's own file (or replace it): refused,
    whether that file exists yet or not, with or without --force."""
    source = make_image(tmp_path / "s.img", SMALL, seed=52, holes=False)
    victim = OWN_FILES[kind](source)
    bitmap = ["--bitmap", BITMAP] if victim == bitmaps_file(source) else []
    if exists:  # a real backup leaves the file there
        backup(cowfs, source, tmp_path / ("full.img" if bitmap else "other.img"), *bitmap)
        assert victim.is_file()
        content = victim.read_bytes()
    message = refused_mount(cowfs, tmp_path, source, victim, *bitmap, *force)
    assert victim.name in message, message
    if exists:
        assert victim.read_bytes() == content
    else:
        assert not victim.exists()


# -- 4. an outside write that restores the mtime -----------------------------------------------


def test_outside_write_that_restores_the_mtime(
    cowfs: CowfsRunner, tmp_path: Path, source: Path
) -> None:
    """A write cowfs did not see is in no bitmap, even when the writer put the mtime
    back: the bitmap must say inconsistent and the incremental must be refused."""
    full = tmp_path / "full.qcow2"
    full_backup(cowfs, source, full)
    assert bitmaps(source)[BITMAP]["consistent"] is True
    st = os.stat(source)
    fd = os.open(source, os.O_RDWR)
    try:
        old = os.pread(fd, 4096, 3 * CLUSTER)
        assert os.pwrite(fd, bytes(b ^ 0xFF for b in old), 3 * CLUSTER) == 4096
    finally:
        os.close(fd)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(source).st_mtime_ns == st.st_mtime_ns

    assert bitmaps(source)[BITMAP]["consistent"] is False
    message = refused_mount(
        cowfs, tmp_path, source, tmp_path / "inc1.qcow2", *incremental_options(full)
    )
    assert BITMAP in message, message


# -- 12. what a --sync none target holds ----------------------------------------------------


@pytest.mark.parametrize("sync", ["none", "full"])
def test_complete_says_fleecing_for_sync_none(
    cowfs: CowfsRunner, tmp_path: Path, sync: str
) -> None:
    """A `none` target holds only the old content of overwritten clusters: its record may
    say complete, but not plainly, as if it restored the source."""
    source = make_image(tmp_path / "s.img", SMALL, seed=53, holes=False)
    before = snapshot(source, tmp_path / "before.img")
    m = cowfs.mount(source, tmp_path / "t.img", "--sync", sync)
    write_live(m, os.urandom(3 * CLUSTER), 5 * CLUSTER)
    done = m.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    code, shown = info(m.target)
    assert code == 0, shown
    for first in (done.stdout.splitlines()[0], shown):
        if sync == "none":
            assert first.startswith("complete (fleecing"), first
        else:
            assert first == "complete", first
    with open(m.target, "rb") as t, open(before, "rb") as b:  # the overwritten clusters
        assert os.pread(t.fileno(), 3 * CLUSTER, 5 * CLUSTER) == b.read()[5 * CLUSTER : 8 * CLUSTER]
