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
from .policy import CbwPolicy, SourcePolicy, TargetPolicy
from .preflight import check_cluster_size
from .record import Record, pid_alive, read_record, verdict
from .units import format_bytes, parse_seconds, parse_size


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
        on_source_error=SourcePolicy(args.on_source_error),
        on_target_error=TargetPolicy(args.on_target_error),
        on_cbw_error=CbwPolicy(args.on_cbw_error),
        cbw_timeout=parse_seconds(args.cbw_timeout, "cbw timeout"),
    )
    request = MountRequest(
        source=args.source,
        mountpoint=args.mountpoint,
        target=args.target,
        options=options,
        force=args.force,
        allow_other=args.allow_other,
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
    why = f" ({st['paused_reason']})" if st.get("paused_reason") else ""
    print(f"state: {st['state']}{why}")
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
    _unmount(find_mount(args.mountpoint))
    return _wait_and_report(st)


def _cancel(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    send_command(args.mountpoint, "cancel")
    _wait_and_report(st)
    return EXIT_OK


def _pause(args: argparse.Namespace) -> int:
    return _control(args.mountpoint, "pause")


def _resume(args: argparse.Namespace) -> int:
    return _control(args.mountpoint, "resume")


def _set_speed(args: argparse.Namespace) -> int:
    return _control(args.mountpoint, f"set-speed {parse_size(args.speed, 'speed')}")


def _control(mountpoint: Path, command: str) -> int:
    """Send a command, then show the state it led to."""
    send_command(mountpoint, command)
    st = read_status(mountpoint)
    why = f" ({st['paused_reason']})" if st.get("paused_reason") else ""
    print(f"{st['state']}{why}, speed {_speed_text(st['speed'])}")
    return EXIT_OK


def _speed_text(speed: int) -> str:
    return f"{format_bytes(speed)}/s" if speed else "unlimited"


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
    "pause": _pause,
    "resume": _resume,
    "set-speed": _set_speed,
    "info": _info,
}
