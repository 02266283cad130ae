"""`cowfs verify` and `cowfs restore`: the commands, their output and their exit codes.

verify exits 0 iff every link of the chain is intact, else 1 with the first bad
offsets and the file that holds them; restore exits 0 iff DEST is the image at the
backup's point in time, every cluster verified on the way. Bad input is exit 2, as
everywhere in cowfs.
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .bars import bytes_bar
from .errors import EXIT_INCOMPLETE, EXIT_OK, CowfsError
from .log import setup_logging
from .units import format_bytes, parse_size


def add_parsers(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "verify", help="check every cluster of a backup's chain against its checksum"
    )
    v.add_argument("target", metavar="TARGET", help="a chain's top file, or REPO/IMAGE@TIME")
    v.add_argument("--endpoint", metavar="URL", help="the S3 endpoint of an s3:// repository")

    c = sub.add_parser(
        "commit", help="merge an incremental into its backing file (qemu-img commit), verified"
    )
    c.add_argument("target", type=Path, metavar="TOP")

    r = sub.add_parser("restore", help="write the image at a backup's point in time to DEST")
    r.add_argument("target", metavar="TARGET", help="a chain's top file, or REPO/IMAGE@TIME")
    r.add_argument("dest", type=Path, metavar="DEST")
    r.add_argument("--format", choices=["raw", "qcow2"], default="raw", help="DEST's format")
    r.add_argument(
        "--force", action="store_true", help="replace DEST (or start an unfinished one over)"
    )
    r.add_argument(
        "--live",
        type=Path,
        metavar="MOUNTPOINT",
        help="serve DEST at once as MOUNTPOINT/<name of DEST>, read-write, while it fills",
    )
    r.add_argument(
        "--speed", default="0", metavar="RATE", help="limit the copier (bytes/s, K/M/G); 0: none"
    )
    r.add_argument("--allow-other", action="store_true", help="let other users reach the live file")
    r.add_argument("--endpoint", metavar="URL", help="the S3 endpoint of an s3:// repository")
    r.add_argument("-f", "--foreground", action="store_true", help="(--live) stay attached")
    r.add_argument("--debug", action="store_true", help="log every step")
    v.add_argument("--debug", action="store_true", help="log every step")


def _quiet(args: argparse.Namespace) -> None:
    """The commands print their outcome; the log is for --debug (a live restore's
    daemon sets its own up)."""
    if args.debug:
        setup_logging(None, debug=True)
    else:
        logging.getLogger("cowfs").addHandler(logging.NullHandler())


def verify(args: argparse.Namespace) -> int:
    from .chainread import BackupChain
    from .repo.snapshot import is_snapshot

    if is_snapshot(args.target):
        _quiet(args)
        return _verify_snapshot(args)
    top = Path(args.target).absolute()
    if not top.is_file():
        raise CowfsError(f"{args.target}: no such backup")
    _quiet(args)
    try:
        chain = BackupChain.open(top)
    except CowfsError as e:  # a link missing, incomplete or without intact checksums
        print(f"bad: {e.message}")
        print("verify: FAILED: the chain cannot be read")
        return EXIT_INCOMPLETE
    try:
        bar = bytes_bar("verifying") if sys.stderr.isatty() else None
        if bar is not None:
            bar.total = chain.bytes_to_verify
        problems = list(chain.verify(bar.update if bar is not None else lambda n: None))
        if bar is not None:
            bar.close()
    finally:
        chain.close()
    for problem in problems:
        print(f"bad: {problem}")
    links = len(chain.links)
    if problems:
        print(f"verify: FAILED: {len(problems)} problem(s) in a chain of {links} link(s)")
        return EXIT_INCOMPLETE
    size = format_bytes(chain.bytes_to_verify)
    print(
        f"verify: ok: {links} link(s), {size} checked, point in time {chain.record.point_in_time}"
    )
    return EXIT_OK


def _verify_snapshot(args: argparse.Namespace) -> int:
    """A repository snapshot: every chunk its index names, re-hashed."""
    from .repo.cli import access_for
    from .repo.snapshot import RepoSnapshot

    access = access_for(args.target.rpartition("/")[0], args.endpoint)
    snapshot = RepoSnapshot.open(args.target, access)
    bar = bytes_bar("verifying") if sys.stderr.isatty() else None
    if bar is not None:
        bar.total = snapshot.bytes_to_verify
    try:
        problems = list(snapshot.verify(bar.update if bar is not None else lambda n: None))
    finally:
        if bar is not None:
            bar.close()
    for problem in problems:
        print(f"bad: {problem}")
    if problems:
        print(f"verify: FAILED: {len(problems)} bad chunk(s) in {snapshot.top}")
        return EXIT_INCOMPLETE
    size = format_bytes(snapshot.bytes_to_verify)
    when = snapshot.record.point_in_time
    print(f"verify: ok: {snapshot.top}, {size} checked, point in time {when}")
    return EXIT_OK


def commit(args: argparse.Namespace) -> int:
    from .commit import commit as merge

    top = args.target.absolute()
    if not top.is_file():
        raise CowfsError(f"{args.target}: no such backup")
    link = merge(top)
    print(
        f"merged {top} into {link.path}: it is now the image at {link.record.point_in_time}, "
        f"every merged cluster verified; {top} still restores and may be removed"
    )
    return EXIT_OK


def restore(args: argparse.Namespace) -> int:
    import trio

    from .restore import Restore, RestoreRequest, restore_all

    speed = parse_size(args.speed, "speed")
    from .repo.cli import access_for
    from .repo.snapshot import is_snapshot

    top = args.target
    if is_snapshot(top):
        access = access_for(top.rpartition("/")[0], args.endpoint)
    else:
        top, access = str(Path(top).absolute()), None
    req = RestoreRequest(top, args.dest.absolute(), args.format, args.force, speed, access)
    _quiet(args)
    if args.live is not None:
        if args.format != "raw":
            raise CowfsError("a live restore writes a raw image (--format raw)")
        from .restore_mount import run_live_restore

        return run_live_restore(req, args.live.absolute(), args)
    from .claims import Claim

    claim = Claim.take("target", req.dest, "destination")
    try:
        r = Restore.prepare(req)
        try:
            r.begin()
            if r.resumed:
                print(f"resuming: {format_bytes(r.resumed_bytes)} already restored")
            bar = bytes_bar("restoring") if sys.stderr.isatty() else None

            def progress(done: int, total: int) -> None:
                if bar is not None:
                    bar.total, bar.n = total, done
                    bar.refresh()

            try:
                finished = trio.run(restore_all, r, progress)
            finally:
                if bar is not None:
                    bar.close()
            if not finished:
                print(f"cowfs: interrupted; {req.dest} is incomplete (restore again resumes)")
                return EXIT_INCOMPLETE
        finally:
            r.close()
    finally:
        claim.release()
    st = r.status()
    if r.state != "complete":
        print(f"restore: FAILED: {st['errors'][-1] if st['errors'] else r.state}")
        print(f"incomplete: {req.dest} (its record says {r.state})")
        return EXIT_INCOMPLETE
    print(
        f"restored: {req.dest} ({r.out.format}, {format_bytes(r.size)}), point in time "
        f"{r.chain.record.point_in_time}, every cluster verified"
    )
    return EXIT_OK


def print_status(st: dict[str, Any]) -> None:
    """`cowfs status` of a live restore."""
    mounted = "mounted" if st["mounted"] else "unmounted, copying what is left"
    print(f"live restore: {st['live']} ({mounted}), pid {st['pid']}")
    print(f"state: {st['state']}")
    print(f"from: {st['source']} (point in time {st['point_in_time']})")
    print(f"into: {st['dest']}, {format_bytes(st['size'])}")
    total, done = st["bytes_total"], st["bytes_done"]
    pct = 100.0 * done / total if total else 100.0
    print(f"progress: {pct:.1f}% ({format_bytes(done)} of {format_bytes(total)})")
    eta = f", ETA {st['eta_s']:.0f} s" if st.get("eta_s") is not None else ""
    print(
        f"restored: {format_bytes(st['bytes_copier'])} by the copier, "
        f"{format_bytes(st['bytes_on_demand'])} on demand (reads and partial writes), "
        f"{format_bytes(st['bytes_resumed'])} before a resume; "
        f"rate {format_bytes(st['rate'])}/s{eta}"
    )
    for err in st["errors"]:
        print(f"error: {err}")
