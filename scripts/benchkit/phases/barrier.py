"""(g): the barrier of `cowfs backup` under a running writer.

On a mount without --target the writer (each block size separately) writes in passes of
`BARRIER_PASS` through the live file while `--barriers` `cowfs backup --sync none` jobs
start one after the other, each cancelled (the mount keeps serving) before the next. Per
job: `barrier_s` from `cowfs status --json` -- how long the barrier that fixed its point
in time held new guest writes -- and the longest write that overlapped its `backup`
command (what the guest felt); then the writer against the very same passes through a
mount of a fresh copy that runs no job. The goal (p99 < 5 ms) is shown, not asserted.
"""

import bisect
import json
import time
from typing import Any

from ..anchor import qb
from ..harness import MiB, ServingMount, Writer, log, run_cowfs, run_writer
from ..workspace import Bench

BARRIER_GOAL_MS = 5.0
"""The issue's goal for the barrier's p99; the table shows it, nothing asserts it."""
BARRIER_PASS = 32 * MiB
"""Bytes per writer pass. The writer stops only between passes, so a short pass ends
the run soon after the last barrier (a 4K pass through the mount takes a few seconds)."""
BARRIER_LEAD_S = 0.5
"""The writer writes this long before the first barrier, so none meets a cold start."""


def barrier(b: Bench, rep: int, bs: int) -> dict[str, Any]:
    """(g) at one block size: the jobs under the writer's passes, then the same passes
    with no job; then the jobs again on a `--writeback-cache` mount ("wb"), whose
    barrier also fences the kernel's cache of the writer's buffered writes."""
    log(f"{b.rep_name(rep)} (g) bs={bs}: {b.a.barriers} backup --sync none + cancel, writer")
    wl = qb.Workload(b.a.size, bs, BARRIER_PASS, "random", b.a.seed + 1000)
    out = under_barriers(b, bs, wl)
    src = b.fresh("barrier_idle.raw")
    try:
        with ServingMount(src, b.mnt) as m:
            passes = out["writer"]["passes"]
            out["idle"] = run_writer(m.live, wl, b.wd, f"g0_{bs}", passes)
            out["idle_unmount_ok"] = m.end("unmount") == 0
    finally:
        b.rm(src)
    log(f"{b.rep_name(rep)} (g) bs={bs}: the same on a --writeback-cache mount")
    out["wb"] = under_barriers(b, bs, wl, "--writeback-cache")
    return out


def under_barriers(b: Bench, bs: int, wl: Any, *mount: str) -> dict[str, Any]:
    """The jobs started and cancelled under the writer's passes, with what each barrier
    held and what the writer felt."""
    src = b.fresh("barrier_src.raw")
    out: dict[str, Any] = {}
    try:
        with ServingMount(src, b.mnt, *mount) as m:
            with Writer(m.live, wl, b.wd, f"g_{bs}", passes=0) as w:
                w.go()
                cmds = start_and_cancel(b, m, w)
                w.stop()
                out["writer"], times = w.wait()
            st = json.loads(run_cowfs("status", str(m.mountpoint), "--json").stdout)
            out["unmount_ok"] = m.end("unmount") == 0
    finally:
        b.rm(src)
    jobs = {j["id"]: j for j in st["jobs"]}
    for c in cmds:
        job = jobs.get(c["id"], {})
        barrier_s = job.get("barrier_s")
        c["barrier_ms"] = None if barrier_s is None else round(barrier_s * 1e3, 3)
        c["state"] = job.get("state")
        c["stall_ms"] = round(longest_write(times, c.pop("t0"), c.pop("t1")) / 1e6, 3)
    out["jobs"] = cmds
    out["jobs_ok"] = len(cmds) == b.a.barriers and all(
        c["state"] == "cancelled" and c["barrier_ms"] is not None and not c["cancel_rc"]
        for c in cmds
    )
    for key in ("barrier_ms", "stall_ms", "cmd_ms"):
        out[key] = percentiles([c[key] for c in cmds if c[key] is not None])
    return out


def start_and_cancel(b: Bench, m: ServingMount, w: Writer) -> list[dict[str, Any]]:
    """Start and cancel the jobs while the writer writes; each with its command's
    monotonic window (t0, t1) and wall time."""
    cmds = []
    time.sleep(BARRIER_LEAD_S)
    for i in range(b.a.barriers):
        if w.done():
            raise RuntimeError("the writer ended before the last barrier")
        tgt = b.wd / f"barrier_{i}.raw"
        t0 = qb.mono()
        done = run_cowfs("backup", str(m.mountpoint), "--sync", "none", "--target", str(tgt))
        t1 = qb.mono()
        if done.returncode:
            raise RuntimeError(f"cowfs backup failed: {done.stderr.strip()}")
        job_id = int(done.stdout.split()[0])
        cancel = run_cowfs("cancel", str(m.mountpoint), str(job_id))
        cmds.append({"id": job_id, "t0": t0, "t1": t1, "cmd_ms": round((t1 - t0) / 1e6, 3),
                     "cancel_rc": cancel.returncode})  # fmt: skip
        b.rm(tgt)
    return cmds


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
