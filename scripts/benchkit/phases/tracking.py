"""(k): crash-safe change tracking (issue 9): what it costs a writer, what a crash leaves.

The writes of (b) through a mount with no job, once with no bitmap (no tracking) and
once with one (every write marks it, the first write into a region waits for its
intent record, saves every 10 s), back to back in each repetition. Then (h)'s dirty
writes through a mount with a bitmap and kill -9 right after them (default intent
regions of 64 MiB, and 1 MiB ones) or once saves cleared the intent: the recovered
bitmap (`cowfs bitmap list` after the crash) against the clusters truly written (the
daemon's own bitmap just before the kill). The incremental on a running mount with
tracking on is (h).
"""

import os
import signal
from typing import Any

from helpers.mounting import is_mounted, pid_gone, wait_for

from ..anchor import qb
from ..harness import (
    POLL_S,
    MiB,
    ServingMount,
    log,
    run_cowfs,
    run_writer,
)
from ..workspace import BITMAP, Bench


def tracking_and_crash(b: Bench, rep: int, item: None) -> dict[str, Any]:
    """Per block size the writer without and with a bitmap, then per dirty percentage
    the bitmaps recovered after kill -9."""
    n = b.rep_name(rep)
    out: dict[str, Any] = {}
    for bs in b.a.bs:
        log(f"{n} (k) bs={bs}: idle mount without and with a bitmap")
        out[bs] = tracking(b, bs)
    for pct in b.a.dirty:
        log(f"{n} (k) {pct:g}% dirty: kill -9, the recovered bitmap")
        out[f"{pct:g}%"] = {
            "64M": crash_superset(b, pct, "64M", quiet=False),
            "1M": crash_superset(b, pct, "1M", quiet=False),
            "quiet": crash_superset(b, pct, "64M", quiet=True),
        }
    return out


def tracking(b: Bench, bs: int) -> dict[str, Any]:
    """The writer through an idle mount without a bitmap, then with one."""
    out: dict[str, Any] = {}
    for tag in ("untracked", "tracked"):
        src = b.fresh(f"k_{tag}.raw")
        try:
            if tag == "tracked":
                run_cowfs("bitmap", "add", str(src), BITMAP).check_returncode()
            with ServingMount(src, b.mnt) as m:
                out[tag] = run_writer(m.live, b.workload(bs), b.wd, f"k_{tag}_{bs}")
                out[f"{tag}_status"] = m.poll()["images"][0]["tracking"]
                out[f"{tag}_unmount_ok"] = m.end("unmount") == 0
            out[f"{tag}_source_check"] = qb.compare_files(str(src), str(b.expected[bs]))
        finally:
            b.rm(src)
    return out


def crash_superset(b: Bench, pct: float, region: str, quiet: bool) -> dict[str, Any]:
    """(h)'s dirty writes, kill -9 (with `quiet`, once saves have cleared the intent:
    about two save periods): the recovered bitmap vs the daemon's precise one just
    before the kill."""
    src = b.fresh("k_crash.raw")
    period = 1.0
    try:
        run_cowfs("bitmap", "add", str(src), BITMAP).check_returncode()
        opts = ("--intent-region", region, "--save-period", str(period))
        with ServingMount(src, b.mnt, *opts) as m:
            qb.run_workload(str(m.live), b.dirty_workload(pct))
            image = m.poll()["images"][0]
            if quiet:
                cleared = lambda: m.poll()["images"][0]["tracking"]["intent_regions"] == 0  # noqa: E731
                if not wait_for(cleared, 30 * period, POLL_S):
                    raise TimeoutError("the intent was not cleared after the writes")
                image = m.poll()["images"][0]
            truly = next(x["dirty_bytes"] for x in image["bitmaps"] if x["name"] == BITMAP)
            os.kill(m.pid, signal.SIGKILL)
            if not wait_for(lambda: pid_gone(m.pid), 30):
                raise TimeoutError("the killed daemon did not go")
            wait_for(lambda: not is_mounted(b.mnt), 10)
        row = next(r for r in b.bitmap_rows(src) if r["name"] == BITMAP)
        return {
            "truly_dirty_mib": truly / MiB,
            "recovered_mib": row["dirty_bytes"] / MiB,
            "recovered_ok": bool(row["consistent"]) and row["dirty_bytes"] >= truly,
        }
    finally:
        b.rm(src)
