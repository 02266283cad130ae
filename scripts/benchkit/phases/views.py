"""(i): reading a view (issue 11) while the guest writes, against QEMU's fleecing.

The whole image is read (1 MiB reads, page cache dropped first) through a `--sync none
--view` job's view while the 64K writer writes to the live file, against the plain image
read with no writer and against QEMU's own fleecing in the same repetition (`qemu.fleecing`).
The view must equal the pristine image; the writer's MiB/s during the read is set against
the same passes with the job running and no reader.
"""

from pathlib import Path
from typing import Any

from ..harness import ServingMount, Writer, log, read_all, run_cowfs, run_writer
from ..qemu import fleecing
from ..workspace import Bench

VIEW_BS = 64 << 10
"""The writer's block size while a view is read."""


def view_read(b: Bench, rep: int, item: None) -> dict[str, Any]:
    log(f"{b.rep_name(rep)} (i) a view read under the 64K writer; plain read; QEMU fleecing")
    out: dict[str, Any] = {"plain": read_all(b.pristine)}
    src, store = b.fresh("i_src.raw"), b.wd / "i_fleece.img"
    wl = b.workload(VIEW_BS)
    try:
        with ServingMount(src, b.mnt) as m:
            done = run_cowfs("backup", str(b.mnt), "--sync", "none", "--view",
                             "--target", str(store))  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"backup --view failed: {done.stderr.strip()}")
            view = Path(done.stdout.split()[1])
            with Writer(m.live, wl, b.wd, "i_reader", passes=0) as w:
                w.go()
                out["cowfs"] = read_all(view)
                w.stop()
                out["writer_reading"], _ = w.wait()
            passes = out["writer_reading"]["passes"]
            out["writer_alone"] = run_writer(m.live, wl, b.wd, "i_alone", passes=passes)
            out["end_ok"] = run_cowfs("end", str(b.mnt)).returncode == 0
            out["unmount_ok"] = m.end("unmount") == 0
    finally:
        b.rm(src, store)
    out["view_ok"] = out["cowfs"]["sha256"] == out["plain"]["sha256"]
    out["qemu"] = fleecing(b, wl)
    out["qemu"]["matches_pit"] = out["qemu"]["sha256"] == out["plain"]["sha256"]
    return out
