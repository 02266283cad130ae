"""The `cowfs` command: subcommands, their output and their exit codes.

Bad input is one line on stderr (`cowfs: error: ...`) and exit 2; a backup that
is not complete exits 1; only a complete one exits 0. Tracebacks are for bugs.
"""

import argparse
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from . import VERSION
from .bitmap import BitmapStore
from .chain import links
from .control import is_mounted, read_status, send_command
from .errors import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, CowfsError
from .options import JobOptions, SyncMode
from .policy import CbwPolicy, SourcePolicy, TargetPolicy
from .preflight import canonical_target, check_cluster_size, check_source
from .record import Record, headline, pid_alive, read_record, verdict
from .target import FORMATS
from .units import format_bytes, parse_seconds, parse_size

PROGRESS_S = 0.5


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not argparse's usage block: the contract for bad input."""
        self.exit(EXIT_ERROR, f"cowfs: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cowfs", description="Live, point-in-time backups of disk images in use.")
    p.add_argument("--version", action="version", version=f"cowfs {VERSION}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="expose SOURCE as a live file and back it up into TARGET")
    m.add_argument("source", type=Path, metavar="SOURCE", help="the disk image to back up")
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    m.add_argument("-t", "--target", type=Path, required=True, help="the backup to write")
    m.add_argument("--sync", choices=[s.value for s in SyncMode], default="full")
    m.add_argument(
        "--format", choices=FORMATS, help="target format (default: qcow2 for *.qcow2, else raw)"
    )
    m.add_argument("--compress", action="store_true", help="deflate-compress qcow2 clusters")
    m.add_argument("--backing", type=Path, help="the previous backup of a chain (qcow2)")
    m.add_argument("--bitmap", help="dirty bitmap to anchor (full, top) or to copy (incremental)")
    m.add_argument("--cluster-size", default="64K", help="copy unit, 4K..16M (default 64K)")
    m.add_argument("--speed", default="0", help="copier limit in bytes/s, e.g. 100M (0: none)")
    m.add_argument(
        "--on-source-error",
        choices=[p.value for p in SourcePolicy],
        default="report",
        help="copier read errors: fail the job, retry, or pause it (default report)",
    )
    m.add_argument(
        "--on-target-error",
        choices=[p.value for p in TargetPolicy],
        default="report",
        help="copier write errors; enospc pauses on a full target only (default report)",
    )
    m.add_argument(
        "--on-cbw-error",
        choices=[p.value for p in CbwPolicy],
        default="break-snapshot",
        help="copy-before-write errors: fail the backup or fail the guest write",
    )
    m.add_argument(
        "--cbw-timeout",
        default="0",
        metavar="SECONDS",
        help="break the snapshot if a copy-before-write holds a write up longer (0: never)",
    )
    m.add_argument("--allow-other", action="store_true", help="let other users reach the live file")
    m.add_argument("--force", action="store_true", help="overwrite an existing target")
    m.add_argument(
        "-f", "--foreground", action="store_true", help="stay attached until the backup ends"
    )
    m.add_argument("--debug", action="store_true", help="log every step")

    s = sub.add_parser("status", help="progress of the job behind MOUNTPOINT")
    s.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true")

    f = sub.add_parser("finish", help="unmount, wait for the backup to finish, print the result")
    f.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    c = sub.add_parser("cancel", help="stop the backup and remove the mount at once")
    c.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    for name, text in (("pause", "hold the copier"), ("resume", "resume a paused job")):
        sub.add_parser(name, help=text).add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    sp = sub.add_parser("set-speed", help="change the copier's speed limit of a running job")
    sp.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    sp.add_argument("speed", metavar="RATE", help="bytes/s with K/M/G suffixes; 0: unlimited")

    b = sub.add_parser("bitmap", help="list and change the dirty bitmaps of a source")
    bsub = b.add_subparsers(dest="action", required=True, parser_class=_Parser)
    bl = bsub.add_parser("list", help="each bitmap: state, granularity, dirty bytes")
    bl.add_argument("source", type=Path, metavar="SOURCE")
    bl.add_argument("--json", action="store_true")
    ba = bsub.add_parser("add", help="start recording writes in a new bitmap")
    ba.add_argument("source", type=Path, metavar="SOURCE")
    ba.add_argument("name", metavar="NAME")
    ba.add_argument("--granularity", default="64K", help="bytes per bit (default 64K)")
    for action, text in (("remove", "delete a bitmap"), ("clear", "forget a bitmap's writes")):
        bx = bsub.add_parser(action, help=text)
        bx.add_argument("source", type=Path, metavar="SOURCE")
        bx.add_argument("name", metavar="NAME")

    i = sub.add_parser("info", help="show a target's record; exit 0 only if complete")
    i.add_argument("target", type=Path, metavar="TARGET")
    i.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "mount":  # `cowfs info T | head -1`: die quietly, as cat would
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return _COMMANDS[args.command](args)
    except CowfsError as e:
        print(f"cowfs: error: {e.message}", file=sys.stderr)
        return e.exit_code


def _mount(args: argparse.Namespace) -> int:
    from .mount import MountRequest, run_mount  # trio and pyfuse3: only this command needs them

    fmt = args.format or ("qcow2" if args.target.name.endswith(".qcow2") else "raw")
    sync = SyncMode(args.sync)
    if fmt == "raw" and (args.compress or args.backing):
        raise CowfsError("--compress and --backing need a qcow2 target (--format qcow2)")
    if sync is SyncMode.INCREMENTAL and fmt == "raw":
        raise CowfsError(
            "incremental backups need a qcow2 target: a raw file cannot tell a copied "
            "zero from a cluster that was not copied"
        )
    if sync is SyncMode.INCREMENTAL and not args.bitmap:
        raise CowfsError("an incremental backup needs --bitmap NAME")
    if sync is SyncMode.NONE and args.bitmap:
        raise CowfsError("--bitmap goes with --sync full, top or incremental")
    options = JobOptions(
        sync=sync,
        cluster_size=check_cluster_size(parse_size(args.cluster_size, "cluster size")),
        speed=parse_size(args.speed, "speed"),
        on_source_error=SourcePolicy(args.on_source_error),
        on_target_error=TargetPolicy(args.on_target_error),
        on_cbw_error=CbwPolicy(args.on_cbw_error),
        cbw_timeout=parse_seconds(args.cbw_timeout, "cbw timeout"),
        bitmap=args.bitmap,
    )
    request = MountRequest(
        source=args.source,
        mountpoint=args.mountpoint,
        target=args.target,
        options=options,
        fmt=fmt,
        compress=args.compress,
        backing=args.backing,
        force=args.force,
        allow_other=args.allow_other,
        foreground=args.foreground,
        progress=args.foreground and sys.stderr.isatty(),
        debug=args.debug,
    )
    code = run_mount(request)
    if args.foreground:
        _print_record(read_record(canonical_target(args.target)))
    return code


def _status(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    total, done = st["bytes_total"], st["bytes_done"]
    pct = 100.0 * done / total if total else 100.0
    eta = f", ETA {st['eta_s']:.0f} s" if st.get("eta_s") is not None else ""
    why = f" ({st['paused_reason']})" if st.get("paused_reason") else ""
    print(f"state: {st['state']}{why}")
    if not st["mounted"]:
        print("mounted: no (the job copies what is left from the quiet source)")
    print(f"source: {st['source']}  ->  target: {st['target']} ({st['format']})")
    print(f"sync: {st['sync']}, cluster size {format_bytes(st['cluster_size'])}")
    print(f"point in time: {st['point_in_time']}")
    print(f"progress: {pct:.1f}% ({format_bytes(done)} of {format_bytes(total)})")
    print(
        f"copied: {format_bytes(st['bytes_copier'])} by the copier, "
        f"{format_bytes(st['bytes_cbw'])} by copy-before-write"
    )
    print(f"rate: {format_bytes(st['rate'])}/s{eta}, speed limit {_speed_text(st['speed'])}")
    if st.get("last_error"):
        print(f"last error: {st['last_error']}")
    return EXIT_OK


def _finish(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    try:
        if st["mounted"] and is_mounted(Path(st["mountpoint"])):
            _unmount(Path(st["mountpoint"]))
        return _wait_and_report(st)
    except KeyboardInterrupt:
        return _interrupted(args.mountpoint, st)


def _cancel(args: argparse.Namespace) -> int:
    st = send_command(args.mountpoint, "cancel")
    try:
        _wait_and_report(st)
    except KeyboardInterrupt:
        return _interrupted(args.mountpoint, st)
    return EXIT_OK


def _interrupted(mountpoint: Path, status: dict) -> int:
    """Ctrl-C stops the waiting, not the job: the daemon is a session of its own."""
    print(
        f"cowfs: interrupted; the job goes on (pid {status['pid']}): "
        f"'cowfs status {mountpoint}' shows it",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _pause(args: argparse.Namespace) -> int:
    return _control(args.mountpoint, "pause")


def _resume(args: argparse.Namespace) -> int:
    return _control(args.mountpoint, "resume")


def _set_speed(args: argparse.Namespace) -> int:
    return _control(args.mountpoint, "set-speed", speed=parse_size(args.speed, "speed"))


def _control(mountpoint: Path, command: str, **args: Any) -> int:
    """Send a command, then show the state it led to."""
    st = send_command(mountpoint, command, **args)
    why = f" ({st['paused_reason']})" if st.get("paused_reason") else ""
    print(f"{st['state']}{why}, speed {_speed_text(st['speed'])}")
    return EXIT_OK


def _speed_text(speed: int) -> str:
    return f"{format_bytes(speed)}/s" if speed else "unlimited"


def _info(args: argparse.Namespace) -> int:
    """Exit 0 only if the target and every link of its backing chain are complete: a
    complete incremental over a broken link restores wrong data."""
    target = args.target.absolute()
    record = read_record(target)
    below = list(links(target))[1:]
    broken = [link for link in below if link.problem is not None]
    if args.json:
        chain = [{"path": str(link.path), "problem": link.problem} for link in below]
        print(json.dumps(record.__dict__ | {"verdict": verdict(record), "chain": chain}, indent=2))
    else:
        _print_record(record)
        for link in below:
            if link.record is None or link.problem is not None:
                print(f"backing: {link.path}: NOT TRUSTED, {link.problem}")
            else:
                r = link.record
                print(
                    f"backing: {link.path}: complete, point in time {r.point_in_time}, "
                    f"sync {r.sync}, bitmap {r.bitmap or '-'}"
                )
        if broken:
            print(f"chain: broken at {broken[0].path}: the target does not restore correctly")
    return EXIT_OK if verdict(record) == "complete" and not broken else EXIT_INCOMPLETE


def _bitmap(args: argparse.Namespace) -> int:
    source = args.source.absolute()
    check_source(source)
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:  # bitmaps change only while no job runs: a running job owns them
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        if args.action == "list":
            return _bitmap_list(BitmapStore.load(source, holding_lock=locked), args.json)
        if not locked:
            busy = f"source {source} is in use by a cowfs job; try again when it has ended"
            raise CowfsError(busy)
        store = BitmapStore.load(source, holding_lock=True)
        match args.action:
            case "add":
                granularity = check_cluster_size(parse_size(args.granularity, "granularity"))
                store.add(args.name, granularity, os.fstat(fd).st_size)
            case "remove":
                store.remove(args.name)
            case "clear":
                store.clear(args.name)
        store.save(None, os.fstat(fd))
    finally:
        os.close(fd)
    return EXIT_OK


def _bitmap_list(store: BitmapStore, as_json: bool) -> int:
    size = os.stat(store.source).st_size
    rows: list[dict[str, Any]] = [
        {
            "name": b.name,
            "consistent": b.consistent,
            "reason": b.reason,
            "granularity": b.granularity,
            "dirty_clusters": b.bits.count(),
            "dirty_bytes": b.dirty_bytes(size),
            "in_use_by": store.in_use_by,
        }
        for b in store.bitmaps.values()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        state = "consistent" if row["consistent"] else f"inconsistent: {row['reason']}"
        if row["in_use_by"]:
            state += f" (in use by pid {row['in_use_by']})"
        print(
            f"{row['name']}: {state}; granularity {format_bytes(row['granularity'])}, "
            f"dirty {format_bytes(row['dirty_bytes'])} ({row['dirty_clusters']} clusters)"
        )
    return EXIT_OK


def _unmount(mountpoint: Path) -> None:
    done = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise CowfsError(f"cannot unmount {mountpoint}: {reason}")


def _wait_and_report(status: dict) -> int:
    """Wait for the daemon to exit (with a progress bar on a terminal), then print what
    its record says."""
    _wait_for_exit(Path(status["mountpoint"]), status)
    record = read_record(Path(status["target"]))
    _print_record(record)
    return EXIT_OK if verdict(record) == "complete" else EXIT_INCOMPLETE


def _wait_for_exit(mountpoint: Path, status: dict) -> None:
    try:
        pidfd = os.pidfd_open(int(status["pid"]))
    except ProcessLookupError:
        return
    try:
        if not sys.stderr.isatty():
            select.select([pidfd], [], [])
            return
        from tqdm import tqdm

        with tqdm(
            desc="finishing", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
        ) as bar:
            while not select.select([pidfd], [], [], PROGRESS_S)[0]:
                try:
                    status = read_status(mountpoint)
                except CowfsError:
                    continue  # the daemon is going away
                bar.total, bar.n = status["bytes_total"], status["bytes_done"]
                bar.set_postfix_str(status["state"], refresh=False)
                bar.refresh()
    finally:
        os.close(pidfd)


def _print_record(record: Record) -> None:
    word = verdict(record)
    if word == "incomplete":
        why = (
            f"the job is still running (pid {record.pid})"
            if pid_alive(record.pid)
            else "the job ended without finishing (crash or kill)"
        )
        print(f"incomplete: {why}")
    else:
        print(headline(record))
    print(f"target: {record.target} ({record.format})")
    print(f"source: {record.source}, {format_bytes(record.size)}")
    print(f"point in time: {record.point_in_time}")
    print(f"sync: {record.sync}, cluster size {format_bytes(record.cluster_size)}")
    print(
        f"copied: {format_bytes(record.bytes_copier)} by the copier, "
        f"{format_bytes(record.bytes_cbw)} by copy-before-write, "
        f"{format_bytes(record.bytes_written)} written"
    )
    if record.bitmap:
        print(f"bitmap: {record.bitmap}")
    if record.backing:
        print(f"backing file: {record.backing}")
    if record.duration_s is not None:
        print(f"duration: {record.duration_s:.1f} s")
    for err in record.errors:
        print(f"error: {err}")


_COMMANDS = {
    "mount": _mount,
    "status": _status,
    "finish": _finish,
    "cancel": _cancel,
    "pause": _pause,
    "resume": _resume,
    "set-speed": _set_speed,
    "info": _info,
    "bitmap": _bitmap,
}
