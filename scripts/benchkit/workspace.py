"""One run's state and the cowfs timings that several phases share.

`Bench` owns the run's private work directory (under `--workdir`; the CLI removes it),
the pristine image every measurement starts from (`make_source_image`, `--seed`), fresh
copies of it and their removal with every file cowfs puts next to an image, the
workloads both sides write (the anchor's, seed+1000 as its `bench` uses, so cowfs and
QEMU write the same offsets and data), and the two ways a cowfs backup is timed: mount ->
finish (`timed_backup`) and `backup --wait` on a running mount (`timed_job`).

It runs no phase itself; `phases` does, one function per phase.
"""

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from cowfs.bitmap import store_path
from cowfs.intent import intent_path
from cowfs.sums import sums_path

from .anchor import qb
from .harness import (
    CURRENT,
    DIRTY_BS,
    PASS_SEED_STEP,
    Cli,
    CowfsMount,
    MiB,
    ServingMount,
    baseline_cli,
    fsync_seconds,
    log,
    py_spy,
    run_cowfs,
)

BITMAP = "bench"
"""The name of the bitmap that the incremental phases anchor and follow."""


def record_of(target: Path) -> dict[str, Any]:
    """The JSON record a finished job wrote next to its target."""
    record: dict[str, Any] = json.loads(Path(str(target) + ".cowfs.json").read_text())
    return record


class Bench:
    """One run: a pristine image, then per repetition every phase of both sides."""

    def __init__(self, args: argparse.Namespace, wd: Path) -> None:
        self.a = args
        self.wd = wd
        self.pristine = wd / "pristine.raw"
        self.mnt = wd / "mnt"
        self.expected: dict[int, Path] = {}
        """Per block size: the pristine image plus the writer's writes of that size."""
        self.baseline: Cli | None = None
        """(j) with --baseline-rev: that revision's cowfs."""

    def rep_name(self, rep: int) -> str:
        return f"rep {rep + 1}/{self.a.repeat}"

    def workload(self, bs: int) -> Any:
        return qb.Workload(self.a.size, bs, self.a.total, "random", self.a.seed + 1000)

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

    def prepare(self) -> None:
        log(f"creating the {self.a.size / MiB:g} MiB source image (seed {self.a.seed})")
        qb.make_source_image(str(self.pristine), self.a.size, self.a.seed)
        if self.a.baseline_rev and "j" in self.a.phases:
            self.baseline = baseline_cli(self.a.baseline_rev, self.wd / "baseline")
        if not {"a", "b", "k", "m"} & set(self.a.phases):
            return  # only (a), (b), (k) and (m) check a source against its expected image
        for bs in self.a.bs:
            self.expected[bs] = self.written(self.wd / f"expected_{bs}.raw", self.workload(bs))

    def fresh(self, name: str) -> Path:
        p = self.wd / name
        qb.sparse_copy(str(self.pristine), str(p))
        os.sync()  # writeback of the copy must not disturb the next measurement
        return p

    def written(self, dst: Path, wl: Any) -> Path:
        """`dst` made the pristine image plus `wl`'s writes: what a source must equal after
        them, and a backup taken after them."""
        qb.sparse_copy(str(self.pristine), str(dst))
        qb.apply_workload(str(dst), wl)
        return dst

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

    def timed_backup(
        self, src: Path, tgt: Path, spy: str | None, *options: str, cli: Cli = CURRENT
    ) -> dict[str, Any]:
        """A backup with no writer: mount, finish at once, fsync the target. `finish`
        returns when the copier is done and the daemon has fsynced and gone, so
        mount -> finish is the job; the extra fsync finds anything still unwritten."""
        t0 = qb.mono()
        with CowfsMount(src, self.mnt, tgt, *options, cli=cli) as m:
            t1 = qb.mono()
            with py_spy(m.pid, self.profile_path(spy) if spy else None):
                rc = m.end("finish")
            t2 = qb.mono()
        fsync_s = fsync_seconds(tgt)
        record = record_of(tgt)
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

    def timed_job(self, m: ServingMount, tgt: Path, *options: str) -> dict[str, Any]:
        """`cowfs backup MP --target TGT ... --wait` timed as a user waits for it (the CLI's
        start and its status polling included), plus an fsync of the target; and the job's
        own time, its `elapsed_s` in status (from its start to complete), plus that fsync."""
        argv = ("backup", str(m.mountpoint), "--target", str(tgt), *options, "--wait")
        cli_s, done = qb.timed(run_cowfs, *argv)
        if not done.stdout.strip():
            raise RuntimeError(f"cowfs backup failed: {done.stderr.strip()}")
        fsync_s = fsync_seconds(tgt)
        job = m.job(int(done.stdout.split()[0]))
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

    def bitmap_rows(self, src: Path) -> list[dict[str, Any]]:
        """`cowfs bitmap list SRC --json`."""
        done = run_cowfs("bitmap", "list", str(src), "--json")
        done.check_returncode()
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def dirty_bytes(self, src: Path) -> int:
        """`cowfs bitmap list`: what the incremental will copy, as QEMU's dirty count."""
        return int(next(b["dirty_bytes"] for b in self.bitmap_rows(src) if b["name"] == BITMAP))
