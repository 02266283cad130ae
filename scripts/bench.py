"""cowfs against QEMU's own backup job, side by side in one run, with ratios.

Why one command: the issue's floors are relative (cowfs vs QEMU in the same run,
vs `cp`), and figures from another day or another load on these shared 2-core
machines mean little. So both sides run here in one time window, on the same
image (`make_source_image`, seed 1), with the same writer process, offsets and
data (the anchor's `workload`, seed+1000 as its `bench` uses) and the same speed
limit, and the script prints ratios next to the issue's floors.

QEMU's side is `../shared/anchors/qemu_backup.py` (the anchor): run as its own
`bench` subprocess with only the phases needed, and imported (never copied) for
its image, writer, comparison and latency helpers.

Per repetition (medians over `--repeat`):
  (a) 64K and 4K random writes through the mount during a full backup at
      `--speed` (100M), vs the same writes through QEMU's FUSE export during
      its backup job at the same speed. The cowfs target must equal the
      pristine image afterwards, and the source the pristine image plus the writes.
  (b) the same writes through an *idle* cowfs mount -- a full backup whose copier
      has already finished (the job is still mounted, so every write still asks
      the done bitmap) -- vs the plain file. QEMU's export with no job is shown too.
  (c) full backup with no writer, unlimited: mount, immediately finish, until
      `finish` returns (the daemon fsyncs the target first) plus an fsync, vs
      QEMU's job (+fsync) and `cp --sparse=always` (+fsync).
  (d) peak RSS (VmHWM) of the daemon on a 1 TiB sparse source: sync top (writes
      through the mount, copier done, finish) and sync full (mount, status, cancel).
  (e) incremental backups (issue 3) with `--dirty` (1 %, 10 %) of the image dirty: a
      qcow2 full backup anchoring a bitmap, random 64K writes through a `--sync none`
      mount, then an incremental with no writer, mount -> finish (+fsync). Its time must
      follow the dirty data, not the image size, so it is shown against cowfs's own full
      backup, and against QEMU's incremental job of the very same dirty set (the anchor's
      `bench --sync incremental --phases nowriter`: its phase-1 writer has the same seed,
      block size and total as ours). Both incrementals must equal the source as it was.
  (f) compressed full backup (issue 3): `--compress` into qcow2 (mount -> finish, +fsync)
      vs `qemu-img convert -c -O qcow2` (+fsync) of the same image: time and file size.
  (g) the barrier of `cowfs backup` under a running writer: on a mount without --target,
      the writer (4K and 64K separately) writes in passes of `BARRIER_PASS` through the
      live file while `--barriers` (20) `cowfs backup --sync none` jobs start one after the
      other, each cancelled (`cowfs cancel MP JOB`: the mount keeps serving) before the
      next. Each job's `barrier_s` from `cowfs status --json` -- how long the barrier that
      fixed its point in time held new guest writes -- as p50/p99/max in ms against the
      issue's goal (p99 < 5 ms; shown, not asserted: with 20 barriers the nearest-rank p99
      is the max); the longest write that overlapped each `backup` command (what the guest
      felt); and the writer's own p99 latency and MiB/s against the very same passes
      through a mount of a fresh copy that runs no job.
  (h) incremental on a running mount: one mount without --target, a full qcow2 backup
      anchoring a bitmap (`cowfs backup --bitmap --wait`), the dirty writes of (e) through
      the live file, then `cowfs backup --sync incremental --backing FULL --wait` timed as
      a user waits for it (+fsync; no mount in it: the mount is running), and the job's own
      `elapsed_s` from status (+fsync), against QEMU's incremental job of the same dirty
      set in the same repetition (as in (e)), and against (e)'s mount -> finish when (e)
      ran too; then `cowfs unmount`. Both backups must equal the source as it was.
  (i) views (issue 11): the whole image read (1 MiB reads, page cache dropped first)
      through a `--sync none --view` job's view while the 64K writer writes to the live
      file, vs the plain image read with no writer, vs QEMU's own fleecing in the same
      repetition (qemu-storage-daemon: a copy-before-write filter over the source into
      a qcow2 fleecing image, snapshot-access over it, both FUSE exports). The view's
      hash must equal the pristine image's. The writer's MiB/s during the read against
      the same passes with the job running and no reader.
  (j) checksums, verify and restore: a chain built as in (h) on one running mount (a full
      qcow2 backup anchoring a bitmap, then per `--dirty` percentage the dirty writes --
      other offsets for each link -- and an incremental over the link before), read back
      with a warm page cache (os.sync before each timed command, as (c) and (f), no drop):
      `cowfs verify TOP` vs `qemu-img check` of every link + `qemu-img convert -n` of the top
      into a null-co node (every cluster read, nothing written), and vs the same checks +
      `qemu-img convert -O raw` into a file; `cowfs restore TOP DEST` (+fsync) vs `qemu-img
      convert -O raw` (+fsync: qemu-img's default cache mode does not flush), and both into
      qcow2. Every output must equal the source as it was at the top's point in time. What
      the checksums cost a full backup: XXH3-128 of the image's non-zero 64K clusters in
      process (and through `Checksums.data`, as the job records them) over the chain's full
      backup (job + fsync); with `--baseline-rev REV` (e.g. e7f9d40, the commit before
      checksums; needs this repository's history) also full backups by REV's code and this
      tree's, alternating ABBA. Then `LIVE_READS` 64K reads of distinct clusters of the upper
      half right after `cowfs restore TOP DEST --live MP --speed --live-speed` (20M) returns
      (the copier, filling from the start, does not reach them: every read restores its
      cluster first), vs the same reads of the raw file `cowfs restore` wrote (page cache)
      and of QEMU's nearest, a read-only qemu-storage-daemon FUSE export of the qcow2 chain;
      each read checked against the restored file. The live restore is then stopped with
      SIGTERM (it stays resumable; `cowfs unmount` would wait for the whole copy).
  (k) crash-safe change tracking (issue 9): the writes of (b) through a mount with no
      job, once with no bitmap (no tracking) and once with one (every write marks it,
      the first write into a region waits for its intent record, saves every 10 s),
      back to back in each repetition; then what a crash leaves: (h)'s dirty writes
      through a mount with a bitmap, kill -9 right after them (default intent regions
      of 64 MiB, and 1 MiB ones) or once saves cleared the intent, and the recovered
      bitmap (`cowfs bitmap list` after the crash) against the clusters truly written
      (the daemon's own bitmap just before the kill). The incremental on a running
      mount with tracking on is (h).

The table shows medians over `--repeat` and the spread (min-max) of the per-repetition
ratios. `--phases` picks any of a-k (default all); figures of a `--py-spy` run are not
comparable.

Run as root with the project's venv:  .venv/bin/python scripts/bench.py
Everything lives in a private directory under `--workdir`, removed unless `--keep`.
Every mount, daemon and child is torn down on exit, Ctrl-C or SIGTERM.
"""

import argparse
import array
import bisect
import hashlib
import json
import math
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import xxhash

from cowfs.bitmap import store_path
from cowfs.claims import claim_file
from cowfs.control import read_status, send_command
from cowfs.errors import CowfsError
from cowfs.intent import intent_path
from cowfs.record import FINAL_STATES
from cowfs.sums import Checksums, sums_path

REPO = Path(__file__).resolve().parent.parent
COWFS = [sys.executable, "-m", "cowfs"]
MiB = 1 << 20
RSS_SOURCE_SIZE = 1 << 40
RSS_LIMIT_MIB = 100
POLL_S = 0.1
"""Status polling interval, as the anchor polls QMP: cheap for the daemon (one control read)."""
PHASES = "abcdefghijk"
DIRTY_BS = 64 << 10
"""(e) dirties whole 64K clusters: cowfs's default cluster and bitmap granularity, QEMU's too."""
BITMAP = "bench"
VIEW_BS = 64 << 10
"""(i): the writer's block size while a view is read."""
BARRIER_GOAL_MS = 5.0
"""(g): the issue's goal for the barrier's p99; the table shows it, nothing asserts it."""
BARRIER_PASS = 32 * MiB
"""(g): bytes per writer pass. The writer stops only between passes, so a short pass ends
the run soon after the last barrier (a 4K pass through the mount takes a few seconds)."""
PASS_SEED_STEP = 7919
"""(g): pass i writes with seed + i * this: other offsets and data in every pass."""
BARRIER_LEAD_S = 0.5
"""(g): the writer writes this long before the first barrier, so none meets a cold start."""
LIVE_READS = 1000
"""(j): 64K reads per side of a live restore's unrestored clusters."""
LIVE_SPACING = 4
"""(j): the reads' clusters are at least this many clusters apart (FUSE readahead: 128K)."""
CONSTANT_REFS = {"limit": RSS_LIMIT_MIB, "goal": BARRIER_GOAL_MS}
"""Table references that are fixed figures, not measurements."""

qb: ModuleType  # the anchor module, imported in main() from --anchors


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def import_anchor(directory: Path) -> ModuleType:
    sys.path.insert(0, str(directory))
    import qemu_backup  # the path is known only at run time

    qemu_backup.QUIET = True
    return qemu_backup


# -- processes we start, and their teardown -----------------------------------------------


def is_mounted(path: Path) -> bool:
    return qb.is_mounted(str(path))


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def run_cowfs(*argv: str) -> subprocess.CompletedProcess[str]:
    """One cowfs command as a user runs it; its exit code is the caller's to judge."""
    argv = (*COWFS, *argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)


class Cli:
    """How cowfs is run: this checkout's (`CURRENT`), or another revision's code (`--baseline-rev`:
    its tree on PYTHONPATH, and `-P` so that the working directory, which `-m` would put
    first on sys.path, cannot shadow it)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv, self.env = argv, env

    def run(self, argv: list[str], timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=self.env
        )


CURRENT = Cli(COWFS)


class CowfsMount:
    """One `cowfs mount` daemon; `teardown()` is idempotent and always leaves nothing behind."""

    live: Path
    cli: Cli = CURRENT

    def __init__(self, source: Path, mountpoint: Path, target: Path | None, *options: str) -> None:
        self.source, self.mountpoint, self.target = source, mountpoint, target
        self.options = options
        self.pid = 0

    def start(self) -> "CowfsMount":
        self.mountpoint.mkdir(exist_ok=True)
        argv = [*self.cli.argv, "mount", str(self.source), str(self.mountpoint)]
        if self.target is not None:
            argv += ["--target", str(self.target), "--force"]
        argv += self.options
        done = self.cli.run(argv, timeout=120)
        if done.returncode:
            self.teardown()
            raise RuntimeError(f"cowfs mount failed: {done.stderr.strip()}")
        try:
            self.pid = int(self.status()["pid"])
        except Exception as e:
            self.teardown()
            raise RuntimeError(f"cowfs mount returned 0 but: {e}; log: {self.log_tail()}") from e
        self.live = self.mountpoint / self.source.name
        return self

    def log_tail(self) -> str:
        try:
            return Path(str(self.target) + ".cowfs.log").read_text()[-2000:]
        except OSError as e:
            return str(e)

    def status(self) -> dict[str, Any]:
        return read_status(self.mountpoint)

    def copied(self) -> bool:
        st = self.status()
        return st["bytes_done"] >= st["bytes_total"]

    def vm(self, field: str) -> int:
        """A /proc/PID/status figure of the daemon in bytes (VmHWM, VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def finish(self) -> int:
        done = self.cli.run([*self.cli.argv, "finish", str(self.mountpoint)])
        wait_for(lambda: pid_gone(self.pid), 60)
        return done.returncode

    def cancel(self) -> int:
        done = self.cli.run([*self.cli.argv, "cancel", str(self.mountpoint)])
        wait_for(lambda: pid_gone(self.pid), 60)
        return done.returncode

    def teardown(self) -> None:
        """Cancel (fast: no copying left to wait for), then lazy unmount, then SIGKILL."""
        if self.pid and not pid_gone(self.pid) and is_mounted(self.mountpoint):
            with suppress(CowfsError):
                send_command(self.mountpoint, "cancel")
        if is_mounted(self.mountpoint) and not wait_for(lambda: not is_mounted(self.mountpoint), 5):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        if self.pid and not wait_for(lambda: pid_gone(self.pid), 30):
            os.kill(self.pid, signal.SIGKILL)
            wait_for(lambda: pid_gone(self.pid), 10)
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)


@contextmanager
def cowfs_mount(
    source: Path, mnt: Path, target: Path, *options: str, cli: Cli = CURRENT
) -> Iterator[CowfsMount]:
    m = CowfsMount(source, mnt, target, *options)
    m.cli = cli
    try:
        yield m.start()
    finally:
        m.teardown()


class ServingMount(CowfsMount):
    """`cowfs mount IMG MP` without --target: serves the image and runs no job; jobs start
    and end on it by command. `teardown()` cancels what still runs and unmounts, then
    falls back on CowfsMount's (lazy unmount, SIGKILL) for a file still open."""

    def __init__(self, source: Path, mountpoint: Path, *options: str) -> None:
        super().__init__(source, mountpoint, None, *options)

    def log_tail(self) -> str:
        try:
            return claim_file("mount", self.mountpoint, ".log").read_text()[-2000:]
        except OSError as e:
            return str(e)

    def job(self, job_id: int) -> dict[str, Any]:
        return next(j for j in self.status()["jobs"] if j["id"] == job_id)

    def unmount(self) -> int:
        """`cowfs unmount`: refused while a job runs or a file is open."""
        done = run_cowfs("unmount", str(self.mountpoint))
        if not done.returncode:
            wait_for(lambda: pid_gone(self.pid), 60)
        return done.returncode

    def running(self) -> set[int]:
        return {j["id"] for j in self.status()["jobs"] if j["state"] not in FINAL_STATES}

    def teardown(self) -> None:
        if self.pid and not pid_gone(self.pid) and is_mounted(self.mountpoint):
            with suppress(CowfsError):
                for job_id in self.running():
                    with suppress(CowfsError):
                        send_command(self.mountpoint, "cancel", job=job_id)
                wait_for(lambda: not self.running(), 30, POLL_S)
                send_command(self.mountpoint, "unmount")
                wait_for(lambda: pid_gone(self.pid), 10)
        super().teardown()


@contextmanager
def serving_mount(source: Path, mnt: Path, *options: str) -> Iterator[ServingMount]:
    m = ServingMount(source, mnt, *options)
    try:
        m.start()
        yield m
    finally:
        m.teardown()


class Writer:
    """The anchor's writer (`run_workload`: same offsets, data and statistics as its
    `workload` subcommand) in a child process started *before* the mount exists: it opens
    the file only on GO, so no writer start-up time passes between the point in time and
    the first write (QEMU's writer is pre-started too, with its export already there)."""

    def __init__(self, path: Path, wl: Any, tmpdir: Path, tag: str, passes: int = 1) -> None:
        """`passes` > 1: that many passes of `wl` (`writer_passes`); 0: passes until `stop()`."""
        self.json_path, self.times_path = tmpdir / f"{tag}.json", tmpdir / f"{tag}.times"
        spec = {"file": str(path), "size": wl.size, "bs": wl.bs, "total": wl.total,
                "seed": wl.seed, "json": str(self.json_path),
                "times": str(self.times_path), "passes": passes}  # fmt: skip
        argv = [sys.executable, __file__, "--anchors", str(Path(qb.__file__).parent)]
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

    def go(self) -> None:
        assert self.p.stdin
        self.p.stdin.write("GO\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        """End a writer of `passes=0` after its current pass."""
        assert self.p.stdin
        self.p.stdin.write("STOP\n")
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
def writer(path: Path, wl: Any, tmpdir: Path, tag: str, passes: int = 1) -> Iterator[Writer]:
    w = Writer(path, wl, tmpdir, tag, passes)
    try:
        yield w
    finally:
        w.kill()


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


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that every finally-block runs


# -- the measurements -------------------------------------------------------------------


class Bench:
    """One run: a pristine image, then per repetition every phase of both sides."""

    def __init__(self, args: argparse.Namespace, wd: Path) -> None:
        self.a = args
        self.wd = wd
        self.pristine = wd / "pristine.raw"
        self.mnt = wd / "mnt"
        self.expected: dict[int, Path] = {}
        self.baseline: Cli | None = None
        """(j) with --baseline-rev: that revision's cowfs."""

    def workload(self, bs: int) -> Any:
        return qb.Workload(self.a.size, bs, self.a.total, "random", self.a.seed + 1000)

    def prepare(self) -> None:
        log(f"creating the {self.a.size / MiB:g} MiB source image (seed {self.a.seed})")
        qb.make_source_image(str(self.pristine), self.a.size, self.a.seed)
        if self.a.baseline_rev and "j" in self.a.phases:
            self.baseline = baseline_cli(self.a.baseline_rev, self.wd / "baseline")
        if not {"a", "b", "k"} & set(self.a.phases):
            return  # only (a), (b) and (k) check a source against its expected image
        for bs in self.a.bs:
            p = self.wd / f"expected_{bs}.raw"
            qb.sparse_copy(str(self.pristine), str(p))
            qb.apply_workload(str(p), self.workload(bs))
            self.expected[bs] = p

    def fresh(self, name: str) -> Path:
        p = self.wd / name
        qb.sparse_copy(str(self.pristine), str(p))
        os.sync()  # writeback of the copy must not disturb the next measurement
        return p

    def rm(self, *paths: Path) -> None:
        for p in paths:
            p.unlink(missing_ok=True)
            Path(str(p) + ".cowfs.json").unlink(missing_ok=True)
            Path(str(p) + ".cowfs.log").unlink(missing_ok=True)
            store_path(p).unlink(missing_ok=True)
            intent_path(p).unlink(missing_ok=True)
            sums_path(p).unlink(missing_ok=True)
            Path(str(p) + ".cowfs-restore").unlink(missing_ok=True)  # a live restore's map

    def profile_path(self, tag: str) -> Path | None:
        return Path(self.a.py_spy) / f"{tag}.txt" if self.a.py_spy else None

    # -- QEMU's side: the anchor's own bench, only the phases asked for ------------------

    def qemu(self, phases: str, bs: int, speed: int, total: int = 0, *extra: str) -> dict[str, Any]:
        """The anchor's `bench` with `--sync full` unless `extra` says otherwise (later
        options win in argparse); `total` defaults to `--total`."""
        out = self.wd / "qemu.json"
        argv = [sys.executable, str(Path(qb.__file__)), "bench", "--source", str(self.pristine)]
        argv += ["--phases", phases, "--bs", str(bs), "--total", str(total or self.a.total)]
        argv += ["--sync", "full", "--repeat", "1", "--seed", str(self.a.seed), *extra]
        argv += ["--workdir", str(self.wd), "--json-out", str(out), "--quiet"]
        if speed:
            argv += ["--speed", str(speed)]
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate()
        finally:
            if p.poll() is None:
                p.terminate()  # the anchor turns SIGTERM into its own cleanup
                p.wait()
        if p.returncode not in (0, 1):
            raise RuntimeError(f"anchor bench failed ({p.returncode}): {err[-2000:]}")
        result = json.loads(out.read_text())
        out.unlink()
        rep = result["repeats"][0]
        rep["ok"] = result["ok"]
        return rep

    # -- (a) writes during a rate-limited full backup ------------------------------------

    def cowfs_backup(self, bs: int) -> dict[str, Any]:
        src, tgt = self.fresh("cowfs_src.raw"), self.wd / "cowfs_tgt.raw"
        wl = self.workload(bs)
        speed = ("--speed", str(self.a.speed))
        with (
            writer(self.mnt / src.name, wl, self.wd, f"cowfs_{bs}") as w,
            cowfs_mount(src, self.mnt, tgt, "--sync", "full", *speed) as m,
        ):
            at_go = m.status()["bytes_done"]
            with py_spy(m.pid, self.profile_path(f"a_{bs}")):
                w.go()
                t_copied = self._wait_copied(m, w)
            wres, times = w.wait()
            st = m.status()
            rc = m.finish()
        wres["during_job"] = qb.split_writer_by_time(times, t_copied, bs)
        out = {
            "writer": wres,
            "bytes_done_at_go": at_go,
            "bytes_cbw": st["bytes_cbw"],
            "bytes_copier": st["bytes_copier"],
            "finish_rc": rc,
            "verify": qb.compare_files(str(tgt), str(self.pristine)),
            "source_check": qb.compare_files(str(src), str(self.expected[bs])),
        }
        self.rm(src, tgt)
        return out

    def _wait_copied(self, m: CowfsMount, w: Writer) -> int:
        """Poll until the copier has copied everything and the writer is done; returns
        the monotonic ns at which the copy was first seen complete."""
        t_copied = 0
        deadline = time.monotonic() + 3600
        while not (t_copied and w.done()):
            if not t_copied and m.copied():
                t_copied = qb.mono()
            if time.monotonic() > deadline:
                raise TimeoutError("cowfs backup did not finish within an hour")
            time.sleep(POLL_S)
        return t_copied

    # -- (b) writes through an idle mount, and on the plain file -------------------------

    def cowfs_idle(self, bs: int) -> dict[str, Any]:
        src, tgt = self.fresh("idle_src.raw"), self.wd / "idle_tgt.raw"
        with cowfs_mount(src, self.mnt, tgt, "--sync", "full") as m:
            if not wait_for(m.copied, 600, POLL_S):
                raise TimeoutError("the idle mount's copier did not finish")
            os.sync()  # the copier's writeback must not land in the writer's window
            wl = self.workload(bs)
            with (
                writer(m.live, wl, self.wd, f"idle_{bs}") as w,
                py_spy(m.pid, self.profile_path(f"b_{bs}")),
            ):
                w.go()
                wres, _ = w.wait()
            rc = m.finish()
        out = {
            "writer": wres,
            "finish_rc": rc,
            "verify": qb.compare_files(str(tgt), str(self.pristine)),
            "source_check": qb.compare_files(str(src), str(self.expected[bs])),
        }
        self.rm(src, tgt)
        return out

    def plain(self, bs: int) -> dict[str, Any]:
        src = self.fresh("plain.raw")
        with writer(src, self.workload(bs), self.wd, f"plain_{bs}") as w:
            w.go()
            wres, _ = w.wait()
        self.rm(src)
        return {"writer": wres}

    # -- (c) full backup with no writer ----------------------------------------------

    def cowfs_nowriter(self) -> dict[str, Any]:
        src, tgt = self.fresh("nowriter_src.raw"), self.wd / "nowriter_tgt.raw"
        out = self.timed_backup(src, tgt, None, "--sync", "full")
        out["verify"] = qb.compare_files(str(tgt), str(self.pristine))
        self.rm(src, tgt)
        return out

    def timed_backup(
        self, src: Path, tgt: Path, spy: str | None, *options: str, cli: Cli = CURRENT
    ) -> dict[str, Any]:
        """A backup with no writer: mount, finish at once, fsync the target. `finish`
        returns when the copier is done and the daemon has fsynced and gone, so
        mount -> finish is the job; the extra fsync finds anything still unwritten."""
        t0 = qb.mono()
        with cowfs_mount(src, self.mnt, tgt, *options, cli=cli) as m:
            t1 = qb.mono()
            with py_spy(m.pid, self.profile_path(spy) if spy else None):
                rc = m.finish()
            t2 = qb.mono()
        fsync_s, _ = qb.timed(qb.fsync_path, str(tgt))
        record = json.loads(Path(str(tgt) + ".cowfs.json").read_text())
        return {
            "bytes_total": record["bytes_total"],
            "bytes_written": record["bytes_written"],
            "mount_s": round((t1 - t0) / 1e9, 4),
            "finish_s": round((t2 - t1) / 1e9, 4),
            "fsync_s": round(fsync_s, 4),
            "job_plus_fsync_s": round((t2 - t1) / 1e9 + fsync_s, 4),
            "with_mount_s": round((t2 - t0) / 1e9 + fsync_s, 4),
            "record_duration_s": record["duration_s"],
            "finish_rc": rc,
        }

    def cp(self) -> dict[str, Any]:
        dst = self.wd / "cp_target.raw"
        os.sync()
        cp_s, _ = qb.timed(qb.sparse_copy, str(self.pristine), str(dst))
        fsync_s, _ = qb.timed(qb.fsync_path, str(dst))
        self.rm(dst)
        return {"cp_s": round(cp_s, 4), "cp_total_s": round(cp_s + fsync_s, 4)}

    # -- (e) incremental backups of a partly dirty image ------------------------------------

    def dirty_workload(self, pct: float, link: int = 0) -> Any:
        """64K random writes whose distinct clusters cover `pct` % of the image: random
        offsets repeat, and n writes touch N(1 - e^(-n/N)) of N clusters on average, so
        n = -N ln(1 - pct/100). Seed+1001 is the anchor's phase-1 writer with the same
        size, bs and total: both sides dirty the same clusters with the same data.
        `link` n > 0 (the n-th incremental of a chain, (j)) moves the seed by n * PASS_SEED_STEP:
        other offsets and data, so a 10 % set does not start with the 1 % set before it."""
        n_clusters = self.a.size // DIRTY_BS
        n = max(1, round(-n_clusters * math.log1p(-pct / 100)))
        seed = self.a.seed + 1001 + link * PASS_SEED_STEP
        return qb.Workload(self.a.size, DIRTY_BS, n * DIRTY_BS, "random", seed)

    def qemu_incremental(self, pct: float) -> dict[str, Any]:
        """The anchor's bitmap + full (qcow2, as ours), phase-1 writes through its FUSE
        export with no job, then the incremental job with no writer (its `nowriter`)."""
        wl = self.dirty_workload(pct)
        fmt = ("--sync", "incremental", "--target-format", "qcow2")
        q = self.qemu("nowriter", DIRTY_BS, 0, wl.total, *fmt)
        job = q["nowriter"]
        job["full_plus_fsync_s"] = round(job["full_job"]["job_s"] + job["full_job_fsync_s"], 4)
        job["inc_over_full"] = job["job_plus_fsync_s"] / job["full_plus_fsync_s"]
        job["dirty_mib"] = job["dirty_bytes"] / MiB
        return q

    def cowfs_incremental(self, pct: float) -> dict[str, Any]:
        """Full qcow2 backup anchoring the bitmap, the dirty writes through a `--sync none`
        mount (it copies only what they overwrite, and its end stores the bitmap
        consistent), then the incremental with `--backing` the full."""
        src = self.fresh("inc_src.raw")
        full, inc = self.wd / "inc_full.qcow2", self.wd / "inc_inc.qcow2"
        junk, expected = self.wd / "inc_dirtying.raw", self.wd / "inc_expected.raw"
        tag = f"e_{pct:g}"
        out: dict[str, Any] = {}
        try:
            out["full"] = self.timed_backup(src, full, f"{tag}_full", "--bitmap", BITMAP)
            wl = self.dirty_workload(pct)
            with cowfs_mount(src, self.mnt, junk, "--sync", "none") as m:
                out["dirty_writer"] = qb.run_workload(str(m.live), wl)
                out["dirty_finish_rc"] = m.finish()
            out["dirty_mib"] = self.dirty_bytes(src) / MiB
            os.sync()  # the writes' writeback must not land in the incremental's window
            inc_opts = ("--sync", "incremental", "--bitmap", BITMAP, "--backing", str(full))
            out["inc"] = self.timed_backup(src, inc, f"{tag}_inc", *inc_opts)
            out["inc"]["file_mib"] = inc.stat().st_size / MiB
            out["inc_over_full"] = out["inc"]["with_mount_s"] / out["full"]["with_mount_s"]
            # the source as it was at the incremental's point in time: pristine + writes
            qb.sparse_copy(str(self.pristine), str(expected))
            qb.apply_workload(str(expected), wl)
            out["verify_full"] = qb.compare_images(str(full), str(self.pristine), "qcow2", "raw")
            out["verify"] = qb.compare_images(str(inc), str(expected), "qcow2", "raw")
            out["source_check"] = qb.compare_files(str(src), str(expected))
        finally:
            self.rm(src, full, inc, junk, expected)
        return out

    def dirty_bytes(self, src: Path) -> int:
        """`cowfs bitmap list`: what the incremental will copy, as QEMU's dirty count."""
        return next(b["dirty_bytes"] for b in self.bitmap_rows(src) if b["name"] == BITMAP)

    # -- (f) compressed full backup ------------------------------------------------------

    def cowfs_compressed(self) -> dict[str, Any]:
        src, tgt = self.fresh("comp_src.raw"), self.wd / "comp_tgt.qcow2"
        try:
            out = self.timed_backup(src, tgt, "f", "--compress")
            out["file_mib"] = tgt.stat().st_size / MiB
            out["verify"] = qb.compare_images(str(tgt), str(self.pristine), "qcow2", "raw")
        finally:
            self.rm(src, tgt)
        return out

    def convert_compressed(self) -> dict[str, Any]:
        """`qemu-img convert -c` of the pristine image: what a QEMU user runs for a
        compressed copy (QEMU's own backup job with compress=on is a slower way)."""
        dst = self.wd / "convert_c.qcow2"
        argv = [qb.QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2"]
        os.sync()
        try:
            convert_s, _ = qb.timed(qb.run, [*argv, str(self.pristine), str(dst)])
            fsync_s, _ = qb.timed(qb.fsync_path, str(dst))
            out = {
                "convert_s": round(convert_s, 4),
                "convert_plus_fsync_s": round(convert_s + fsync_s, 4),
                "file_mib": dst.stat().st_size / MiB,
                "verify": qb.compare_images(str(dst), str(self.pristine), "qcow2", "raw"),
            }
        finally:
            self.rm(dst)
        return out

    # -- (d) memory on a 1 TiB sparse source ---------------------------------------------

    def rss(self) -> dict[str, Any]:
        src, tgt = self.wd / "huge.raw", self.wd / "huge_tgt.raw"
        make_huge_sparse(src)
        out: dict[str, Any] = {}
        try:
            out["top"] = self._rss_top(src, tgt)
            self.rm(tgt)
            out["full"] = self._rss_full(src, tgt)
        finally:
            self.rm(src, tgt)
        return out

    def _rss_top(self, src: Path, tgt: Path) -> dict[str, Any]:
        t0 = qb.mono()
        with cowfs_mount(src, self.mnt, tgt, "--sync", "top") as m:
            mount_s = (qb.mono() - t0) / 1e9
            write_spread(m.live, RSS_SOURCE_SIZE, count=64)
            copied = wait_for(m.copied, 300, POLL_S)
            st = m.status()
            hwm, rss = m.vm("VmHWM"), m.vm("VmRSS")
            rc = m.finish()
        return {"mount_s": round(mount_s, 3), "copied": copied, "bytes_total": st["bytes_total"],
                "vm_hwm_mib": round(hwm / MiB, 1), "vm_rss_mib": round(rss / MiB, 1),
                "finish_rc": rc}  # fmt: skip

    def _rss_full(self, src: Path, tgt: Path) -> dict[str, Any]:
        t0 = qb.mono()
        with cowfs_mount(src, self.mnt, tgt, "--sync", "full") as m:
            mount_s = (qb.mono() - t0) / 1e9
            st = m.status()
            hwm, rss = m.vm("VmHWM"), m.vm("VmRSS")
            rc = m.cancel()
        return {"mount_s": round(mount_s, 3), "bytes_total": st["bytes_total"],
                "vm_hwm_mib": round(hwm / MiB, 1), "vm_rss_mib": round(rss / MiB, 1),
                "cancel_rc": rc}  # fmt: skip

    # -- (g) the barrier of `cowfs backup` under a running writer ----------------------------

    def barrier(self, bs: int) -> dict[str, Any]:
        """`--barriers` `cowfs backup --sync none` jobs, each cancelled before the next, on a
        mount without --target while the writer writes in passes; then the same passes
        through a mount of a fresh copy that runs no job."""
        wl = qb.Workload(self.a.size, bs, BARRIER_PASS, "random", self.a.seed + 1000)
        src = self.fresh("barrier_src.raw")
        out: dict[str, Any] = {}
        try:
            with serving_mount(src, self.mnt) as m:
                with writer(m.live, wl, self.wd, f"g_{bs}", passes=0) as w:
                    w.go()
                    cmds = self._barriers(m, w)
                    w.stop()
                    out["writer"], times = w.wait()
                st = json.loads(run_cowfs("status", str(m.mountpoint), "--json").stdout)
                out["unmount_ok"] = m.unmount() == 0
        finally:
            self.rm(src)
        jobs = {j["id"]: j for j in st["jobs"]}
        for c in cmds:
            job = jobs.get(c["id"], {})
            barrier_s = job.get("barrier_s")
            c["barrier_ms"] = None if barrier_s is None else round(barrier_s * 1e3, 3)
            c["state"] = job.get("state")
            c["stall_ms"] = round(longest_write(times, c.pop("t0"), c.pop("t1")) / 1e6, 3)
        out["jobs"] = cmds
        out["jobs_ok"] = len(cmds) == self.a.barriers and all(
            c["state"] == "cancelled" and c["barrier_ms"] is not None and not c["cancel_rc"]
            for c in cmds
        )
        for key in ("barrier_ms", "stall_ms", "cmd_ms"):
            out[key] = percentiles([c[key] for c in cmds if c[key] is not None])
        src = self.fresh("barrier_idle.raw")
        try:
            with serving_mount(src, self.mnt) as m:
                passes = out["writer"]["passes"]
                with writer(m.live, wl, self.wd, f"g0_{bs}", passes) as w:
                    w.go()
                    out["idle"], _ = w.wait()
                out["idle_unmount_ok"] = m.unmount() == 0
        finally:
            self.rm(src)
        return out

    def _barriers(self, m: ServingMount, w: Writer) -> list[dict[str, Any]]:
        """Start and cancel the jobs while the writer writes; each with its command's
        monotonic window (t0, t1) and wall time."""
        cmds = []
        time.sleep(BARRIER_LEAD_S)
        for i in range(self.a.barriers):
            if w.done():
                raise RuntimeError("the writer ended before the last barrier")
            tgt = self.wd / f"barrier_{i}.raw"
            t0 = qb.mono()
            done = run_cowfs("backup", str(m.mountpoint), "--sync", "none", "--target", str(tgt))
            t1 = qb.mono()
            if done.returncode:
                raise RuntimeError(f"cowfs backup failed: {done.stderr.strip()}")
            job_id = int(done.stdout.split()[0])
            cancel = run_cowfs("cancel", str(m.mountpoint), str(job_id))
            cmds.append({"id": job_id, "t0": t0, "t1": t1, "cmd_ms": round((t1 - t0) / 1e6, 3),
                         "cancel_rc": cancel.returncode})  # fmt: skip
            self.rm(tgt)
        return cmds

    # -- (h) incremental on a mount that stays mounted ----------------------------------------

    def incremental_on_mount(self, pct: float) -> dict[str, Any]:
        """One mount without --target: a full qcow2 backup anchoring the bitmap, (e)'s dirty
        writes through the live file, the incremental with `--backing` the full, unmount."""
        src = self.fresh("hinc_src.raw")
        full, inc = self.wd / "hinc_full.qcow2", self.wd / "hinc_inc.qcow2"
        expected = self.wd / "hinc_expected.raw"
        wl = self.dirty_workload(pct)
        out: dict[str, Any] = {}
        try:
            with serving_mount(src, self.mnt) as m:
                out["full"] = self.timed_job(m, full, "--bitmap", BITMAP)
                out["dirty_writer"] = qb.run_workload(str(m.live), wl)
                out["dirty_mib"] = self.dirty_bytes(src) / MiB
                os.sync()  # the writes' writeback must not land in the incremental's window
                inc_opts = ("--sync", "incremental", "--bitmap", BITMAP, "--backing", str(full))
                out["inc"] = self.timed_job(m, inc, *inc_opts)
                out["inc"]["file_mib"] = inc.stat().st_size / MiB
                out["unmount_ok"] = m.unmount() == 0
            qb.sparse_copy(str(self.pristine), str(expected))
            qb.apply_workload(str(expected), wl)
            out["verify_full"] = qb.compare_images(str(full), str(self.pristine), "qcow2", "raw")
            out["verify"] = qb.compare_images(str(inc), str(expected), "qcow2", "raw")
            out["source_check"] = qb.compare_files(str(src), str(expected))
        finally:
            self.rm(src, full, inc, expected)
        return out

    def timed_job(self, m: ServingMount, tgt: Path, *options: str) -> dict[str, Any]:
        """`cowfs backup MP --target TGT ... --wait` timed as a user waits for it (the CLI's
        start and its status polling included), plus an fsync of the target; and the job's
        own time, its `elapsed_s` in status (from its start to complete), plus that fsync."""
        t0 = qb.mono()
        done = run_cowfs("backup", str(m.mountpoint), "--target", str(tgt), *options, "--wait")
        t1 = qb.mono()
        if not done.stdout.strip():
            raise RuntimeError(f"cowfs backup failed: {done.stderr.strip()}")
        fsync_s, _ = qb.timed(qb.fsync_path, str(tgt))
        job = m.job(int(done.stdout.split()[0]))
        cli_s = (t1 - t0) / 1e9
        return {
            "complete_ok": done.returncode == 0 and job["state"] == "complete",
            "bytes_total": job["bytes_total"],
            "bytes_written": job["bytes_written"],
            "cli_s": round(cli_s, 4),
            "fsync_s": round(fsync_s, 4),
            "cli_plus_fsync_s": round(cli_s + fsync_s, 4),
            "job_s": job["elapsed_s"],
            "job_plus_fsync_s": round(job["elapsed_s"] + fsync_s, 4),
        }

    # -- (i) views ----------------------------------------------------------------------------

    def view_read(self) -> dict[str, Any]:
        out: dict[str, Any] = {"plain": read_all(self.pristine)}
        src, store = self.fresh("i_src.raw"), self.wd / "i_fleece.img"
        wl = self.workload(VIEW_BS)
        try:
            with serving_mount(src, self.mnt) as m:
                done = run_cowfs("backup", str(self.mnt), "--sync", "none", "--view",
                                 "--target", str(store))  # fmt: skip
                if done.returncode:
                    raise RuntimeError(f"backup --view failed: {done.stderr.strip()}")
                view = Path(done.stdout.split()[1])
                with writer(m.live, wl, self.wd, "i_reader", passes=0) as w:
                    w.go()
                    out["cowfs"] = read_all(view)
                    w.stop()
                    out["writer_reading"], _ = w.wait()
                passes = out["writer_reading"]["passes"]
                with writer(m.live, wl, self.wd, "i_alone", passes=passes) as w:
                    w.go()
                    out["writer_alone"], _ = w.wait()
                out["end_ok"] = run_cowfs("end", str(self.mnt)).returncode == 0
                out["unmount_ok"] = m.unmount() == 0
        finally:
            self.rm(src, store)
        out["view_ok"] = out["cowfs"]["sha256"] == out["plain"]["sha256"]
        out["qemu"] = self.qemu_fleecing(wl)
        out["qemu"]["matches_pit"] = out["qemu"]["sha256"] == out["plain"]["sha256"]
        return out

    def qemu_fleecing(self, wl: Any) -> dict[str, Any]:
        """QEMU's fleecing: copy-before-write into a qcow2 image, read through
        snapshot-access, while the same writer writes through the filter's export."""
        src, store = self.fresh("i_qsrc.raw"), self.wd / "i_qfleece.qcow2"
        live, snap = self.wd / "i_live", self.wd / "i_snap"
        qb.create_target(str(store), self.a.size, "qcow2")
        nodes = [
            {"driver": "file", "node-name": "src", "filename": str(src)},
            {"driver": "qcow2", "node-name": "fleece",
             "file": {"driver": "file", "filename": str(store)}},
            {"driver": "copy-before-write", "node-name": "cbw", "file": "src",
             "target": "fleece"},
            {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"},
        ]  # fmt: skip
        snap.touch()
        export = {"type": "fuse", "id": "exp1", "node-name": "acc", "mountpoint": str(snap),
                  "writable": False}  # fmt: skip
        try:
            extra = ["--export", json.dumps(export)]
            with (
                qb.QSD(str(self.wd), "fleece", nodes, "cbw", str(live), extra_args=extra),
                writer(live, wl, self.wd, "i_qemu", passes=0) as w,
            ):
                w.go()
                res = read_all(snap)
                w.stop()
                res["writer_reading"], _ = w.wait()
        finally:
            self.rm(src, store, live, snap)
        return res

    # -- (j) checksums: verify, restore, live restore ----------------------------------------

    def checksummed_chain(self, rep: int) -> dict[str, Any]:
        """A full qcow2 backup and one incremental per `--dirty` percentage on one running
        mount (as (h)); what hashing costs the full; then the chain read back by cowfs and
        by QEMU's nearest equivalents: verify, restore raw and qcow2, and 64K reads of a
        live restore's unrestored clusters."""
        n = f"rep {rep + 1}/{self.a.repeat} (j)"
        src = self.fresh("j_src.raw")
        links = [self.wd / "j_full.qcow2"]
        links += [self.wd / f"j_inc{i + 1}.qcow2" for i in range(len(self.a.dirty))]
        top, expected, restored = links[-1], self.wd / "j_expected.raw", self.wd / "j_restored.raw"
        out: dict[str, Any] = {"qemu": {}, "cowfs": {}}
        try:
            out["chain"] = self._chain(src, links, expected)
            log(f"{n} XXH3-128 of the image's data clusters, in process")
            out["hash"] = self.hash_cost()
            if self.baseline is not None:
                log(f"{n} full backups: {self.a.baseline_rev} (no checksums) vs this tree, ABBA")
                out["baseline"] = self.baseline_full(rep)
            log(f"{n} qemu-img check of each link + convert to null-co; cowfs verify")
            out["qemu"]["verify"] = self.qemu_verify(links)
            out["cowfs"]["verify"] = self.cowfs_verify(top)
            for fmt in ("raw", "qcow2"):
                log(f"{n} qemu-img convert -O {fmt}; cowfs restore --format {fmt}")
                out["qemu"][f"convert_{fmt}"] = self.qemu_convert(top, fmt, expected)
                dst = restored if fmt == "raw" else self.wd / "j_restored.qcow2"
                try:
                    out["cowfs"][f"restore_{fmt}"] = self.cowfs_restore(top, dst, fmt, expected)
                finally:
                    if fmt != "raw":
                        self.rm(dst)
            q = out["qemu"]
            q["verify_file_s"] = q["verify"]["check_s"] + q["convert_raw"]["convert_s"]
            log(f"{n} 64K reads: the restored file, a live restore at {self.a.live_speed} B/s, QSD")
            offsets = self.read_offsets()
            out["plain"] = timed_reads(restored, offsets, None)
            out["live"] = self.live_reads(top, offsets, restored)
            out["qsd"] = self.qsd_reads(top, offsets, restored)
        finally:
            self.rm(src, *links, expected, restored)
        return out

    def _chain(self, src: Path, links: list[Path], expected: Path) -> dict[str, Any]:
        """The chain's backups on one running mount (timed as (h)'s); `expected` becomes
        the source at the top link's point in time."""
        out: dict[str, Any] = {}
        qb.sparse_copy(str(self.pristine), str(expected))
        with serving_mount(src, self.mnt) as m:
            out["full"] = self.timed_job(m, links[0], "--bitmap", BITMAP)
            for i, pct in enumerate(self.a.dirty):
                wl = self.dirty_workload(pct, link=i)
                qb.run_workload(str(m.live), wl)
                qb.apply_workload(str(expected), wl)
                os.sync()  # the writes' writeback must not land in the incremental's window
                opts = ("--sync", "incremental", "--bitmap", BITMAP, "--backing", str(links[i]))
                out[f"inc{i + 1}"] = self.timed_job(m, links[i + 1], *opts)
                out[f"inc{i + 1}"]["file_mib"] = links[i + 1].stat().st_size / MiB
            out["unmount_ok"] = m.unmount() == 0
        out["full"]["file_mib"] = links[0].stat().st_size / MiB
        out["source_check"] = qb.compare_files(str(src), str(expected))
        return out

    def hash_cost(self) -> dict[str, Any]:
        """What the checksums cost a full backup, in process: the image read once (page
        cache, not timed), then its non-zero 64K clusters (the ones a job writes as data,
        and so hashes) hashed per 1 MiB read, as the copier does: xxh3_128_digest alone,
        and `Checksums.data` (the digest stored in the table, what `Recording` runs)."""
        cs = DIRTY_BS
        zero = bytes(cs)
        sums = Checksums(self.a.size, cs)
        buf = bytearray(MiB)
        view = memoryview(buf)
        xxh_ns = rec_ns = clusters = 0
        with open(self.pristine, "rb", buffering=0) as f:
            offset = 0
            while got := f.readinto(buf):
                data = [p for p in range(0, got, cs) if not buf.startswith(zero, p, p + cs)]
                t0 = time.perf_counter_ns()
                for p in data:
                    xxhash.xxh3_128_digest(view[p : p + cs])
                t1 = time.perf_counter_ns()
                for p in data:
                    sums.data(offset + p, view[p : p + cs])
                t2 = time.perf_counter_ns()
                xxh_ns, rec_ns = xxh_ns + t1 - t0, rec_ns + t2 - t1
                clusters += len(data)
                offset += got
        mib = clusters * cs / MiB
        return {"data_mib": mib, "xxh3_s": xxh_ns / 1e9, "recording_s": rec_ns / 1e9,
                "xxh3_gib_s": round(mib / 1024 / (xxh_ns / 1e9), 2),
                "recording_gib_s": round(mib / 1024 / (rec_ns / 1e9), 2)}  # fmt: skip

    def baseline_full(self, rep: int) -> dict[str, Any]:
        """Full qcow2 backups with no writer (mount -> finish, +fsync, as (c)) by
        `--baseline-rev`'s code and by this tree's, alternating ABBA (BAAB in odd
        repetitions); each side's mean. The records tell the two apart: only this tree's
        names a checksum file."""
        order = ["old", "new", "new", "old"] if rep % 2 == 0 else ["new", "old", "old", "new"]
        times: dict[str, list[float]] = {"old": [], "new": []}
        ok = True
        for which in order:
            src, tgt = self.fresh("j_ab_src.raw"), self.wd / "j_ab_full.qcow2"
            try:
                assert self.baseline is not None
                cli = self.baseline if which == "old" else CURRENT
                res = self.timed_backup(src, tgt, None, "--sync", "full", cli=cli)
                record = json.loads(Path(str(tgt) + ".cowfs.json").read_text())
                sums = record.get("checksums") is not None
                ok = ok and res["finish_rc"] == 0 and sums == (which == "new")
                times[which].append(res["job_plus_fsync_s"])
            finally:
                self.rm(src, tgt)
        return {"old_s": statistics.mean(times["old"]), "new_s": statistics.mean(times["new"]),
                "old_runs": times["old"], "new_runs": times["new"], "runs_ok": ok}  # fmt: skip

    def qemu_verify(self, links: list[Path]) -> dict[str, Any]:
        """QEMU's nearest to `cowfs verify`: `qemu-img check` of every link (structure),
        then `qemu-img convert -n` of the top into a null-co node (reads every allocated
        cluster of the image through the chain, writes nothing)."""
        os.sync()
        t0 = qb.mono()
        checks = [qb.run([qb.QEMU_IMG, "check", "-f", "qcow2", str(p)], check=False) for p in links]
        t1 = qb.mono()
        null = f"driver=null-co,size={self.a.size}"
        argv = [qb.QEMU_IMG, "convert", "-n", "-f", "qcow2", str(links[-1])]
        convert = qb.run([*argv, "--target-image-opts", null], check=False)
        t2 = qb.mono()
        return {"check_s": (t1 - t0) / 1e9, "convert_null_s": (t2 - t1) / 1e9,
                "s": (t2 - t0) / 1e9, "check_ok": all(c.returncode == 0 for c in checks),
                "convert_ok": convert.returncode == 0}  # fmt: skip

    def cowfs_verify(self, top: Path) -> dict[str, Any]:
        os.sync()
        t0 = qb.mono()
        done = run_cowfs("verify", str(top))
        seconds = (qb.mono() - t0) / 1e9
        ok = done.returncode == 0 and done.stdout.startswith("verify: ok")
        return {"s": seconds, "verify_ok": ok}

    def qemu_convert(self, top: Path, fmt: str, expected: Path) -> dict[str, Any]:
        """`qemu-img convert -O FMT` of the chain (its default cache mode does not flush:
        an fsync of the output afterwards, as (f))."""
        dst = self.wd / f"j_convert.{fmt}"
        argv = [qb.QEMU_IMG, "convert", "-f", "qcow2", "-O", fmt, str(top), str(dst)]
        os.sync()
        try:
            convert_s, _ = qb.timed(qb.run, argv)
            fsync_s, _ = qb.timed(qb.fsync_path, str(dst))
            return {"convert_s": convert_s, "fsync_s": fsync_s, "total_s": convert_s + fsync_s,
                    "file_mib": dst.stat().st_size / MiB,
                    "verify": qb.compare_images(str(dst), str(expected), fmt, "raw")}  # fmt: skip
        finally:
            self.rm(dst)

    def cowfs_restore(self, top: Path, dst: Path, fmt: str, expected: Path) -> dict[str, Any]:
        """`cowfs restore TOP DST --format FMT` (it fsyncs DST before it returns; the fsync
        after it, as after qemu-img, finds nothing left)."""
        os.sync()
        t0 = qb.mono()
        done = run_cowfs("restore", str(top), str(dst), "--format", fmt)
        restore_s = (qb.mono() - t0) / 1e9
        if done.returncode:
            raise RuntimeError(f"cowfs restore failed: {done.stdout.strip()} {done.stderr.strip()}")
        fsync_s, _ = qb.timed(qb.fsync_path, str(dst))
        out = {"restore_s": restore_s, "fsync_s": fsync_s, "total_s": restore_s + fsync_s,
               "file_mib": dst.stat().st_size / MiB,
               "verify": qb.compare_images(str(dst), str(expected), fmt, "raw")}  # fmt: skip
        if fmt == "qcow2":
            check = qb.run([qb.QEMU_IMG, "check", "-f", "qcow2", str(dst)], check=False)
            out["qemu_img_check_ok"] = check.returncode == 0
        return out

    def read_offsets(self) -> list[int]:
        """`LIVE_READS` distinct 64K clusters of the image's upper half, `LIVE_SPACING`
        clusters apart at least (the kernel's readahead after one never brings in
        another), in random order: a live restore's copier fills from the start, and at
        `--live-speed` it does not reach the upper half during the reads."""
        count = self.a.size // DIRTY_BS // LIVE_SPACING
        slots = range(count // 2, count)
        picks = random.Random(self.a.seed + 2000).sample(slots, min(LIVE_READS, len(slots)))
        return [p * LIVE_SPACING * DIRTY_BS for p in picks]

    def live_reads(self, top: Path, offsets: list[int], reference: Path) -> dict[str, Any]:
        """`cowfs restore TOP DEST --live MP --speed --live-speed`, timed until it returns
        (the file served), then the reads through MP/<name of DEST>, each checked against
        the restored file. Stopped with SIGTERM (the daemon stops its copier, saves its map
        and unmounts; DEST stays resumable): `cowfs unmount` would wait for the whole copy."""
        dest = self.wd / "j_live.raw"
        self.mnt.mkdir(exist_ok=True)
        speed = str(self.a.live_speed)
        pid = 0
        os.sync()
        t0 = qb.mono()
        done = run_cowfs("restore", str(top), str(dest), "--live", str(self.mnt), "--speed", speed)
        ready_s = (qb.mono() - t0) / 1e9
        try:
            if done.returncode:
                raise RuntimeError(f"restore --live failed: {done.stdout} {done.stderr.strip()}")
            before = read_status(self.mnt)
            pid = int(before["pid"])
            out = timed_reads(self.mnt / dest.name, offsets, reference)
            after = read_status(self.mnt)
        finally:
            out_stop = stop_live_restore(self.mnt, pid)
            self.rm(dest)
        on_demand = after["bytes_on_demand"] - before["bytes_on_demand"]
        return out | {"ready_s": ready_s, "stopped_ok": out_stop,
                      "running_ok": after["state"] == "running",
                      "done_before_mib": before["bytes_done"] / MiB,
                      "done_after_mib": after["bytes_done"] / MiB,
                      "on_demand_mib": on_demand / MiB,
                      "on_demand_per_read": on_demand / (len(offsets) * DIRTY_BS)}  # fmt: skip

    def qsd_reads(self, top: Path, offsets: list[int], reference: Path) -> dict[str, Any]:
        """QEMU's nearest to a live restore: qemu-storage-daemon serving the qcow2 chain
        (qcow2 over the top link, its backing files opened by QEMU) as a read-only FUSE
        export, timed until it serves; the same reads, each checked."""
        export = self.wd / "j_qsd_export"
        export.touch()
        node = {"driver": "qcow2", "node-name": "top", "read-only": True,
                "file": {"driver": "file", "filename": str(top)}}  # fmt: skip
        spec = {"type": "fuse", "id": "jexp", "node-name": "top", "mountpoint": str(export),
                "writable": False}  # fmt: skip
        t0 = qb.mono()
        try:
            with qb.QSD(str(self.wd), "jchain", [node], extra_args=["--export", json.dumps(spec)]):
                ready_s = (qb.mono() - t0) / 1e9
                if not is_mounted(export):
                    raise RuntimeError("QSD's FUSE export of the chain is not mounted")
                out = timed_reads(export, offsets, reference)
        finally:
            if is_mounted(export):
                subprocess.run(["fusermount3", "-u", "-z", str(export)], check=False)
            export.unlink(missing_ok=True)
        return out | {"ready_s": ready_s}

    # -- (k) crash-safe change tracking ------------------------------------------------------

    def tracking(self, bs: int) -> dict[str, Any]:
        """The writer through an idle mount without a bitmap, then with one."""
        out: dict[str, Any] = {}
        for tag in ("untracked", "tracked"):
            src = self.fresh(f"k_{tag}.raw")
            try:
                if tag == "tracked":
                    run_cowfs("bitmap", "add", str(src), BITMAP).check_returncode()
                with serving_mount(src, self.mnt) as m:
                    with writer(m.live, self.workload(bs), self.wd, f"k_{tag}_{bs}") as w:
                        w.go()
                        out[tag], _ = w.wait()
                    out[f"{tag}_status"] = m.status()["images"][0]["tracking"]
                    out[f"{tag}_unmount_ok"] = m.unmount() == 0
                out[f"{tag}_source_check"] = qb.compare_files(str(src), str(self.expected[bs]))
            finally:
                self.rm(src)
        return out

    def crash_superset(self, pct: float, region: str, quiet: bool) -> dict[str, Any]:
        """(h)'s dirty writes, kill -9 (with `quiet`, once saves have cleared the intent:
        about two save periods): the recovered bitmap vs the daemon's precise one just
        before the kill."""
        src = self.fresh("k_crash.raw")
        period = 1.0
        try:
            run_cowfs("bitmap", "add", str(src), BITMAP).check_returncode()
            opts = ("--intent-region", region, "--save-period", str(period))
            with serving_mount(src, self.mnt, *opts) as m:
                qb.run_workload(str(m.live), self.dirty_workload(pct))
                image = m.status()["images"][0]
                if quiet:
                    cleared = lambda: m.status()["images"][0]["tracking"]["intent_regions"] == 0  # noqa: E731
                    if not wait_for(cleared, 30 * period, POLL_S):
                        raise TimeoutError("the intent was not cleared after the writes")
                    image = m.status()["images"][0]
                truly = next(b["dirty_bytes"] for b in image["bitmaps"] if b["name"] == BITMAP)
                os.kill(m.pid, signal.SIGKILL)
                if not wait_for(lambda: pid_gone(m.pid), 30):
                    raise TimeoutError("the killed daemon did not go")
                wait_for(lambda: not is_mounted(self.mnt), 10)
            row = next(b for b in self.bitmap_rows(src) if b["name"] == BITMAP)
            return {
                "truly_dirty_mib": truly / MiB,
                "recovered_mib": row["dirty_bytes"] / MiB,
                "recovered_ok": bool(row["consistent"]) and row["dirty_bytes"] >= truly,
            }
        finally:
            self.rm(src)

    def bitmap_rows(self, src: Path) -> list[dict[str, Any]]:
        argv = [*COWFS, "bitmap", "list", str(src), "--json"]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    # -- driver ------------------------------------------------------------------------------

    def repetition(self, rep: int) -> dict[str, Any]:
        r: dict[str, Any] = {}
        n = f"rep {rep + 1}/{self.a.repeat}"
        ph = self.a.phases
        timed = phase_timer(r)
        for bs in self.a.bs:
            if "a" in ph:
                with timed("a"):
                    log(f"{n} (a) bs={bs}: QEMU export + backup job at {self.a.speed} B/s")
                    q = self.qemu("fuse,backup", bs, self.a.speed)
                    log(f"{n} (a) bs={bs}: cowfs mount + full backup at {self.a.speed} B/s")
                    r.setdefault("a", {})[bs] = {"qemu": q, "cowfs": self.cowfs_backup(bs)}
            if "b" in ph:
                with timed("b"):
                    log(f"{n} (b) bs={bs}: idle cowfs mount, plain file")
                    b = {"cowfs": self.cowfs_idle(bs), "plain": self.plain(bs)}
                    r.setdefault("b", {})[bs] = b
        if "c" in ph:
            with timed("c"):
                log(f"{n} (c) no writer: QEMU job, cowfs, cp --sparse=always")
                r["c"] = {
                    "qemu": self.qemu("nowriter", self.a.bs[0], 0),
                    "cowfs": self.cowfs_nowriter(),
                    "cp": self.cp(),
                }
        if "d" in ph:
            with timed("d"):
                log(f"{n} (d) 1 TiB sparse source: daemon peak RSS")
                r["d"] = self.rss()
        for pct in self.a.dirty if "e" in ph else []:
            with timed("e"):
                log(f"{n} (e) {pct:g}% dirty: QEMU bitmap + full, writes, incremental job")
                q = self.qemu_incremental(pct)
                log(f"{n} (e) {pct:g}% dirty: cowfs full --bitmap, writes, incremental")
                e = {"qemu": q, "cowfs": self.cowfs_incremental(pct)}
                r.setdefault("e", {})[f"{pct:g}%"] = e
        if "f" in ph:
            with timed("f"):
                log(f"{n} (f) compressed full backup: cowfs --compress, qemu-img convert -c")
                r["f"] = {"cowfs": self.cowfs_compressed(), "qemu_img": self.convert_compressed()}
        for bs in self.a.bs if "g" in ph else []:
            with timed("g"):
                log(f"{n} (g) bs={bs}: {self.a.barriers} backup --sync none + cancel, writer")
                r.setdefault("g", {})[bs] = self.barrier(bs)
        for pct in self.a.dirty if "h" in ph else []:
            with timed("h"):
                log(f"{n} (h) {pct:g}% dirty: QEMU bitmap + full, writes, incremental job")
                q = self.qemu_incremental(pct)
                log(f"{n} (h) {pct:g}% dirty: running mount, full --bitmap, writes, incremental")
                h = {"qemu": q, "cowfs": self.incremental_on_mount(pct)}
                r.setdefault("h", {})[f"{pct:g}%"] = h
        if "i" in ph:
            with timed("i"):
                log(f"{n} (i) a view read under the 64K writer; plain read; QEMU fleecing")
                r["i"] = self.view_read()
        if "j" in ph:
            with timed("j"):
                dirty = ", ".join(f"{p:g}%" for p in self.a.dirty)
                log(f"{n} (j) a chain on a running mount: full qcow2, incrementals of {dirty}")
                r["j"] = self.checksummed_chain(rep)
        for bs in self.a.bs if "k" in ph else []:
            with timed("k"):
                log(f"{n} (k) bs={bs}: idle mount without and with a bitmap")
                r.setdefault("k", {})[bs] = self.tracking(bs)
        for pct in self.a.dirty if "k" in ph else []:
            with timed("k"):
                log(f"{n} (k) {pct:g}% dirty: kill -9, the recovered bitmap")
                r.setdefault("k", {})[f"{pct:g}%"] = {
                    "64M": self.crash_superset(pct, "64M", quiet=False),
                    "1M": self.crash_superset(pct, "1M", quiet=False),
                    "quiet": self.crash_superset(pct, "64M", quiet=True),
                }
        return r


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
    """(j): one plain 64K pread per offset, timed alone; with `reference`, each read is
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


def stop_live_restore(mnt: Path, pid: int) -> bool:
    """End the live restore this bench started on `mnt` (its daemon, by pid): SIGTERM,
    then SIGKILL and a lazy unmount if need be. True if it went by itself."""
    if not pid:
        with suppress(CowfsError, OSError, KeyError, ValueError):
            pid = int(read_status(mnt)["pid"])
    clean = True
    if pid and not pid_gone(pid):
        os.kill(pid, signal.SIGTERM)
        if not wait_for(lambda: pid_gone(pid), 60):
            clean = False
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: pid_gone(pid), 10)
    if is_mounted(mnt) and not wait_for(lambda: not is_mounted(mnt), 5):
        clean = False
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    return clean and bool(pid)


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
    cli = Cli([sys.executable, "-P", "-m", "cowfs"], dict(os.environ, PYTHONPATH=str(where)))
    probe = cli.run([sys.executable, "-P", "-c", "import cowfs; print(cowfs.__file__)"])
    if not probe.stdout.startswith(str(where)):
        raise SystemExit(f"--baseline-rev {rev}: its cowfs does not import ({probe.stderr})")
    return cli


def phase_timer(r: dict[str, Any]) -> Callable[[str], Any]:
    """`with timed(phase):` adds the block's wall time to r["phase_s"][phase]."""

    @contextmanager
    def timed(phase: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            spent = r.setdefault("phase_s", {})
            spent[phase] = round(spent.get(phase, 0) + time.monotonic() - t0, 1)

    return timed


def longest_write(times: list[tuple[int, int]], t0: int, t1: int) -> int:
    """The longest of the writes (start, duration; in start order) that ran at any moment
    in [t0, t1], in ns; 0 if none did."""
    starts = [s for s, _ in times]
    lo = max(bisect.bisect_right(starts, t0) - 1, 0)
    hi = bisect.bisect_left(starts, t1)
    return max((d for s, d in times[lo:hi] if s + d > t0), default=0)


def percentiles(values: list[float]) -> dict[str, Any]:
    """Nearest-rank p50/p99 and the max, as the anchor computes its latencies."""
    v = sorted(values)
    if not v:
        return {}
    return {"p50": qb.pctl(v, 50), "p99": qb.pctl(v, 99), "max": v[-1], "n": len(v)}


def make_huge_sparse(path: Path) -> None:
    """A 1 TiB sparse image with 64 MiB of data in 1 MiB pieces spread over it."""
    with open(path, "wb") as f:
        f.truncate(RSS_SOURCE_SIZE)
    write_spread(path, RSS_SOURCE_SIZE, count=64, seed=7)


def write_spread(path: Path, size: int, count: int, seed: int = 3) -> None:
    """`count` 1 MiB writes at spread, MiB-aligned offsets."""
    data = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        step = size // count
        for i in range(count):
            os.pwrite(fd, data, i * step + (seed * (i + 1) * MiB) % (step - MiB))
        os.fsync(fd)
    finally:
        os.close(fd)


# -- figures, ratios, floors ----------------------------------------------------------------


def _rows(sizes: list[int], dirty: list[float]) -> list[tuple[str, str, str, str, str]]:
    """(label, cowfs key, reference key, unit, floor on the ratio) of the table."""
    rows = []
    for bs in sizes:
        k = f"{bs // 1024}K"
        rows += [
            (f"(a) {k} writes during backup", f"a.{bs}.cowfs.writer.mib_s",
             f"a.{bs}.qemu.backup.writer.mib_s", "MiB/s", ">=1 (vs QEMU)"),
            (f"(a) {k} p99 latency", f"a.{bs}.cowfs.writer.lat_us.p99",
             f"a.{bs}.qemu.backup.writer.lat_us.p99", "us", ""),
            (f"(a) {k} during copy only", f"a.{bs}.cowfs.writer.during_job.mib_s",
             f"a.{bs}.qemu.backup.writer.during_job.mib_s", "MiB/s", ">=1 (vs QEMU)"),
            (f"(b) {k} idle mount vs plain", f"b.{bs}.cowfs.writer.mib_s",
             f"b.{bs}.plain.writer.mib_s", "MiB/s", ""),
            (f"(b) {k} idle p99 vs plain", f"b.{bs}.cowfs.writer.lat_us.p99",
             f"b.{bs}.plain.writer.lat_us.p99", "us", ""),
            (f"(b) {k} idle mount vs QEMU idle", f"b.{bs}.cowfs.writer.mib_s",
             f"a.{bs}.qemu.fuse.writer.mib_s", "MiB/s", ""),
        ]  # fmt: skip
    rows += [
        ("(c) full backup vs QEMU job", "c.cowfs.job_plus_fsync_s",
         "c.qemu.nowriter.job_plus_fsync_s", "s", "<=1"),
        ("(c) full backup vs cp+fsync", "c.cowfs.job_plus_fsync_s", "c.cp.cp_total_s", "s",
         "<=3"),
        ("(c) incl. mount vs cp+fsync", "c.cowfs.with_mount_s", "c.cp.cp_total_s", "s", ""),
        ("(d) RSS 1 TiB top (limit)", "d.top.vm_hwm_mib", "limit", "MiB", "<1"),
        ("(d) RSS 1 TiB full (limit)", "d.full.vm_hwm_mib", "limit", "MiB", "<1"),
    ]  # fmt: skip
    for pct in dirty:
        e = f"e.{pct:g}%"
        p = f"{pct:g}%"
        rows += [
            (f"(e) {p} dirty vs QEMU's dirty", f"{e}.cowfs.dirty_mib",
             f"{e}.qemu.nowriter.dirty_mib", "MiB", ""),
            (f"(e) {p} full qcow2 vs QEMU full", f"{e}.cowfs.full.job_plus_fsync_s",
             f"{e}.qemu.nowriter.full_plus_fsync_s", "s", ""),
            (f"(e) {p} incremental vs QEMU inc", f"{e}.cowfs.inc.job_plus_fsync_s",
             f"{e}.qemu.nowriter.job_plus_fsync_s", "s", ""),
            (f"(e) {p} inc incl. mount vs QEMU", f"{e}.cowfs.inc.with_mount_s",
             f"{e}.qemu.nowriter.job_plus_fsync_s", "s", ""),
            (f"(e) {p} inc vs full (incl. mount)", f"{e}.cowfs.inc.with_mount_s",
             f"{e}.cowfs.full.with_mount_s", "s", ""),
            (f"(e) {p} inc/full: cowfs vs QEMU", f"{e}.cowfs.inc_over_full",
             f"{e}.qemu.nowriter.inc_over_full", "x", ""),
            (f"(e) {p} inc file vs dirty data", f"{e}.cowfs.inc.file_mib",
             f"{e}.cowfs.dirty_mib", "MiB", ""),
        ]  # fmt: skip
    rows += [
        ("(f) compressed vs qemu-img -c", "f.cowfs.job_plus_fsync_s",
         "f.qemu_img.convert_plus_fsync_s", "s", ""),
        ("(f) compr. incl. mount vs -c", "f.cowfs.with_mount_s",
         "f.qemu_img.convert_plus_fsync_s", "s", ""),
        ("(f) compressed size vs qemu-img -c", "f.cowfs.file_mib", "f.qemu_img.file_mib", "MiB",
         ""),
    ]  # fmt: skip
    for bs in sizes:
        g, k = f"g.{bs}", f"{bs // 1024}K"
        rows += [
            (f"(g) {k} barrier p50 (goal 5 ms)", f"{g}.barrier_ms.p50", "goal", "ms", ""),
            (f"(g) {k} barrier p99 (goal 5 ms)", f"{g}.barrier_ms.p99", "goal", "ms", "<1"),
            (f"(g) {k} barrier max (goal 5 ms)", f"{g}.barrier_ms.max", "goal", "ms", ""),
            (f"(g) {k} stall p99 (goal 5 ms)", f"{g}.stall_ms.p99", "goal", "ms", ""),
            (f"(g) {k} p99 backups vs none", f"{g}.writer.lat_us.p99", f"{g}.idle.lat_us.p99",
             "us", ""),
            (f"(g) {k} MiB/s backups vs none", f"{g}.writer.mib_s", f"{g}.idle.mib_s", "MiB/s",
             ""),
        ]  # fmt: skip
    for pct in dirty:
        h, p = f"h.{pct:g}%", f"{pct:g}%"
        rows += [
            (f"(h) {p} dirty vs QEMU's dirty", f"{h}.cowfs.dirty_mib",
             f"{h}.qemu.nowriter.dirty_mib", "MiB", ""),
            (f"(h) {p} full --wait vs QEMU full", f"{h}.cowfs.full.cli_plus_fsync_s",
             f"{h}.qemu.nowriter.full_plus_fsync_s", "s", ""),
            (f"(h) {p} inc --wait vs QEMU inc", f"{h}.cowfs.inc.cli_plus_fsync_s",
             f"{h}.qemu.nowriter.job_plus_fsync_s", "s", ""),
            (f"(h) {p} inc job only vs QEMU inc", f"{h}.cowfs.inc.job_plus_fsync_s",
             f"{h}.qemu.nowriter.job_plus_fsync_s", "s", ""),
            (f"(h) {p} inc vs (e) mount->finish", f"{h}.cowfs.inc.cli_plus_fsync_s",
             f"e.{p}.cowfs.inc.with_mount_s", "s", ""),
        ]  # fmt: skip
    rows += [
        ("(i) view read vs plain read", "i.cowfs.mib_s", "i.plain.mib_s", "MiB/s", ""),
        ("(i) view read vs QEMU fleecing", "i.cowfs.mib_s", "i.qemu.mib_s", "MiB/s", ""),
        ("(i) writer, reading vs not", "i.writer_reading.mib_s", "i.writer_alone.mib_s",
         "MiB/s", ""),
        ("(i) writer vs QEMU's, reading", "i.writer_reading.mib_s",
         "i.qemu.writer_reading.mib_s", "MiB/s", ""),
    ]  # fmt: skip
    rows += [
        ("(j) verify vs check+convert null", "j.cowfs.verify.s", "j.qemu.verify.s", "s", ""),
        ("(j) verify vs check+convert raw", "j.cowfs.verify.s", "j.qemu.verify_file_s", "s",
         ""),
        ("(j) restore raw vs convert raw", "j.cowfs.restore_raw.total_s",
         "j.qemu.convert_raw.total_s", "s", ""),
        ("(j) restore qcow2 vs convert", "j.cowfs.restore_qcow2.total_s",
         "j.qemu.convert_qcow2.total_s", "s", ""),
        ("(j) qcow2 size vs convert", "j.cowfs.restore_qcow2.file_mib",
         "j.qemu.convert_qcow2.file_mib", "MiB", ""),
        ("(j) xxh3 share of full backup", "j.hash.xxh3_s", "j.chain.full.job_plus_fsync_s", "s",
         ""),
        ("(j) sums.data share of full", "j.hash.recording_s", "j.chain.full.job_plus_fsync_s",
         "s", ""),
        ("(j) full backup vs before sums", "j.baseline.new_s", "j.baseline.old_s", "s", ""),
        ("(j) live ready vs QSD export", "j.live.ready_s", "j.qsd.ready_s", "s", ""),
        ("(j) live read p50 vs plain file", "j.live.lat_us.p50", "j.plain.lat_us.p50", "us", ""),
        ("(j) live read p99 vs plain file", "j.live.lat_us.p99", "j.plain.lat_us.p99", "us", ""),
        ("(j) live read p50 vs QSD chain", "j.live.lat_us.p50", "j.qsd.lat_us.p50", "us", ""),
        ("(j) live read p99 vs QSD chain", "j.live.lat_us.p99", "j.qsd.lat_us.p99", "us", ""),
    ]  # fmt: skip
    for bs in sizes:
        k, b = f"k.{bs}", f"{bs // 1024}K"
        rows += [
            (f"(k) {b} tracked vs untracked", f"{k}.tracked.mib_s", f"{k}.untracked.mib_s",
             "MiB/s", ">=0.97"),
            (f"(k) {b} p99 tracked vs untracked", f"{k}.tracked.lat_us.p99",
             f"{k}.untracked.lat_us.p99", "us", ""),
        ]  # fmt: skip
    for pct in dirty:
        k, p = f"k.{pct:g}%", f"{pct:g}%"
        rows += [
            (f"(k) {p} crash, 64M regions", f"{k}.64M.recovered_mib",
             f"{k}.64M.truly_dirty_mib", "MiB", ""),
            (f"(k) {p} crash, 1M regions", f"{k}.1M.recovered_mib",
             f"{k}.1M.truly_dirty_mib", "MiB", ""),
            (f"(k) {p} crash after 2 saves", f"{k}.quiet.recovered_mib",
             f"{k}.quiet.truly_dirty_mib", "MiB", ""),
        ]  # fmt: skip
    return rows


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, bool | int | float):
            out[key] = v
    return out


def medians(reps: list[dict[str, Any]]) -> dict[str, Any]:
    flat = [flatten(r) for r in reps]
    keys = {k for f in flat for k in f}
    out: dict[str, Any] = {}
    for k in sorted(keys):
        vals = [f[k] for f in flat if k in f]
        out[k] = all(vals) if isinstance(vals[0], bool) else statistics.median(vals)
    return out


def floor_ok(ratio: float, floor: str) -> str:
    """'ok' or 'MISSED' for a floor such as '>=1 (vs QEMU)', '<=3' or '<1'; '' if none."""
    if not floor:
        return ""
    spec = floor.split()[0]
    op = spec.rstrip("0123456789.")
    bound = float(spec[len(op) :])
    ok = {">=": ratio >= bound, "<=": ratio <= bound, "<": ratio < bound}[op]
    return "ok" if ok else "MISSED"


def spread(reps: list[dict[str, Any]], key: str, ref_key: str) -> tuple[float, float] | None:
    """(min, max) of the per-repetition ratios of `key` to `ref_key`; None from one ratio."""
    ratios = []
    for f in reps:
        mine, ref = f.get(key), CONSTANT_REFS.get(ref_key, f.get(ref_key))
        if mine is not None and ref:
            ratios.append(mine / ref)
    return (min(ratios), max(ratios)) if len(ratios) > 1 else None


def table(
    med: dict[str, Any], reps: list[dict[str, Any]], sizes: list[int], dirty: list[float]
) -> tuple[list[dict[str, Any]], str]:
    """The table of medians; `reps` (flattened repetitions) give each ratio's spread."""
    rows, lines = [], []
    head = (
        f"{'measure':34} {'cowfs':>9} {'reference':>10} {'ratio':>7} {'spread':>13} "
        f"{'unit':6} floor"
    )
    lines += [head, "-" * len(head)]
    for label, key, ref_key, unit, floor in _rows(sizes, dirty):
        mine = med.get(key)
        ref = CONSTANT_REFS.get(ref_key, med.get(ref_key))
        if mine is None or not ref:
            continue
        ratio = mine / ref
        verdict = floor_ok(ratio, floor)
        lo_hi = spread(reps, key, ref_key)
        rows.append({"measure": label, "cowfs": mine, "reference": ref, "ratio": ratio,
                     "spread": lo_hi, "unit": unit, "floor": floor,
                     "verdict": verdict})  # fmt: skip
        span = f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}" if lo_hi else ""
        lines.append(
            f"{label:34} {mine:9.4g} {ref:10.4g} {ratio:7.3f} {span:>13} {unit:6} {floor} "
            f"{verdict}".rstrip()
        )
    return rows, "\n".join(lines)


def checks(med: dict[str, Any]) -> dict[str, bool]:
    """Every correctness check of the run, by key (medians of booleans are all())."""
    out = {k: v for k, v in med.items() if k.endswith((".equal", ".ok", "_ok"))}
    out |= {k: v == 0 for k, v in med.items() if k.endswith("finish_rc")}
    out |= {k: v for k, v in med.items() if k.endswith(".copied")}
    return out


# -- CLI ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="source image size (default 1G)")
    p.add_argument("--total", default="256M", help="bytes per writer run (default 256M)")
    p.add_argument("--bs", default="64K,4K", help="writer block sizes (default 64K,4K)")
    p.add_argument("--speed", default="100M", help="backup speed limit in (a) (default 100M)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions; medians are reported")
    p.add_argument("--seed", type=int, default=1, help="image seed; the writer uses seed+1000")
    p.add_argument("--workdir", default="/var/tmp", help="parent of the private work directory")
    p.add_argument(
        "--anchors",
        default=str(REPO.parent / "shared" / "anchors"),
        help="directory of qemu_backup.py (default <repo>/../shared/anchors)",
    )
    p.add_argument(
        "--cpus",
        help="pin this process and all it starts (daemons, QSD, writers) to these CPUs, "
        "e.g. 0: on these VMs a FUSE round trip between two CPUs costs ~40 us more "
        "than on one, and the scheduler's choice flips run to run (default: unpinned)",
    )
    p.add_argument("--phases", default=",".join(PHASES), help="phases to run (default a-k)")
    p.add_argument(
        "--dirty", default="1,10", help="(e), (h), (k): percent of the image dirty (default 1,10)"
    )
    p.add_argument(
        "--barriers", type=int, default=20, help="(g): backups started per block size (default 20)"
    )
    p.add_argument(
        "--live-speed", default="20M", help="(j): the live restore's --speed (default 20M)"
    )
    p.add_argument(
        "--baseline-rev",
        metavar="REV",
        help="(j): also time full backups by REV's cowfs (git archive of this repository), "
        "alternating with this tree's, e.g. e7f9d40 (before checksums)",
    )
    p.add_argument("--no-rss", action="store_true", help="skip (d), the 1 TiB memory check")
    p.add_argument(
        "--py-spy", metavar="DIR", help="profile the daemon during (a)/(b)/(e)/(f) into DIR"
    )
    p.add_argument("--json-out", help="also write the JSON result here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--writer-child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    return a


def normalise(a: argparse.Namespace) -> None:
    a.size = qb.parse_size(a.size)
    a.total = qb.parse_size(a.total)
    a.speed = qb.parse_size(a.speed)
    a.live_speed = qb.parse_size(a.live_speed)
    a.bs = [qb.parse_size(s) for s in a.bs.split(",")]
    a.dirty = [float(s) for s in a.dirty.split(",")]
    if not all(0 < d < 100 for d in a.dirty):
        raise SystemExit("--dirty: percentages between 0 and 100")
    if a.barriers < 1:
        raise SystemExit("--barriers: at least 1")
    phases = {s.strip() for s in a.phases.split(",") if s.strip()}
    if not phases <= set(PHASES):
        raise SystemExit(f"--phases: a comma list of {','.join(PHASES)}")
    a.phases = sorted(phases - ({"d"} if a.no_rss else set()))  # a list: the config is JSON
    if a.py_spy:
        Path(a.py_spy).mkdir(parents=True, exist_ok=True)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})  # children inherit it


def main(argv: list[str] | None = None) -> int:
    global qb
    args = parse_args(argv)
    qb = import_anchor(Path(args.anchors))
    if args.writer_child:
        return writer_child(args.writer_child)
    normalise(args)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    base = Path(args.workdir).absolute()
    wd = Path(tempfile.mkdtemp(prefix="cowfs_bench_", dir=base))
    result: dict[str, Any] = {"config": vars(args), "meta": qb.machine_info(str(wd))}
    t0 = time.monotonic()
    try:
        bench = Bench(args, wd)
        bench.prepare()
        reps = [bench.repetition(i) for i in range(args.repeat)]
    finally:
        if args.keep:
            log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    return report(result, reps, args, time.monotonic() - t0)


def report(result: dict[str, Any], reps: list, args: argparse.Namespace, elapsed: float) -> int:
    med = medians(reps)
    rows, text = table(med, [flatten(r) for r in reps], args.bs, args.dirty)
    ok = checks(med)
    result |= {"repeats": reps, "median": med, "ratios": rows, "checks": ok,
               "ok": all(ok.values()), "elapsed_s": round(elapsed, 1)}  # fmt: skip
    result["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    m = result["meta"]
    print(
        f"cowfs bench: size {args.size // MiB} MiB, {args.total // MiB} MiB random writes, "
        f"speed {args.speed // MiB} MiB/s in (a), {args.repeat} repetition(s), medians; "
        f"{m['workdir_fs']['fstype']}, {m['cpus']} cpus (pinned: {args.cpus or 'no'}), "
        f"load {m['loadavg_start'][0]} -> {m['loadavg_end'][0]}, {elapsed:.0f} s"
    )
    print("(b) idle mount = a full backup whose copier has finished, still mounted")
    if "e" in args.phases:
        print("(e) incremental: mount -> finish (+fsync), no writer; QEMU: job (+fsync)")
    if "g" in args.phases:
        print(
            f"(g) {args.barriers} backup --sync none + cancel per repetition under the writer; "
            "barrier = how long it held new writes (status barrier_s); stall = the longest "
            "write during a backup command; none = the same passes, no job"
        )
    if "h" in args.phases:
        print(
            "(h) incremental on a running mount: backup --wait (+fsync) as the user waits, "
            "or the job's elapsed_s (+fsync); QEMU: job (+fsync)"
        )
    if "i" in args.phases:
        print(
            "(i) reading a --sync none view under the 64K writer vs the plain file (no "
            "writer) and QEMU's snapshot-access (same writer); the writer with vs without reader"
        )
        matched = [r["i"]["qemu"]["matches_pit"] for r in reps if "i" in r]
        print(f"(i) QEMU's view equal to the point in time: {matched} (cowfs's is checked)")
    if "j" in args.phases:
        print(
            "(j) a chain (full qcow2 + incrementals of --dirty) on a running mount, page cache "
            "warm (os.sync before each timed command, no drop); verify = `cowfs verify TOP` "
            "vs qemu-img check of each link + `qemu-img convert -n` into null-co (or into a "
            "raw file); restore (+fsync) vs qemu-img convert (+fsync: it does not flush)"
        )
        print(
            "(j) hashing share = XXH3-128 of the image's data clusters in process / the "
            "chain's full backup (job + fsync); 'before sums' = full backups by "
            "--baseline-rev, ABBA"
        )
        print(
            f"(j) {LIVE_READS} 64K preads of distinct clusters in the upper half, right after "
            f"`restore --live --speed {args.live_speed // MiB}M` returns, vs the restored raw "
            "file (page cache) and a read-only QSD FUSE export of the qcow2 chain"
        )
        per_read = [round(r["j"]["live"]["on_demand_per_read"], 2) for r in reps if "j" in r]
        print(f"(j) live restore: bytes restored on demand per 64K read: {per_read}")
    if "k" in args.phases:
        print(
            "(k) writes through an idle mount with a bitmap (intent records, saves) vs none; "
            "crash = the bitmap recovered after kill -9 vs the daemon's precise one"
        )
    print("ratio = cowfs / reference: higher is better for MiB/s, lower for us, ms, s and MiB")
    print("spread = lowest-highest of the per-repetition ratios")
    print(text)
    spent = ", ".join(f"{k[8:]} {v:.0f} s" for k, v in med.items() if k.startswith("phase_s."))
    print(f"time per repetition (median): {spent}")
    bad = [k for k, v in ok.items() if not v]
    print(f"verification: {'PASS' if not bad else 'FAIL ' + ', '.join(bad)} ({len(ok)} checks)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
