"""QEMU's side of every comparison, measured in the same run as cowfs's.

Why here and not in the anchor: the anchor (`../shared/anchors/qemu_backup.py`) is shared
and read-only; this module drives it. Its backup job, FUSE export and incremental job run
as the anchor's own `bench` subprocess with only the phases asked for (`anchor_bench`),
on the run's pristine image, with the same writer, seed and speed limit as cowfs's side.
The rest is QEMU's nearest equivalent of a cowfs command, timed as a user runs it:
`qemu-img convert -c` (compressed copy), `qemu-img check` + `convert` (verify, restore),
qemu-storage-daemon fleecing (a view) and a read-only FUSE export of a qcow2 chain
(a live restore). Nothing here starts cowfs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers.mounting import is_mounted, lazy_unmount

from .anchor import qb
from .harness import DIRTY_BS, MiB, Writer, fsync_seconds, read_all, timed_reads
from .workspace import Bench


def anchor_bench(
    b: Bench, phases: str, bs: int, speed: int, total: int = 0, *extra: str
) -> dict[str, Any]:
    """The anchor's `bench` with `--sync full` unless `extra` says otherwise (later
    options win in argparse); `total` defaults to `--total`."""
    out = b.wd / "qemu.json"
    argv = [sys.executable, str(Path(qb.__file__)), "bench", "--source", str(b.pristine)]
    argv += ["--phases", phases, "--bs", str(bs), "--total", str(total or b.a.total)]
    argv += ["--sync", "full", "--repeat", "1", "--seed", str(b.a.seed), *extra]
    argv += ["--workdir", str(b.wd), "--json-out", str(out), "--quiet"]
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
    rep: dict[str, Any] = result["repeats"][0]
    rep["ok"] = result["ok"]
    return rep


def incremental(b: Bench, pct: float) -> dict[str, Any]:
    """(e), (h): the anchor's bitmap + full (qcow2, as ours), phase-1 writes through its
    FUSE export with no job, then the incremental job with no writer (its `nowriter`)."""
    wl = b.dirty_workload(pct)
    fmt = ("--sync", "incremental", "--target-format", "qcow2")
    q = anchor_bench(b, "nowriter", DIRTY_BS, 0, wl.total, *fmt)
    job = q["nowriter"]
    job["full_plus_fsync_s"] = round(job["full_job"]["job_s"] + job["full_job_fsync_s"], 4)
    job["inc_over_full"] = job["job_plus_fsync_s"] / job["full_plus_fsync_s"]
    job["dirty_mib"] = job["dirty_bytes"] / MiB
    return q


def convert_compressed(b: Bench) -> dict[str, Any]:
    """(f): `qemu-img convert -c` of the pristine image: what a QEMU user runs for a
    compressed copy (QEMU's own backup job with compress=on is a slower way)."""
    dst = b.wd / "convert_c.qcow2"
    argv = [qb.QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2"]
    os.sync()
    try:
        convert_s, _ = qb.timed(qb.run, [*argv, str(b.pristine), str(dst)])
        fsync_s = fsync_seconds(dst)
        out = {
            "convert_s": round(convert_s, 4),
            "convert_plus_fsync_s": round(convert_s + fsync_s, 4),
            "file_mib": dst.stat().st_size / MiB,
            "verify": qb.compare_images(str(dst), str(b.pristine), "qcow2", "raw"),
        }
    finally:
        b.rm(dst)
    return out


def fleecing(b: Bench, wl: Any) -> dict[str, Any]:
    """(i): QEMU's fleecing: copy-before-write into a qcow2 image, read through
    snapshot-access, while the same writer writes through the filter's export."""
    src, store = b.fresh("i_qsrc.raw"), b.wd / "i_qfleece.qcow2"
    live, snap = b.wd / "i_live", b.wd / "i_snap"
    qb.create_target(str(store), b.a.size, "qcow2")
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
            qb.QSD(str(b.wd), "fleece", nodes, "cbw", str(live), extra_args=extra),
            Writer(live, wl, b.wd, "i_qemu", passes=0) as w,
        ):
            w.go()
            res = read_all(snap)
            w.stop()
            res["writer_reading"], _ = w.wait()
    finally:
        b.rm(src, store, live, snap)
    return res


def verify(b: Bench, links: list[Path]) -> dict[str, Any]:
    """(j): QEMU's nearest to `cowfs verify`: `qemu-img check` of every link (structure),
    then `qemu-img convert -n` of the top into a null-co node (reads every allocated
    cluster of the image through the chain, writes nothing)."""
    os.sync()
    t0 = qb.mono()
    checks = [qb.run([qb.QEMU_IMG, "check", "-f", "qcow2", str(p)], check=False) for p in links]
    t1 = qb.mono()
    null = f"driver=null-co,size={b.a.size}"
    argv = [qb.QEMU_IMG, "convert", "-n", "-f", "qcow2", str(links[-1])]
    convert_null = qb.run([*argv, "--target-image-opts", null], check=False)
    t2 = qb.mono()
    return {"check_s": (t1 - t0) / 1e9, "convert_null_s": (t2 - t1) / 1e9,
            "s": (t2 - t0) / 1e9, "check_ok": all(c.returncode == 0 for c in checks),
            "convert_ok": convert_null.returncode == 0}  # fmt: skip


def convert(b: Bench, top: Path, fmt: str, expected: Path) -> dict[str, Any]:
    """(j): `qemu-img convert -O FMT` of the chain (its default cache mode does not flush:
    an fsync of the output afterwards, as (f))."""
    dst = b.wd / f"j_convert.{fmt}"
    argv = [qb.QEMU_IMG, "convert", "-f", "qcow2", "-O", fmt, str(top), str(dst)]
    os.sync()
    try:
        convert_s, _ = qb.timed(qb.run, argv)
        fsync_s = fsync_seconds(dst)
        return {"convert_s": convert_s, "fsync_s": fsync_s, "total_s": convert_s + fsync_s,
                "file_mib": dst.stat().st_size / MiB,
                "verify": qb.compare_images(str(dst), str(expected), fmt, "raw")}  # fmt: skip
    finally:
        b.rm(dst)


def qsd_reads(b: Bench, top: Path, offsets: list[int], reference: Path) -> dict[str, Any]:
    """(j): QEMU's nearest to a live restore: qemu-storage-daemon serving the qcow2 chain
    (qcow2 over the top link, its backing files opened by QEMU) as a read-only FUSE
    export, timed until it serves; the same reads, each checked."""
    export = b.wd / "j_qsd_export"
    export.touch()
    node = {"driver": "qcow2", "node-name": "top", "read-only": True,
            "file": {"driver": "file", "filename": str(top)}}  # fmt: skip
    spec = {"type": "fuse", "id": "jexp", "node-name": "top", "mountpoint": str(export),
            "writable": False}  # fmt: skip
    t0 = qb.mono()
    try:
        with qb.QSD(str(b.wd), "jchain", [node], extra_args=["--export", json.dumps(spec)]):
            ready_s = (qb.mono() - t0) / 1e9
            if not is_mounted(export, None):  # any type: QSD's FUSE export
                raise RuntimeError("QSD's FUSE export of the chain is not mounted")
            out = timed_reads(export, offsets, reference)
    finally:
        lazy_unmount(export, None)
        export.unlink(missing_ok=True)
    return out | {"ready_s": ready_s}
