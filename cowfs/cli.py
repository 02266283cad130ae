"""The `cowfs` command: subcommands, their output and their exit codes.

Bad input is one line on stderr (`cowfs: error: ...`) and exit 2; a backup that
is not complete exits 1; only a complete one exits 0. Tracebacks are for bugs.
"""

import argparse
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from . import VERSION
from .control import find_mount, read_status, send_command
from .errors import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_OK, CowfsError
from .job import JobOptions, SyncMode
from .mount import MountRequest, run_mount
from .preflight import check_cluster_size
from .record import Record, pid_alive, read_record, verdict
from .units import format_bytes, parse_size


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
    m.add_argument("--cluster-size", default="64K", help="copy unit, 4K..16M (default 64K)")
    m.add_argument("--speed", default="0", help="copier limit in bytes/s, e.g. 100M (0: none)")
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

    i = sub.add_parser("info", help="show a target's record; exit 0 only if complete")
    i.add_argument("target", type=Path, metavar="TARGET")
    i.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except CowfsError as e:
        print(f"cowfs: error: {e.message}", file=sys.stderr)
        return e.exit_code


def _mount(args: argparse.Namespace) -> int:
    options = JobOptions(
        sync=SyncMode(args.sync),
        cluster_size=check_cluster_size(parse_size(args.cluster_size, "cluster size")),
        speed=parse_size(args.speed, "speed"),
    )
    request = MountRequest(
        source=args.source,
        mountpoint=args.mountpoint,
        target=args.target,
        options=options,
        force=args.force,
        foreground=args.foreground,
        progress=args.foreground and sys.stderr.isatty(),
        debug=args.debug,
    )
    code = run_mount(request)
    if args.foreground:
        _print_record(read_record(args.target.absolute()))
    return code


def _status(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    total, done = st["bytes_total"], st["bytes_done"]
    pct = 100.0 * done / total if total else 100.0
    eta = f", ETA {st['eta_s']:.0f} s" if st.get("eta_s") is not None else ""
    print(f"state: {st['state']}")
    print(f"source: {st['source']}  ->  target: {st['target']} ({st['format']})")
    print(f"sync: {st['sync']}, cluster size {format_bytes(st['cluster_size'])}")
    print(f"point in time: {st['point_in_time']}")
    print(f"progress: {pct:.1f}% ({format_bytes(done)} of {format_bytes(total)})")
    print(
        f"copied: {format_bytes(st['bytes_copier'])} by the copier, "
        f"{format_bytes(st['bytes_cbw'])} by copy-before-write"
    )
    print(f"rate: {format_bytes(st['rate'])}/s{eta}")
    for err in st["errors"]:
        print(f"error: {err}")
    return EXIT_OK


def _finish(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    _unmount(find_mount(args.mountpoint))
    return _wait_and_report(st)


def _cancel(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    send_command(args.mountpoint, "cancel")
    _wait_and_report(st)
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    record = read_record(args.target.absolute())
    if args.json:
        print(json.dumps(record.__dict__ | {"verdict": verdict(record)}, indent=2))
    else:
        _print_record(record)
    return EXIT_OK if verdict(record) == "complete" else EXIT_INCOMPLETE


def _unmount(mountpoint: Path) -> None:
    done = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise CowfsError(f"cannot unmount {mountpoint}: {reason}")


def _wait_and_report(status: dict) -> int:
    """Wait for the daemon to exit, then print what its record says."""
    _wait_for_exit(int(status["pid"]))
    record = read_record(Path(status["target"]))
    _print_record(record)
    return EXIT_OK if verdict(record) == "complete" else EXIT_INCOMPLETE


def _wait_for_exit(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [])
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
        print(word)
    print(f"target: {record.target} ({record.format})")
    print(f"source: {record.source}, {format_bytes(record.size)}")
    print(f"point in time: {record.point_in_time}")
    print(f"sync: {record.sync}, cluster size {format_bytes(record.cluster_size)}")
    print(
        f"copied: {format_bytes(record.bytes_copier)} by the copier, "
        f"{format_bytes(record.bytes_cbw)} by copy-before-write, "
        f"{format_bytes(record.bytes_written)} written"
    )
    if record.duration_s is not None:
        print(f"duration: {record.duration_s:.1f} s")
    for err in record.errors:
        print(f"error: {err}")


_COMMANDS = {
    "mount": _mount,
    "status": _status,
    "finish": _finish,
    "cancel": _cancel,
    "info": _info,
}
