"""(m) the FUSE wall: where the gap between a write through a FUSE file and the plain file goes.

Why: (b) shows writes through an idle cowfs mount far below the plain file, and the
issue asks whether pyfuse3 itself is the wall -- if so, how much of the gap it is, and
what a change to it (a faster binding or loop, C libfuse, threads, the kernel's
writeback cache) would give. So the bench's own writer ((b)'s buffered random writes,
`--total` into the image, the final fsync counted), per block size, in one repetition,
each variant on its own fresh copy of the image, through:

- plain: the image file itself;
- pyfuse3 bare: wall/nullfs.py, a pyfuse3 file system serving the image whose write is
  one pwrite into it -- FUSE plus pyfuse3 and trio, none of cowfs's work -- without and
  with the kernel's writeback cache ("wb");
- C libfuse bare: wall/nullfs.c, the same on libfuse3's low-level API (built at run time
  into the work directory; if that fails its variants are skipped, their rows missing),
  single-threaded and multi-threaded ("mt"), without and with wb: FUSE without Python;
- cowfs: an idle `cowfs mount IMAGE MP` (no job, no bitmap), without and with
  `--writeback-cache`.

Reading the ratios: cowfs / pyfuse3 bare is cowfs's own cost over its binding; pyfuse3
bare / C libfuse is the most that replacing pyfuse3 by a single-threaded C loop could
give (C mt: with threads too); the wb rows, what the writeback cache gives at each level.
The order of the variants rotates by repetition, so drift and noise hit all alike. Each
image must equal the pristine image plus the writes afterwards; each mount must end by
itself on unmount.
"""

import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers.mounting import pid_gone, unmount_released, wait_for

from ..anchor import qb
from ..harness import REPO, BareMount, ServingMount, log, run_writer
from ..workspace import Bench
from .writes import WRITEBACK

WALL = REPO / "scripts" / "benchkit" / "wall"
NULLFS_PY = WALL / "nullfs.py"
NULLFS_C = WALL / "nullfs.c"

VARIANTS = ("plain", "pyfuse3", "pyfuse3_wb", "libfuse", "libfuse_wb", "libfuse_mt",
            "libfuse_mt_wb", "cowfs", "cowfs_wb")  # fmt: skip
"""The keys of (m)'s result, in the order of repetition 1; each repetition starts one later."""

_built: dict[Path, Path | None] = {}
"""Per work directory (one run): the C nullfs, or None if it could not be built."""


def fuse_wall(b: Bench, rep: int, bs: int) -> dict[str, Any]:
    """(m) at one block size: every variant once, in an order rotated by `rep`."""
    binary = c_nullfs(b.wd)
    chosen = [v for v in VARIANTS if binary is not None or not v.startswith("libfuse")]
    k = rep % len(chosen)
    order = chosen[k:] + chosen[:k]
    log(f"{b.rep_name(rep)} (m) bs={bs}: {', '.join(order)}")
    return {v: variant(b, bs, v, binary) for v in order}


def c_nullfs(wd: Path) -> Path | None:
    """wall/nullfs.c built into `wd` once per run; None (and why, logged) if it cannot be."""
    if wd not in _built:
        out = wd / "nullfs"
        try:
            flags = subprocess.run(
                ["pkg-config", "--cflags", "--libs", "fuse3"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(NULLFS_C), *flags],
                           capture_output=True, text=True, check=True)  # fmt: skip
            _built[wd] = out
        except (OSError, subprocess.CalledProcessError) as e:
            why = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
            log(f"(m) cannot build {NULLFS_C.name}, its variants are skipped: {why}")
            _built[wd] = None
    return _built[wd]


def variant(b: Bench, bs: int, name: str, binary: Path | None) -> dict[str, Any]:
    """The writer through one variant on a fresh copy, then the copy checked and removed."""
    src = b.fresh(f"m_{name}.raw")
    wl, tag = b.workload(bs), f"m_{name}_{bs}"
    out: dict[str, Any] = {}
    try:
        if name == "plain":
            out["writer"] = run_writer(src, wl, b.wd, tag)
        elif name.startswith("cowfs"):
            with ServingMount(src, b.mnt, *([WRITEBACK] if name.endswith("_wb") else [])) as m:
                out["writer"] = run_writer(m.live, wl, b.wd, tag)
                out["unmount_ok"] = unmount_released(b.mnt).returncode == 0
                wait_for(lambda: pid_gone(m.pid), 60)
        else:
            argv = bare_argv(name, src, b.mnt, binary)
            log_path = b.wd / f"{tag}.log"
            with BareMount(argv, b.mnt, src.name, log_path) as bare:
                out["writer"] = run_writer(bare.live, wl, b.wd, tag)
            out["exit_ok"] = bare.clean
            log_path.unlink()
        out["source_check"] = qb.compare_files(str(src), str(b.expected[bs]))
    finally:
        b.rm(src)
    return out


def bare_argv(name: str, src: Path, mnt: Path, binary: Path | None) -> list[str]:
    """The command line of a bare variant: pyfuse3 (nullfs.py) or C (`binary`)."""
    wb = name.endswith("_wb")
    if name.startswith("pyfuse3"):
        return [sys.executable, str(NULLFS_PY), str(src), str(mnt)] + ["--writeback-cache"] * wb
    assert binary is not None
    return [str(binary), str(src), str(mnt)] + ["-m"] * ("_mt" in name) + ["-w"] * wb
