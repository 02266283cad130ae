"""(c) to (f) and (h): whole backup jobs with no writer, and the daemon's memory.

(c) a full backup, mount -> finish (+fsync), against QEMU's job and `cp --sparse=always`;
(d) the daemon's peak RSS on a 1 TiB sparse source; (e) incrementals of a partly dirty
image, mount -> finish, against QEMU's incremental job of the very same dirty set; (f) a
compressed full backup against `qemu-img convert -c`; (h) the incremental of (e) on a
mount that stays mounted (`backup --wait`). Every backup is checked against the image
as it was at its point in time.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.mounting import wait_for

from ..anchor import qb
from ..harness import POLL_S, CowfsMount, MiB, ServingMount, fsync_seconds, log
from ..qemu import anchor_bench, convert_compressed
from ..qemu import incremental as qemu_incremental
from ..workspace import BITMAP, Bench

RSS_SOURCE_SIZE = 1 << 40
RSS_LIMIT_MIB = 100
"""(d): the daemon's peak RSS must stay below this on a 1 TiB sparse source."""


# -- (c) full backup with no writer -----------------------------------------------------


def no_writer(b: Bench, rep: int, item: None) -> dict[str, Any]:
    """(c): QEMU's job, cowfs's full backup, `cp --sparse=always`."""
    log(f"{b.rep_name(rep)} (c) no writer: QEMU job, cowfs, cp --sparse=always")
    return {"qemu": anchor_bench(b, "nowriter", b.a.bs[0], 0), "cowfs": cowfs_nowriter(b),
            "cp": cp(b)}  # fmt: skip


def cowfs_nowriter(b: Bench) -> dict[str, Any]:
    src, tgt = b.fresh("nowriter_src.raw"), b.wd / "nowriter_tgt.raw"
    out = b.timed_backup(src, tgt, None, "--sync", "full")
    out["verify"] = qb.compare_files(str(tgt), str(b.pristine))
    b.rm(src, tgt)
    return out


def cp(b: Bench) -> dict[str, Any]:
    dst = b.wd / "cp_target.raw"
    os.sync()
    cp_s, _ = qb.timed(qb.sparse_copy, str(b.pristine), str(dst))
    fsync_s = fsync_seconds(dst)
    b.rm(dst)
    return {"cp_s": round(cp_s, 4), "cp_total_s": round(cp_s + fsync_s, 4)}


# -- (d) memory on a 1 TiB sparse source ------------------------------------------------


def memory(b: Bench, rep: int, item: None) -> dict[str, Any]:
    """(d): sync top (writes through the mount, copier done, finish), then sync full
    (mount, status, cancel)."""
    log(f"{b.rep_name(rep)} (d) 1 TiB sparse source: daemon peak RSS")
    src, tgt = b.wd / "huge.raw", b.wd / "huge_tgt.raw"
    make_huge_sparse(src)
    out: dict[str, Any] = {}
    try:
        out["top"] = rss(b, src, tgt, "top")
        b.rm(tgt)
        out["full"] = rss(b, src, tgt, "full")
    finally:
        b.rm(src, tgt)
    return out


def rss(b: Bench, src: Path, tgt: Path, sync: str) -> dict[str, Any]:
    """The daemon's VmHWM and VmRSS on `src`: with `--sync top` after writes through the
    mount and the copier done, then finished; with `--sync full` at once, then cancelled."""
    t0 = qb.mono()
    with CowfsMount(src, b.mnt, tgt, "--sync", sync) as m:
        out: dict[str, Any] = {"mount_s": round((qb.mono() - t0) / 1e9, 3)}
        if sync == "top":
            write_spread(m.live, RSS_SOURCE_SIZE, count=64)
            out["copied"] = wait_for(m.copied, 300, POLL_S)
        out["bytes_total"] = m.poll()["bytes_total"]
        out["vm_hwm_mib"] = round(m.vm("VmHWM") / MiB, 1)
        out["vm_rss_mib"] = round(m.vm("VmRSS") / MiB, 1)
        if sync == "top":
            out["finish_rc"] = m.end("finish")
        else:
            out["cancel_rc"] = m.end("cancel")
    return out


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


# -- (e) and (h): incrementals of a partly dirty image ----------------------------------


def incremental(b: Bench, rep: int, pct: float) -> dict[str, Any]:
    """(e) at one dirty percentage: mount -> finish, against QEMU's incremental job."""
    return against_qemu(b, rep, "e", pct, "cowfs full --bitmap, writes, incremental",
                        cowfs_incremental)  # fmt: skip


def incremental_on_mount(b: Bench, rep: int, pct: float) -> dict[str, Any]:
    """(h) at one dirty percentage: on a running mount, against QEMU's incremental job."""
    return against_qemu(b, rep, "h", pct, "running mount, full --bitmap, writes, incremental",
                        cowfs_incremental_on_mount)  # fmt: skip


def against_qemu(
    b: Bench,
    rep: int,
    phase: str,
    pct: float,
    what: str,
    cowfs: Callable[[Bench, float], dict[str, Any]],
) -> dict[str, Any]:
    """QEMU's bitmap + full, writes and incremental job of `pct` % dirty, then cowfs's
    (`cowfs`, described by `what`) of the very same dirty set."""
    n = b.rep_name(rep)
    log(f"{n} ({phase}) {pct:g}% dirty: QEMU bitmap + full, writes, incremental job")
    q = qemu_incremental(b, pct)
    log(f"{n} ({phase}) {pct:g}% dirty: {what}")
    return {"qemu": q, "cowfs": cowfs(b, pct)}


def cowfs_incremental(b: Bench, pct: float) -> dict[str, Any]:
    """(e): a full qcow2 backup anchoring the bitmap, the dirty writes through a `--sync
    none` mount (it copies only what they overwrite, and its end stores the bitmap
    consistent), then the incremental with `--backing` the full."""
    src = b.fresh("inc_src.raw")
    full, inc = b.wd / "inc_full.qcow2", b.wd / "inc_inc.qcow2"
    junk, expected = b.wd / "inc_dirtying.raw", b.wd / "inc_expected.raw"
    tag = f"e_{pct:g}"
    out: dict[str, Any] = {}
    try:
        out["full"] = b.timed_backup(src, full, f"{tag}_full", "--bitmap", BITMAP)
        wl = b.dirty_workload(pct)
        with CowfsMount(src, b.mnt, junk, "--sync", "none") as m:
            out["dirty_writer"] = qb.run_workload(str(m.live), wl)
            out["dirty_finish_rc"] = m.end("finish")
        out["dirty_mib"] = b.dirty_bytes(src) / MiB
        os.sync()  # the writes' writeback must not land in the incremental's window
        inc_opts = ("--sync", "incremental", "--bitmap", BITMAP, "--backing", str(full))
        out["inc"] = b.timed_backup(src, inc, f"{tag}_inc", *inc_opts)
        out["inc"]["file_mib"] = inc.stat().st_size / MiB
        out["inc_over_full"] = out["inc"]["with_mount_s"] / out["full"]["with_mount_s"]
        out |= incremental_checks(b, src, full, inc, b.written(expected, wl))
    finally:
        b.rm(src, full, inc, junk, expected)
    return out


def cowfs_incremental_on_mount(b: Bench, pct: float) -> dict[str, Any]:
    """(h): one mount without --target: a full qcow2 backup anchoring the bitmap, (e)'s
    dirty writes through the live file, the incremental with `--backing` the full, unmount."""
    src = b.fresh("hinc_src.raw")
    full, inc = b.wd / "hinc_full.qcow2", b.wd / "hinc_inc.qcow2"
    expected = b.wd / "hinc_expected.raw"
    wl = b.dirty_workload(pct)
    out: dict[str, Any] = {}
    try:
        with ServingMount(src, b.mnt) as m:
            out["full"] = b.timed_job(m, full, "--bitmap", BITMAP)
            out["dirty_writer"] = qb.run_workload(str(m.live), wl)
            out["dirty_mib"] = b.dirty_bytes(src) / MiB
            os.sync()  # the writes' writeback must not land in the incremental's window
            inc_opts = ("--sync", "incremental", "--bitmap", BITMAP, "--backing", str(full))
            out["inc"] = b.timed_job(m, inc, *inc_opts)
            out["inc"]["file_mib"] = inc.stat().st_size / MiB
            out["unmount_ok"] = m.end("unmount") == 0
        out |= incremental_checks(b, src, full, inc, b.written(expected, wl))
    finally:
        b.rm(src, full, inc, expected)
    return out


def incremental_checks(
    b: Bench, src: Path, full: Path, inc: Path, expected: Path
) -> dict[str, Any]:
    """The full backup equal to the pristine image; the incremental (over it) and the
    source equal to `expected`, the source as it was at the incremental's point in time."""
    return {
        "verify_full": qb.compare_images(str(full), str(b.pristine), "qcow2", "raw"),
        "verify": qb.compare_images(str(inc), str(expected), "qcow2", "raw"),
        "source_check": qb.compare_files(str(src), str(expected)),
    }


# -- (f) compressed full backup ---------------------------------------------------------


def compressed(b: Bench, rep: int, item: None) -> dict[str, Any]:
    """(f): `--compress` into qcow2 against `qemu-img convert -c`."""
    log(f"{b.rep_name(rep)} (f) compressed full backup: cowfs --compress, qemu-img convert -c")
    return {"cowfs": cowfs_compressed(b), "qemu_img": convert_compressed(b)}


def cowfs_compressed(b: Bench) -> dict[str, Any]:
    src, tgt = b.fresh("comp_src.raw"), b.wd / "comp_tgt.qcow2"
    try:
        out = b.timed_backup(src, tgt, "f", "--compress")
        out["file_mib"] = tgt.stat().st_size / MiB
        out["verify"] = qb.compare_images(str(tgt), str(b.pristine), "qcow2", "raw")
    finally:
        b.rm(src, tgt)
    return out
