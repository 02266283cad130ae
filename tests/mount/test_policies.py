"""Error policies and job control under real faults (issue 4, points 1 to 4).

A backup at night meets a flaky disk, a full target, a hung NFS server. The
policies decide what that costs: `report` fails the backup, `ignore` retries,
`stop`/`enospc` pause it until someone frees space and resumes, and for a
copy-before-write either the snapshot breaks or the guest's write does. Each
test here injects the fault for real (faultfs for EIO and slow I/O, a full tmpfs
for ENOSPC) and checks what the guest saw, the job's state and reason, and, where
the backup completes, the target against the point in time.

Sources with copier read faults lie on faultfs. Tests of target errors and of
copy-before-write keep the source local and put the target on faultfs, with an
image of random bytes: no zero cluster is skipped, so every copy is a target
write that the fault can hit.
"""

import contextlib
import errno
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from conftest import FaultyFS, SmallFS, files_equal, make_image
from helpers.faults import BATCH, CLUSTER, FAST, PACED, SIZE
from helpers.mounting import CowfsRunner, Mounted, run_cowfs, wait_until
from helpers.mounts import assert_gone, info, record, write_live

LAST = SIZE - 2 * CLUSTER
"""A cluster the copier surely has not reached in the first second at PACED."""


@pytest.fixture
def before(tmp_path: Path) -> Path:
    return tmp_path / "before.img"


@pytest.fixture
def faulty_source(faulty: FaultyFS, before: Path) -> Path:
    """A 4 MiB image on faultfs (no holes); `before` holds its point-in-time content."""
    make_image(faulty.backing_path("disk.img"), SIZE, seed=51, holes=False)
    shutil.copyfile(faulty.backing_path("disk.img"), before)
    return faulty.path("disk.img")


@pytest.fixture
def local_source(tmp_path: Path, before: Path) -> Path:
    """A 4 MiB image of random bytes on the local disk: no zero clusters, so that every
    cluster copied is a write to the target that a target fault can hit."""
    source = tmp_path / "disk.img"
    source.write_bytes(random.Random(52).randbytes(SIZE))
    shutil.copyfile(source, before)
    return source


def status(m: Mounted) -> dict:
    return m.status()


def wait_state(m: Mounted, wanted: str, timeout: float = 20) -> dict:
    result: dict = {}

    def reached() -> bool:
        result.update(m.status())
        return result["state"] == wanted

    wait_until(reached, timeout, f"the job to be {wanted}")
    return result


def control(m: Mounted, *command: str) -> str:
    done = run_cowfs(*command[:1], m.mountpoint, *command[1:])
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def finish_complete(m: Mounted, before: Path, target: Path | None = None) -> None:
    result = m.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "complete"
    assert_gone(m)
    assert info(m.target) == (0, "complete")
    assert files_equal(target or m.target, before)


# -- --on-source-error --------------------------------------------------------------------


def test_source_error_ignore_retries_and_completes(
    cowfs: CowfsRunner, faulty: FaultyFS, faulty_source: Path, before: Path
) -> None:
    faulty.fail("disk.img", "read", offset=2 * BATCH + CLUSTER, length=4096, times=3)
    m = cowfs.mount(faulty_source, None, "--speed", FAST, "--on-source-error", "ignore")
    wait_until(lambda: faulty.hits() >= 3, 20, "three failed reads")
    assert status(m)["state"] == "running"
    finish_complete(m, before)
    log = Path(f"{m.target}.cowfs.log").read_text()
    assert log.count("Input/output error") >= 3, "each error is logged"


def test_source_error_stop_pauses_until_resumed(
    cowfs: CowfsRunner, faulty: FaultyFS, faulty_source: Path, before: Path
) -> None:
    bad = 2 * BATCH + 3 * CLUSTER
    faulty.fail("disk.img", "read", offset=bad, length=4096)
    m = cowfs.mount(faulty_source, None, "--speed", FAST, "--on-source-error", "stop")
    st = wait_state(m, "paused")
    assert st["paused_reason"] == "error"
    assert "Input/output error" in st["last_error"]
    assert str(bad - bad % BATCH) in st["last_error"] or "offset" in st["last_error"]
    assert "paused" in run_cowfs("status", m.mountpoint).stdout
    hits = faulty.hits()
    faulty.clear()
    assert control(m, "resume").startswith("running")
    finish_complete(m, before)
    assert hits >= 1


def test_stopped_job_finished_without_resume_fails(
    cowfs: CowfsRunner, faulty: FaultyFS, faulty_source: Path
) -> None:
    """After the unmount nobody can resume: a job stopped on a lasting error fails."""
    faulty.fail("disk.img", "read", offset=BATCH, length=4096)
    m = cowfs.mount(faulty_source, None, "--speed", FAST, "--on-source-error", "stop")
    wait_state(m, "paused")
    result = m.finish()
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "failed"
    assert_gone(m)
    assert info(m.target) == (1, "failed")


# -- --on-target-error ----------------------------------------------------------------------


def test_target_enospc_pauses_and_resumes_after_space_is_freed(
    cowfs: CowfsRunner, small_fs: SmallFS, local_source: Path, before: Path
) -> None:
    small_fs.resize(2 * SIZE)
    target = small_fs.path / "target.img"
    m = cowfs.mount(local_source, target, "--speed", PACED, "--on-target-error", "enospc")
    write_live(m, b"a" * 4096, LAST)  # copy-before-write, while there is space
    small_fs.fill()
    st = wait_state(m, "paused")
    assert st["paused_reason"] == "error"
    assert "No space left" in st["last_error"]
    write_live(m, b"b" * 4096, LAST)  # the guest goes on (a cluster already done)
    small_fs.free()
    assert control(m, "resume").startswith("running")
    control(m, "set-speed", "0")
    finish_complete(m, before)


def test_target_enospc_reports_other_errors(
    cowfs: CowfsRunner, faulty: FaultyFS, local_source: Path
) -> None:
    faulty.fail("target.img", "write", offset=BATCH, length=4096)
    m = cowfs.mount(
        local_source, faulty.path("target.img"), "--speed", FAST, "--on-target-error", "enospc"
    )
    wait_state(m, "failed")
    assert m.finish().returncode == 1
    assert info(m.target) == (1, "failed")
    assert any("Input/output error" in e for e in record(m.target)["errors"])


def test_target_error_stop_pauses_until_resumed(
    cowfs: CowfsRunner, faulty: FaultyFS, local_source: Path, before: Path
) -> None:
    faulty.fail("target.img", "write", offset=BATCH, length=4096)
    m = cowfs.mount(
        local_source, faulty.path("target.img"), "--speed", FAST, "--on-target-error", "stop"
    )
    st = wait_state(m, "paused")
    assert st["paused_reason"] == "error" and st["last_error"]
    write_live(m, b"c" * 4096, 0)  # an early cluster: copied already
    faulty.clear()
    control(m, "resume")
    finish_complete(m, before, faulty.backing_path("target.img"))


def test_target_error_ignore_retries_and_completes(
    cowfs: CowfsRunner, faulty: FaultyFS, local_source: Path, before: Path
) -> None:
    faulty.fail("target.img", "write", offset=BATCH, length=4096, times=2)
    m = cowfs.mount(
        local_source, faulty.path("target.img"), "--speed", FAST, "--on-target-error", "ignore"
    )
    wait_until(lambda: faulty.hits() >= 2, 20, "two failed writes")
    finish_complete(m, before, faulty.backing_path("target.img"))


# -- --on-cbw-error and --cbw-timeout ---------------------------------------------------------


def test_cbw_error_break_guest_write(
    cowfs: CowfsRunner, faulty: FaultyFS, local_source: Path, before: Path
) -> None:
    """The old data cannot be saved: the guest write fails with EIO and changes nothing;
    the backup goes on, and the retried write succeeds once the target behaves."""
    faulty.fail("target.img", "write", offset=LAST, length=CLUSTER, times=1)
    m = cowfs.mount(
        local_source,
        faulty.path("target.img"),
        "--speed",
        PACED,
        "--on-cbw-error",
        "break-guest-write",
    )
    with pytest.raises(OSError) as err:
        write_live(m, b"g" * 4096, LAST)
    assert err.value.errno == errno.EIO
    assert local_source.read_bytes()[LAST : LAST + 4096] == before.read_bytes()[LAST:][:4096]
    st = status(m)
    assert st["state"] == "running"
    assert st["last_error"]
    write_live(m, b"h" * 4096, LAST)
    assert local_source.read_bytes()[LAST : LAST + 4096] == b"h" * 4096
    control(m, "set-speed", "0")
    finish_complete(m, before, faulty.backing_path("target.img"))


def test_cbw_error_break_snapshot_is_the_default(
    cowfs: CowfsRunner, faulty: FaultyFS, local_source: Path
) -> None:
    faulty.fail("target.img", "write", offset=LAST, length=CLUSTER)
    m = cowfs.mount(local_source, faulty.path("target.img"), "--speed", PACED)
    write_live(m, b"s" * 4096, LAST)  # goes through
    assert local_source.read_bytes()[LAST : LAST + 4096] == b"s" * 4096
    st = status(m)
    assert st["state"] == "failed"
    assert any("copy-before-write" in e for e in st["errors"])
    faulty.clear()
    assert m.finish().returncode == 1
    assert info(m.target) == (1, "failed")


def test_cbw_timeout_breaks_the_snapshot_instead_of_stalling(
    cowfs: CowfsRunner, faulty: FaultyFS, local_source: Path
) -> None:
    """A hung target (1.5 s per write) must not stall the guest beyond --cbw-timeout."""
    faulty.fail("target.img", "write", offset=LAST, length=CLUSTER, errno=0, delay=1.5)
    m = cowfs.mount(
        local_source, faulty.path("target.img"), "--speed", PACED, "--cbw-timeout", "0.2"
    )
    start = time.monotonic()
    write_live(m, b"t" * 4096, LAST)
    assert time.monotonic() - start < 1.2
    assert local_source.read_bytes()[LAST : LAST + 4096] == b"t" * 4096
    st = status(m)
    assert st["state"] == "failed"
    assert st["last_error"]
    faulty.clear()
    assert m.finish().returncode == 1


def open_files(pid: int) -> set[str]:
    """What the process has open; an fd closed while we look is left out."""
    files = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            files.add(os.readlink(fd))
    return files


def test_a_target_given_up_on_is_closed_once_its_copy_returns(
    cowfs: CowfsRunner, faulty: FaultyFS, local_source: Path
) -> None:
    """--cbw-timeout gives up on a copy to a hung target, not on its thread: the job's
    end leaves the target open while that thread may still write into it (closing it
    could hand its fd number to another file), and closes it once the thread returns.
    A mount that lives as long as the VM must not keep one file open per such job."""
    faulty.fail("target.img", "write", offset=LAST, length=CLUSTER, errno=0, delay=3)
    target = str(faulty.path("target.img"))
    m = cowfs.mount(local_source, target, "--speed", PACED, "--cbw-timeout", "0.2")
    write_live(m, b"t" * 4096, LAST)
    assert status(m)["state"] == "failed"
    assert target in open_files(m.pid)  # the copy given up on still writes
    wait_until(lambda: target not in open_files(m.pid), what="the target closed")
    assert m.finish().returncode == 1
    assert info(Path(target)) == (1, "failed")


# -- pause, resume, set-speed -----------------------------------------------------------------


def test_pause_resume_by_the_user(cowfs: CowfsRunner, local_source: Path, before: Path) -> None:
    m = cowfs.mount(local_source, None, "--speed", PACED)
    assert control(m, "pause").startswith("paused (user)")
    st = wait_state(m, "paused")
    assert st["paused_reason"] == "user"
    copied = st["bytes_copier"]
    write_live(m, b"p" * 4096, LAST)  # copy-before-write goes on while paused
    for _ in range(3):  # the copier stays put (each status read takes a while)
        st = status(m)
        assert st["bytes_copier"] == copied
    assert st["bytes_cbw"] == CLUSTER
    out = control(m, "resume")
    assert out.startswith("running")
    st = status(m)
    assert st["paused_reason"] is None
    control(m, "set-speed", "0")
    finish_complete(m, before)


def test_finish_while_paused_completes(
    cowfs: CowfsRunner, local_source: Path, before: Path
) -> None:
    m = cowfs.mount(local_source, None, "--speed", PACED)
    control(m, "pause")
    write_live(m, b"q" * 4096, 0)
    control(m, "set-speed", "0")  # still paused: speed is not resume
    assert status(m)["state"] == "paused"
    finish_complete(m, before)


def test_set_speed(cowfs: CowfsRunner, local_source: Path, before: Path) -> None:
    """A job crawling at 256K/s is sped up live: unlimited, it is done at once."""
    m = cowfs.mount(local_source, None, "--speed", "256K")
    wait_until(lambda: status(m)["bytes_copier"] >= 2 * BATCH, 10, "the first two batches")
    control(m, "set-speed", "1M")
    assert status(m)["speed"] == 1 << 20
    control(m, "set-speed", "0")
    assert status(m)["speed"] == 0
    start = time.monotonic()
    wait_until(lambda: status(m)["bytes_done"] == SIZE, 20, "the copier to finish")
    assert time.monotonic() - start < 1.5
    finish_complete(m, before)


@pytest.mark.parametrize("command", [["pause"], ["resume"], ["set-speed", "1M"]])
def test_job_control_without_mount(tmp_path: Path, command: list[str]) -> None:
    done = run_cowfs(command[0], tmp_path, *command[1:])
    assert done.returncode == 2
    assert done.stderr.startswith("cowfs: error: ")
    assert len(done.stderr.splitlines()) == 1


def test_bad_policy_is_refused(cowfs: CowfsRunner, local_source: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for bad in (
        ["--on-source-error", "enospc"],
        ["--on-target-error", "panic"],
        ["--on-cbw-error", "ignore"],
        ["--cbw-timeout", "-1"],
        ["--cbw-timeout", "soon"],
    ):
        done = run_cowfs("mount", local_source, mnt, "--target", tmp_path / "t.img", *bad)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert done.stderr.startswith("cowfs: error: ") and len(done.stderr.splitlines()) == 1
        assert not os.listdir(mnt)
        assert not (tmp_path / "t.img").exists()
