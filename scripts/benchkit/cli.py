"""The bench's command line and its run: options, the private work directory, signals.

`main` parses the options (documented in scripts/bench.py, the entry point, whose first
docstring line is the description), loads the QEMU anchor, runs `--repeat` repetitions
of the chosen phases and hands the results to `report`. A run is unpinned unless `--cpus`
says otherwise: what users run. Everything lives in a private directory under
`--workdir`, removed unless `--keep`; SIGTERM and SIGHUP become SystemExit so that every
context manager of `harness` tears its mount or process down.
"""

import argparse
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from . import anchor
from .anchor import qb
from .harness import REPO, log, writer_child
from .phases import PHASES, repetition
from .report import report
from .workspace import Bench


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
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
    p.add_argument(
        "--phases", default=",".join(PHASES), help="phases to run, a comma list (default all: a-m)"
    )
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
    return p.parse_args(argv)


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


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that every finally-block runs


def main(argv: list[str] | None = None, doc: str = "") -> int:
    """The bench; `doc` is the entry point's docstring (its first line: --help's description)."""
    args = parse_args(argv, doc.split("\n")[0])
    anchor.load(Path(args.anchors))
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
        reps = [repetition(bench, i) for i in range(args.repeat)]
    finally:
        if args.keep:
            log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    return report(result, reps, args, time.monotonic() - t0)
