"""(j): a checksummed backup chain read back -- verify, restore, live restore -- against QEMU.

A chain is built as in (h) on one running mount: a full qcow2 backup anchoring a bitmap,
then per `--dirty` percentage the dirty writes (other offsets for each link) and an
incremental over the link before. It is read back with a warm page cache (os.sync before
each timed command, no drop): `cowfs verify TOP` against `qemu-img check` of every link
plus `qemu-img convert -n` into null-co (or into a raw file); `cowfs restore` against
`qemu-img convert`, raw and qcow2. Every output must equal the source as it was at the
top's point in time. Also what the checksums cost a full backup (XXH3-128 in process;
with `--baseline-rev`, full backups by that revision and this tree, ABBA), and `LIVE_READS`
64K reads of clusters a live restore has not restored yet, against the restored file and
a read-only QSD export of the chain.
"""

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import xxhash

from cowfs.control import read_status
from cowfs.sums import Checksums

from .. import qemu
from ..anchor import qb
from ..harness import (
    CURRENT,
    DIRTY_BS,
    MiB,
    ServingMount,
    fsync_seconds,
    log,
    run_cowfs,
    stop_live_restore,
    timed_reads,
)
from ..workspace import BITMAP, Bench, record_of

LIVE_READS = 1000
"""64K reads per side of a live restore's unrestored clusters."""
LIVE_SPACING = 4
"""The reads' clusters are at least this many clusters apart (FUSE readahead: 128K)."""


def checksummed_chain(b: Bench, rep: int, item: None) -> dict[str, Any]:
    """A full qcow2 backup and one incremental per `--dirty` percentage on one running
    mount (as (h)); what hashing costs the full; then the chain read back by cowfs and
    by QEMU's nearest equivalents: verify, restore raw and qcow2, and 64K reads of a
    live restore's unrestored clusters."""
    dirty = ", ".join(f"{p:g}%" for p in b.a.dirty)
    n = f"{b.rep_name(rep)} (j)"
    log(f"{n} a chain on a running mount: full qcow2, incrementals of {dirty}")
    src = b.fresh("j_src.raw")
    links = [b.wd / "j_full.qcow2"]
    links += [b.wd / f"j_inc{i + 1}.qcow2" for i in range(len(b.a.dirty))]
    top, expected, restored = links[-1], b.wd / "j_expected.raw", b.wd / "j_restored.raw"
    out: dict[str, Any] = {"qemu": {}, "cowfs": {}}
    try:
        out["chain"] = chain(b, src, links, expected)
        log(f"{n} XXH3-128 of the image's data clusters, in process")
        out["hash"] = hash_cost(b)
        if b.baseline is not None:
            log(f"{n} full backups: {b.a.baseline_rev} (no checksums) vs this tree, ABBA")
            out["baseline"] = baseline_full(b, rep)
        log(f"{n} qemu-img check of each link + convert to null-co; cowfs verify")
        out["qemu"]["verify"] = qemu.verify(b, links)
        out["cowfs"]["verify"] = cowfs_verify(top)
        for fmt in ("raw", "qcow2"):
            log(f"{n} qemu-img convert -O {fmt}; cowfs restore --format {fmt}")
            out["qemu"][f"convert_{fmt}"] = qemu.convert(b, top, fmt, expected)
            dst = restored if fmt == "raw" else b.wd / "j_restored.qcow2"
            try:
                out["cowfs"][f"restore_{fmt}"] = cowfs_restore(top, dst, fmt, expected)
            finally:
                if fmt != "raw":
                    b.rm(dst)
        q = out["qemu"]
        q["verify_file_s"] = q["verify"]["check_s"] + q["convert_raw"]["convert_s"]
        log(f"{n} 64K reads: the restored file, a live restore at {b.a.live_speed} B/s, QSD")
        offsets = read_offsets(b)
        out["plain"] = timed_reads(restored, offsets, None)
        out["live"] = live_reads(b, top, offsets, restored)
        out["qsd"] = qemu.qsd_reads(b, top, offsets, restored)
    finally:
        b.rm(src, *links, expected, restored)
    return out


def chain(b: Bench, src: Path, links: list[Path], expected: Path) -> dict[str, Any]:
    """The chain's backups on one running mount (timed as (h)'s); `expected` becomes
    the source at the top link's point in time."""
    out: dict[str, Any] = {}
    qb.sparse_copy(str(b.pristine), str(expected))
    with ServingMount(src, b.mnt) as m:
        out["full"] = b.timed_job(m, links[0], "--bitmap", BITMAP)
        for i, pct in enumerate(b.a.dirty):
            wl = b.dirty_workload(pct, link=i)
            qb.run_workload(str(m.live), wl)
            qb.apply_workload(str(expected), wl)
            os.sync()  # the writes' writeback must not land in the incremental's window
            opts = ("--sync", "incremental", "--bitmap", BITMAP, "--backing", str(links[i]))
            out[f"inc{i + 1}"] = b.timed_job(m, links[i + 1], *opts)
            out[f"inc{i + 1}"]["file_mib"] = links[i + 1].stat().st_size / MiB
        out["unmount_ok"] = m.end("unmount") == 0
    out["full"]["file_mib"] = links[0].stat().st_size / MiB
    out["source_check"] = qb.compare_files(str(src), str(expected))
    return out


def hash_cost(b: Bench) -> dict[str, Any]:
    """What the checksums cost a full backup, in process: the image read once (page
    cache, not timed), then its non-zero 64K clusters (the ones a job writes as data,
    and so hashes) hashed per 1 MiB read, as the copier does: xxh3_128_digest alone,
    and `Checksums.data` (the digest stored in the table, what `Recording` runs)."""
    cs = DIRTY_BS
    zero = bytes(cs)
    sums = Checksums(b.a.size, cs)
    buf = bytearray(MiB)
    view = memoryview(buf)
    xxh_ns = rec_ns = clusters = 0
    with open(b.pristine, "rb", buffering=0) as f:
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


def baseline_full(b: Bench, rep: int) -> dict[str, Any]:
    """Full qcow2 backups with no writer (mount -> finish, +fsync, as (c)) by
    `--baseline-rev`'s code and by this tree's, alternating ABBA (BAAB in odd
    repetitions); each side's mean. The records tell the two apart: only this tree's
    names a checksum file."""
    order = ["old", "new", "new", "old"] if rep % 2 == 0 else ["new", "old", "old", "new"]
    times: dict[str, list[float]] = {"old": [], "new": []}
    ok = True
    for which in order:
        src, tgt = b.fresh("j_ab_src.raw"), b.wd / "j_ab_full.qcow2"
        try:
            assert b.baseline is not None
            cli = b.baseline if which == "old" else CURRENT
            res = b.timed_backup(src, tgt, None, "--sync", "full", cli=cli)
            sums = record_of(tgt).get("checksums") is not None
            ok = ok and res["finish_rc"] == 0 and sums == (which == "new")
            times[which].append(res["job_plus_fsync_s"])
        finally:
            b.rm(src, tgt)
    return {"old_s": statistics.mean(times["old"]), "new_s": statistics.mean(times["new"]),
            "old_runs": times["old"], "new_runs": times["new"], "runs_ok": ok}  # fmt: skip


def cowfs_verify(top: Path) -> dict[str, Any]:
    os.sync()
    seconds, done = qb.timed(run_cowfs, "verify", str(top))
    ok = done.returncode == 0 and done.stdout.startswith("verify: ok")
    return {"s": seconds, "verify_ok": ok}


def cowfs_restore(top: Path, dst: Path, fmt: str, expected: Path) -> dict[str, Any]:
    """`cowfs restore TOP DST --format FMT` (it fsyncs DST before it returns; the fsync
    after it, as after qemu-img, finds nothing left)."""
    os.sync()
    restore_s, done = qb.timed(run_cowfs, "restore", str(top), str(dst), "--format", fmt)
    if done.returncode:
        raise RuntimeError(f"cowfs restore failed: {done.stdout.strip()} {done.stderr.strip()}")
    fsync_s = fsync_seconds(dst)
    out = {"restore_s": restore_s, "fsync_s": fsync_s, "total_s": restore_s + fsync_s,
           "file_mib": dst.stat().st_size / MiB,
           "verify": qb.compare_images(str(dst), str(expected), fmt, "raw")}  # fmt: skip
    if fmt == "qcow2":
        check = qb.run([qb.QEMU_IMG, "check", "-f", "qcow2", str(dst)], check=False)
        out["qemu_img_check_ok"] = check.returncode == 0
    return out


def read_offsets(b: Bench) -> list[int]:
    """`LIVE_READS` distinct 64K clusters of the image's upper half, `LIVE_SPACING`
    clusters apart at least (the kernel's readahead after one never brings in
    another), in random order: a live restore's copier fills from the start, and at
    `--live-speed` it does not reach the upper half during the reads."""
    count = b.a.size // DIRTY_BS // LIVE_SPACING
    slots = range(count // 2, count)
    picks = random.Random(b.a.seed + 2000).sample(slots, min(LIVE_READS, len(slots)))
    return [p * LIVE_SPACING * DIRTY_BS for p in picks]


def live_reads(b: Bench, top: Path, offsets: list[int], reference: Path) -> dict[str, Any]:
    """`cowfs restore TOP DEST --live MP --speed --live-speed`, timed until it returns
    (the file served), then the reads through MP/<name of DEST>, each checked against
    the restored file. Stopped with SIGTERM (the daemon stops its copier, saves its map
    and unmounts; DEST stays resumable): `cowfs unmount` would wait for the whole copy."""
    dest = b.wd / "j_live.raw"
    b.mnt.mkdir(exist_ok=True)
    speed = str(b.a.live_speed)
    pid = 0
    os.sync()
    argv = ("restore", str(top), str(dest), "--live", str(b.mnt), "--speed", speed)
    ready_s, done = qb.timed(run_cowfs, *argv)
    try:
        if done.returncode:
            raise RuntimeError(f"restore --live failed: {done.stdout} {done.stderr.strip()}")
        before = read_status(b.mnt)
        pid = int(before["pid"])
        out = timed_reads(b.mnt / dest.name, offsets, reference)
        after = read_status(b.mnt)
    finally:
        out_stop = stop_live_restore(b.mnt, pid)
        b.rm(dest)
    on_demand = after["bytes_on_demand"] - before["bytes_on_demand"]
    return out | {"ready_s": ready_s, "stopped_ok": out_stop,
                  "running_ok": after["state"] == "running",
                  "done_before_mib": before["bytes_done"] / MiB,
                  "done_after_mib": after["bytes_done"] / MiB,
                  "on_demand_mib": on_demand / MiB,
                  "on_demand_per_read": on_demand / (len(offsets) * DIRTY_BS)}  # fmt: skip
