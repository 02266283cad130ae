"""The processes the bench starts and how they end: cowfs commands, mounts, writers.

Owns every child of a run -- `cowfs mount` daemons (`CowfsMount`, `ServingMount`), the
bare FUSE file systems of (m) (`BareMount`), the writer processes (`Writer`), py-spy --
and the teardown that leaves none of them, and no
mount, behind: each is a context manager whose exit always cleans up, on errors, Ctrl-C
and SIGTERM too (the CLI turns signals into SystemExit so that every exit runs). How a
mount starts, answers and is taken down is tests/helpers/mounting.py's, which the tests
use too; the bench adds its timeouts and its politer ends (a cancel, and for a mount
without a job an unmount, before the lazy unmount and SIGKILL). Also the small timed
I/O that several phases share (whole-file and 64K reads, fsync).

It measures nothing by itself and knows no phase: what to run and what the figures mean
is `phases`'s, QEMU's side is `qemu`'s.
"""

import array
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from helpers.mounting import (
    COWFS,
    UNMOUNT,
    Cli,
    Mounted,
    is_mounted,
    pid_gone,
    serving_pids,
    take_down,
    wait_for,
)

from cowfs.control import send_command
from cowfs.errors import CowfsError

from .anchor import qb

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "scripts" / "bench.py"
"""What a writer child runs (`--writer-child`): the bench's own entry point."""
MiB = 1 << 20
POLL_S = 0.1
"""Status polling interval, as the anchor polls QMP: cheap for the daemon (one control read)."""
DIRTY_BS = 64 << 10
"""Whole 64K clusters: cowfs's default cluster and bitmap granularity, QEMU's too. The
dirty writes of (e), (h), (j) and (k) are this size, and so are (j)'s reads."""
PASS_SEED_STEP = 7919
"""Pass i of a writer writes with seed + i * this: other offsets and data in every pass."""


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def fsync_seconds(path: Path) -> float:
    """How long an fsync of `path` takes: what a command left unwritten."""
    seconds, _ = qb.timed(qb.fsync_path, str(path))
    return float(seconds)


# -- cowfs commands ---------------------------------------------------------------------


CURRENT = Cli(COWFS, timeout=3600)
"""This checkout's cowfs; a command may take an hour (a full backup of a large image)."""
run_cowfs = CURRENT.cowfs


def baseline_cli(rev: str, where: Path) -> Cli:
    """(j) --baseline-rev: `rev`'s cowfs package extracted with `git archive` into the
    work directory (no worktree, nothing written to the repository), run from there."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "cowfs"],
        capture_output=True,
        check=False,
    )
    if archive.returncode:
        raise SystemExit(f"--baseline-rev {rev}: {archive.stderr.decode().strip()}")
    where.mkdir()
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    env = dict(os.environ, PYTHONPATH=str(where))
    cli = Cli([sys.executable, "-P", "-m", "cowfs"], env, timeout=3600)
    probe = cli.run([sys.executable, "-P", "-c", "import cowfs; print(cowfs.__file__)"])
    if not probe.stdout.startswith(str(where)):
        raise SystemExit(f"--baseline-rev {rev}: its cowfs does not import ({probe.stderr})")
    return cli


# -- mounts -----------------------------------------------------------------------------


STOP_BENCH = ((None, 5.0), (UNMOUNT, 30.0), (signal.SIGKILL, 10.0))
"""After the polite end: 5 s for the daemon to unmount and go by itself, then a lazy
unmount (it works with files still open) and 30 s, then SIGKILL."""
START_S = 120.0
"""How long `cowfs mount` may take to serve (a 1 TiB source, (d))."""


class CowfsMount(Mounted):
    """One `cowfs mount` daemon with a job (`--target`, replacing the bench's previous
    target: `--force`); as a context manager it mounts on entry and tears down on exit.
    `teardown()` is idempotent and always leaves nothing behind."""

    def __init__(
        self,
        source: Path,
        mountpoint: Path,
        target: Path | None,
        *options: str,
        cli: Cli = CURRENT,
    ) -> None:
        force = ["--force"] if target is not None else []
        super().__init__(source, mountpoint, target, [*force, *options], cli=cli, stop=STOP_BENCH)

    def start(self, timeout: float | None = START_S) -> Self:
        return super().start(timeout)

    def copied(self) -> bool:
        st = self.poll()
        return bool(st["bytes_done"] >= st["bytes_total"])

    def vm(self, field: str) -> int:
        """A /proc/PID/status figure of the daemon in bytes (VmHWM, VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def wind_down(self) -> None:
        """Cancel (fast: no copying left to wait for); then `STOP_BENCH`."""
        if self.is_mounted():
            with suppress(CowfsError):
                send_command(self.mountpoint, "cancel")


class ServingMount(CowfsMount):
    """`cowfs mount IMG MP` without --target: serves the image and runs no job; jobs start
    and end on it by command. Its teardown cancels what still runs and unmounts, then
    falls back on CowfsMount's (lazy unmount, SIGKILL) for a file still open."""

    def __init__(self, source: Path, mountpoint: Path, *options: str) -> None:
        super().__init__(source, mountpoint, None, *options)

    def wind_down(self) -> None:
        if self.is_mounted():
            with suppress(CowfsError):
                self.cancel_jobs()
                wait_for(lambda: not self.running_jobs(), 30, POLL_S)
                send_command(self.mountpoint, "unmount")
                wait_for(lambda: pid_gone(self.pid), 10)
        if not pid_gone(self.pid):
            super().wind_down()


STOP_BARE = ((UNMOUNT, 10.0), (signal.SIGKILL, 10.0))
"""A bare file system that did not go after a plain unmount: a lazy unmount, then SIGKILL."""
BARE_START_S = 30.0


class BareMount:
    """A FUSE file system of the bench's own (`argv`: (m)'s nullfs, Python or C) serving
    one file, `name`, on `mountpoint` in the foreground as this process's child, its
    output into `log_path`. As a context manager: usable on entry -- mounted (the mount
    table says so, the daemon is not asked) and the file visible -- and gone on exit,
    whatever happened: `fusermount3 -u`, the daemon's loop ends and it exits; else
    `STOP_BARE`. `clean` then says whether it went by itself with exit code 0."""

    def __init__(self, argv: list[str], mountpoint: Path, name: str, log_path: Path) -> None:
        self.argv, self.mountpoint, self.log_path = argv, mountpoint, log_path
        self.live = mountpoint / name
        self.p: subprocess.Popen[bytes] | None = None
        self.clean = False

    def __enter__(self) -> Self:
        self.mountpoint.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.p = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            p = self.p
            ready = wait_for(
                lambda: (
                    p.poll() is not None
                    or (is_mounted(self.mountpoint, None) and self.live.exists())
                ),
                BARE_START_S,
                POLL_S / 10,
            )
            if not ready or p.poll() is not None:
                why = f"exit code {p.returncode}" if p.returncode is not None else "timed out"
                tail = self.log_path.read_text(errors="replace")[-1000:]
                raise RuntimeError(f"{self.argv[0]} did not serve {self.live} ({why}): {tail}")
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    def teardown(self) -> None:
        p, self.p = self.p, None
        if p is None:
            return
        if p.poll() is None and is_mounted(self.mountpoint, None):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            with suppress(subprocess.TimeoutExpired):
                p.wait(10)
        # A pid still running is our unreaped child: take_down cannot signal another's.
        alive = [p.pid] if p.poll() is None else []
        forced = not take_down(self.mountpoint, alive, STOP_BARE, fstype=None)
        if p.poll() is None:
            p.kill()  # our own child, by its pid
        p.wait()
        self.clean = not forced and p.returncode == 0


STOP_LIVE_RESTORE = ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0))
"""SIGTERM: the daemon stops its copier, saves its map and unmounts (DEST stays
resumable); `cowfs unmount` would wait for the whole copy."""


def stop_live_restore(mnt: Path, pid: int) -> bool:
    """End the live restore this bench started on `mnt` (its daemon, by pid, else the one
    serving `mnt`): `STOP_LIVE_RESTORE`, then 5 s for the mount to go by itself before a
    lazy unmount. True if it went by itself."""
    pids = [pid] if pid else serving_pids(mnt, b"restore")
    return take_down(mnt, pids, STOP_LIVE_RESTORE, settle=5.0) and bool(pids)


# -- writers ----------------------------------------------------------------------------


class Writer:
    """The anchor's writer (`run_workload`: same offsets, data and statistics as its
    `workload` subcommand) in a child process started *before* the mount exists: it opens
    the file only on GO, so no writer start-up time passes between the point in time and
    the first write (QEMU's writer is pre-started too, with its export already there).
    As a context manager, its exit kills a child still running."""

    def __init__(self, path: Path, wl: Any, tmpdir: Path, tag: str, passes: int = 1) -> None:
        """`passes` > 1: that many passes of `wl` (`writer_passes`); 0: passes until `stop()`."""
        self.json_path, self.times_path = tmpdir / f"{tag}.json", tmpdir / f"{tag}.times"
        spec = {"file": str(path), "size": wl.size, "bs": wl.bs, "total": wl.total,
                "seed": wl.seed, "json": str(self.json_path),
                "times": str(self.times_path), "passes": passes}  # fmt: skip
        argv = [sys.executable, str(ENTRY), "--anchors", str(Path(qb.__file__).parent)]
        self.p = subprocess.Popen(
            [*argv, "--writer-child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.p.stdin and self.p.stdout
        if self.p.stdout.readline().strip() != "READY":
            self.kill()
            raise RuntimeError("the writer process did not get ready")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def go(self) -> None:
        self._say("GO")

    def stop(self) -> None:
        """End a writer of `passes=0` after its current pass."""
        self._say("STOP")

    def _say(self, word: str) -> None:
        assert self.p.stdin
        self.p.stdin.write(word + "\n")
        self.p.stdin.flush()

    def done(self) -> bool:
        return self.p.poll() is not None

    def wait(self) -> tuple[dict[str, Any], list[tuple[int, int]]]:
        if self.p.wait():
            raise RuntimeError(f"the writer failed with exit code {self.p.returncode}")
        res = json.loads(self.json_path.read_text())
        times = qb.load_times(str(self.times_path))
        self.json_path.unlink()
        self.times_path.unlink()
        return res, times

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()  # our own child, by its pid
        self.p.wait()


def run_writer(path: Path, wl: Any, tmpdir: Path, tag: str, passes: int = 1) -> dict[str, Any]:
    """A `Writer` from GO to its end, alone: its result (without its write times)."""
    with Writer(path, wl, tmpdir, tag, passes) as w:
        w.go()
        res, _ = w.wait()
    return res


def writer_child(spec_json: str) -> int:
    """The child side of `Writer`: ready, wait for GO, then open and write."""
    spec = json.loads(spec_json)
    wl = qb.Workload(spec["size"], spec["bs"], spec["total"], "random", spec["seed"])
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 2
    if spec["passes"] == 1:
        res = qb.run_workload(spec["file"], wl, times_out=spec["times"])
    else:
        res = writer_passes(spec)
    Path(spec["json"]).write_text(json.dumps(res))
    return 0


def writer_passes(spec: dict[str, Any]) -> dict[str, Any]:
    """Passes of the workload (pass i: seed + i * PASS_SEED_STEP), until `passes` are done
    or, with 0, until STOP (or EOF) is on stdin after a pass; one result over all passes,
    in `run_workload`'s terms, and all their times in one file."""
    part = spec["times"] + ".pass"
    times: list[tuple[int, int]] = []
    write_s = total_s = 0.0
    n = 0
    while True:
        seed = spec["seed"] + n * PASS_SEED_STEP
        wl = qb.Workload(spec["size"], spec["bs"], spec["total"], "random", seed)
        res = qb.run_workload(spec["file"], wl, times_out=part)
        times += qb.load_times(part)
        write_s += res["write_s"]
        total_s += res["total_s"]
        n += 1
        if n == spec["passes"] or (not spec["passes"] and select.select([sys.stdin], [], [], 0)[0]):
            break
    os.unlink(part)
    with open(spec["times"], "wb") as f:
        array.array("q", [x for pair in times for x in pair]).tofile(f)
    nbytes = len(times) * spec["bs"]
    return {"passes": n, "nwrites": len(times), "write_s": round(write_s, 4),
            "total_s": round(total_s, 4), "mib_s": round(nbytes / MiB / total_s, 1),
            "write_mib_s": round(nbytes / MiB / write_s, 1),
            "lat_us": qb.lat_summary_ns([d for _, d in times])}  # fmt: skip


@contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """Optionally sample the daemon with py-spy (collapsed stacks) for the block's duration."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "250"]
    p = subprocess.Popen([*argv, "--format", "raw", "-o", str(out)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- timed reads ------------------------------------------------------------------------


def read_all(path: Path) -> dict[str, Any]:
    """Read `path` whole in 1 MiB reads from a cold page cache: MiB/s and its SHA-256."""
    qb.drop_caches()
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    seconds = time.perf_counter() - t0
    return {"mib_s": round(path.stat().st_size / MiB / seconds, 1), "sha256": digest.hexdigest()}


def timed_reads(path: Path, offsets: list[int], reference: Path | None) -> dict[str, Any]:
    """One plain 64K pread per offset, timed alone; with `reference`, each read is
    compared (untimed) with the reference file's bytes there."""
    durations = []
    equal = True
    fd = os.open(path, os.O_RDONLY)
    ref = os.open(reference, os.O_RDONLY) if reference is not None else -1
    try:
        for offset in offsets:
            t0 = time.perf_counter_ns()
            data = os.pread(fd, DIRTY_BS, offset)
            durations.append(time.perf_counter_ns() - t0)
            if ref >= 0 and data != os.pread(ref, DIRTY_BS, offset):
                equal = False
    finally:
        os.close(fd)
        if ref >= 0:
            os.close(ref)
    seconds = sum(durations) / 1e9
    out = {"lat_us": qb.lat_summary_ns(durations),
           "mib_s": round(len(offsets) * DIRTY_BS / MiB / seconds, 1)}  # fmt: skip
    if reference is not None:
        out["equal"] = equal
    return out
