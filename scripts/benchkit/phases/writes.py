"""(a) and (b): the guest's writes through a mount, against QEMU's FUSE export and the plain file.

(a) writes during a rate-limited full backup (`--speed`), against the same writes through
QEMU's export during its backup job at the same speed; (b) the same writes through an idle
mount -- a full backup whose copier has finished, still mounted, so every write still asks
the done bitmap -- against the plain file. Both on a default mount and on one with
`--writeback-cache` ("wb"), where the buffered writer's writes return from the kernel's
cache and reach the daemon in the background. Each backup must equal the pristine image,
and each source the pristine image plus the writes.
"""

import os
import time
from pathlib import Path
from typing import Any

from helpers.mounting import wait_for

from ..anchor import qb
from ..harness import POLL_S, CowfsMount, Writer, log, py_spy, run_writer
from ..qemu import anchor_bench
from ..workspace import Bench

WRITEBACK = "--writeback-cache"


def during_backup(b: Bench, rep: int, bs: int) -> dict[str, Any]:
    """(a) at one block size: QEMU's export + backup job, then cowfs's mount + full backup."""
    n = b.rep_name(rep)
    log(f"{n} (a) bs={bs}: QEMU export + backup job at {b.a.speed} B/s")
    q = anchor_bench(b, "fuse,backup", bs, b.a.speed)
    log(f"{n} (a) bs={bs}: cowfs mount + full backup at {b.a.speed} B/s")
    out = {"qemu": q, "cowfs": cowfs_backup(b, bs)}
    log(f"{n} (a) bs={bs}: the same on a --writeback-cache mount")
    return out | {"cowfs_wb": cowfs_backup(b, bs, WRITEBACK)}


def idle(b: Bench, rep: int, bs: int) -> dict[str, Any]:
    """(b) at one block size: an idle cowfs mount, then the plain file."""
    log(f"{b.rep_name(rep)} (b) bs={bs}: idle cowfs mount, plain file, idle --writeback-cache")
    return {
        "cowfs": cowfs_idle(b, bs),
        "plain": plain(b, bs),
        "cowfs_wb": cowfs_idle(b, bs, WRITEBACK),
    }


def cowfs_backup(b: Bench, bs: int, *mount: str) -> dict[str, Any]:
    src, tgt = b.fresh("cowfs_src.raw"), b.wd / "cowfs_tgt.raw"
    wl = b.workload(bs)
    speed = ("--speed", str(b.a.speed))
    with (
        Writer(b.mnt / src.name, wl, b.wd, f"cowfs_{bs}") as w,
        CowfsMount(src, b.mnt, tgt, "--sync", "full", *speed, *mount) as m,
    ):
        at_go = m.poll()["bytes_done"]
        with py_spy(m.pid, b.profile_path(f"a_{bs}{'_wb' if mount else ''}")):
            w.go()
            t_copied = wait_copied(m, w)
        wres, times = w.wait()
        st = m.poll()
        rc = m.end("finish")
    wres["during_job"] = qb.split_writer_by_time(times, t_copied, bs)
    out = {
        "writer": wres,
        "bytes_done_at_go": at_go,
        "bytes_cbw": st["bytes_cbw"],
        "bytes_copier": st["bytes_copier"],
        "finish_rc": rc,
    }
    return out | checked(b, bs, src, tgt)


def wait_copied(m: CowfsMount, w: Writer) -> int:
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


def cowfs_idle(b: Bench, bs: int, *mount: str) -> dict[str, Any]:
    src, tgt = b.fresh("idle_src.raw"), b.wd / "idle_tgt.raw"
    with CowfsMount(src, b.mnt, tgt, "--sync", "full", *mount) as m:
        if not wait_for(m.copied, 600, POLL_S):
            raise TimeoutError("the idle mount's copier did not finish")
        os.sync()  # the copier's writeback must not land in the writer's window
        with py_spy(m.pid, b.profile_path(f"b_{bs}{'_wb' if mount else ''}")):
            wres = run_writer(m.live, b.workload(bs), b.wd, f"idle_{bs}")
        rc = m.end("finish")
    return {"writer": wres, "finish_rc": rc} | checked(b, bs, src, tgt)


def checked(b: Bench, bs: int, src: Path, tgt: Path) -> dict[str, Any]:
    """The backup equal to the pristine image, the source to the pristine image plus the
    writes of `bs`; then both removed."""
    out = {
        "verify": qb.compare_files(str(tgt), str(b.pristine)),
        "source_check": qb.compare_files(str(src), str(b.expected[bs])),
    }
    b.rm(src, tgt)
    return out


def plain(b: Bench, bs: int) -> dict[str, Any]:
    src = b.fresh("plain.raw")
    wres = run_writer(src, b.workload(bs), b.wd, f"plain_{bs}")
    b.rm(src)
    return {"writer": wres}
