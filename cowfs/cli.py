"""The `cowfs` command: subcommands, their output and their exit codes.

Bad input is one line on stderr (`cowfs: error: ...`) and exit 2; a backup that
is not complete exits 1; only a complete one exits 0. Tracebacks are for bugs.
"""

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from . import VERSION, restore_cli
from .bars import bytes_bar
from .control import is_mounted, read_status, request, send_command
from .errors import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, CowfsError
from .options import FORMATS, JobOptions, SyncMode
from .policy import CbwPolicy, SourcePolicy, TargetPolicy
from .record import FINAL_STATES, Record, headline, pid_alive, read_record, verdict
from .repo import cli as repo_cli
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

    m = sub.add_parser(
        "mount", help="serve IMAGEs as live files (with --target: back the one IMAGE up at once)"
    )
    m.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="IMAGE [IMAGE ...] MOUNTPOINT",
        help="the disk images, then an empty directory",
    )
    m.add_argument("-t", "--target", type=Path, help="start a backup of the one IMAGE into TARGET")
    m.add_argument("--backing", type=Path, help="the previous backup of a chain (qcow2)")
    _job_options(m)
    m.add_argument("--allow-other", action="store_true", help="let other users reach the live file")
    m.add_argument(
        "--writeback-cache",
        action="store_true",
        help="let the kernel cache buffered writes: faster for buffered writers, but a daemon "
        "that dies loses the writes it had not received (fsync through the mount still makes "
        "them durable)",
    )
    m.add_argument(
        "--intent-region",
        default="64M",
        metavar="SIZE",
        help="bytes per bit of the write-intent record that keeps bitmaps through a crash",
    )
    m.add_argument(
        "--save-period",
        type=float,
        metavar="SECONDS",
        help="save the bitmaps this often while writes come; bounds what a crash adds "
        "to them (default 10)",
    )
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached until unmounted")
    m.add_argument("--debug", action="store_true", help="log every step")

    bk = sub.add_parser("backup", help="start a backup of images of a running mount")
    bk.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    bk.add_argument(
        "-t",
        "--target",
        action="append",
        default=[],
        metavar="[IMAGE=]TARGET",
        help="the backup of IMAGE (just TARGET on a mount of one image); once per image",
    )
    repo_cli.add_backup_options(bk)
    bk.add_argument(
        "--backing",
        action="append",
        default=[],
        metavar="[IMAGE=]PREVIOUS",
        help="the previous backup of IMAGE's chain (qcow2)",
    )
    _job_options(bk)
    bk.add_argument(
        "--completion",
        choices=["grouped", "individual"],
        default="grouped",
        help="grouped: no target is complete until all are, one failure cancels the others",
    )
    bk.add_argument("--wait", action="store_true", help="wait for the end; exit 0 iff complete")
    bk.add_argument(
        "--view",
        action="store_true",
        help="show each image at the point in time as a read-only file (printed); the job "
        "stays open until `cowfs end`",
    )

    e = sub.add_parser("end", help="end a job that stays open (a view, --sync none)")
    e.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    e.add_argument("job", type=int, nargs="?", metavar="JOB", help="default: the running one")

    rl = sub.add_parser("release", help="a view's reader is past a range: free it")
    rl.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    rl.add_argument("job", type=int, metavar="JOB")
    rl.add_argument("offset", metavar="OFFSET", help="bytes, with K/M/G suffixes")
    rl.add_argument("length", metavar="LENGTH", help="bytes, with K/M/G suffixes")
    rl.add_argument("--image", help="which image's view (a job of several images)")

    s = sub.add_parser("status", help="images, bitmaps and jobs of the mount at MOUNTPOINT")
    s.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true")

    f = sub.add_parser("finish", help="unmount, wait for running jobs to finish, print the result")
    f.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    u = sub.add_parser("unmount", help="end a mount with no running job and no open file")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    for name, text in (
        ("cancel", "end a job (a mount --target job: and the mount at once)"),
        ("pause", "hold a job's copier"),
        ("resume", "resume a paused job"),
    ):
        x = sub.add_parser(name, help=text)
        x.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
        x.add_argument("job", type=int, nargs="?", metavar="JOB", help="default: the running one")

    sp = sub.add_parser("set-speed", help="change the copier's speed limit of a running job")
    sp.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    sp.add_argument("speed", metavar="RATE", help="bytes/s with K/M/G suffixes; 0: unlimited")
    sp.add_argument("job", type=int, nargs="?", metavar="JOB", help="default: the running one")

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

    restore_cli.add_parsers(sub)
    repo_cli.add_parsers(sub, _Parser)

    i = sub.add_parser("info", help="show a target's record; exit 0 only if complete")
    i.add_argument("target", metavar="TARGET", help="a target file, or REPO/IMAGE@TIME")
    i.add_argument("--endpoint", metavar="URL", help="the S3 endpoint of an s3:// repository")
    i.add_argument("--json", action="store_true")
    return p


def _job_options(p: argparse.ArgumentParser) -> None:
    """The options of a job, the same for `mount --target` and `backup`."""
    p.add_argument("--sync", choices=[s.value for s in SyncMode], default="full")
    p.add_argument(
        "--format", choices=FORMATS, help="target format (default: qcow2 for *.qcow2, else raw)"
    )
    p.add_argument("--compress", action="store_true", help="deflate-compress qcow2 clusters")
    p.add_argument("--bitmap", help="dirty bitmap to anchor (full, top) or to copy (incremental)")
    p.add_argument("--cluster-size", default="64K", help="copy unit, 4K..16M (default 64K)")
    p.add_argument("--speed", default="0", help="copier limit in bytes/s, e.g. 100M (0: none)")
    p.add_argument(
        "--on-source-error",
        choices=[x.value for x in SourcePolicy],
        default="report",
        help="copier read errors: fail the job, retry, or pause it (default report)",
    )
    p.add_argument(
        "--on-target-error",
        choices=[x.value for x in TargetPolicy],
        default="report",
        help="copier write errors; enospc pauses on a full target only (default report)",
    )
    p.add_argument(
        "--on-cbw-error",
        choices=[x.value for x in CbwPolicy],
        default="break-snapshot",
        help="copy-before-write errors: fail the backup or fail the guest write",
    )
    p.add_argument(
        "--cbw-timeout",
        default="0",
        metavar="SECONDS",
        help="break the snapshot if a copy-before-write holds a write up longer (0: never)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing target")


DAEMONS = ("mount", "restore")
"""Commands that may become a daemon (`restore --live`): a control client that goes away
must cost it an EPIPE, never its life."""


def console() -> int:
    """The `cowfs` command itself: `cowfs info T | head -1` dies quietly, as cat would.
    Only here, not in `main`: tests call `main` in-process, where SIGPIPE's default would
    kill the test run at its next write to a closed pipe."""
    return main(console=True)


def main(argv: list[str] | None = None, console: bool = False) -> int:
    args = _parser().parse_args(argv)
    if console and args.command not in DAEMONS:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return _COMMANDS[args.command](args)
    except CowfsError as e:
        print(f"cowfs: error: {e.message}", file=sys.stderr)
        return e.exit_code


def _intent_region(text: str) -> int:
    size = parse_size(text, "intent region")
    if size < 64 << 10 or size & (size - 1):
        raise CowfsError(f"bad intent region {text}: must be a power of two of 64K or more")
    return size


def _save_period(seconds: float | None) -> float:
    from .intent import SAVE_PERIOD_S

    if seconds is None:
        return SAVE_PERIOD_S
    if not 0.1 <= seconds <= 3600:  # also refuses nan
        raise CowfsError(f"bad save period {seconds}: must be from 0.1 to 3600 seconds")
    return seconds


def _mount(args: argparse.Namespace) -> int:
    from .backup import TargetRequest  # trio and pyfuse3: only this command needs them
    from .mount import MountRequest, run_mount

    if len(args.paths) < 2:
        raise CowfsError("mount needs IMAGE [IMAGE ...] MOUNTPOINT")
    *sources, mountpoint = args.paths
    first = None
    if args.target is not None:
        if len(sources) > 1:
            raise CowfsError("--target at mount takes one image; use cowfs backup for several")
        fmt, options = _target_options(args, args.target, args.backing)
        first = TargetRequest(args.target, options, fmt, args.compress, args.backing, args.force)
    elif args.backing is not None or args.bitmap is not None:
        raise CowfsError("--backing and --bitmap at mount go with --target")
    request = MountRequest(
        sources=sources,
        mountpoint=mountpoint,
        first=first,
        allow_other=args.allow_other,
        writeback_cache=args.writeback_cache,
        intent_region=_intent_region(args.intent_region),
        save_period=_save_period(args.save_period),
        foreground=args.foreground,
        progress=args.foreground and sys.stderr.isatty() and first is not None,
        debug=args.debug,
    )
    code = run_mount(request)
    if args.foreground and first is not None:
        from .preflight import canonical_target

        _print_record(read_record(canonical_target(args.target)))
    return code


def _target_options(
    args: argparse.Namespace, target: Path, backing: Path | None
) -> tuple[str, JobOptions]:
    """The format of `target` and the job options, checked as far as the CLI can."""
    fmt = args.format or ("qcow2" if target.name.endswith(".qcow2") else "raw")
    sync = SyncMode(args.sync)
    if fmt == "raw" and (args.compress or backing):
        raise CowfsError("--compress and --backing need a qcow2 target (--format qcow2)")
    if sync is SyncMode.INCREMENTAL and fmt == "raw":
        raise CowfsError(
            "incremental backups need a qcow2 target: a raw file cannot tell a copied "
            "zero from a cluster that was not copied"
        )
    return fmt, _options(args)


def _options(args: argparse.Namespace) -> JobOptions:
    sync = SyncMode(args.sync)
    if sync is SyncMode.INCREMENTAL and not args.bitmap:
        raise CowfsError("an incremental backup needs --bitmap NAME")
    if sync is SyncMode.NONE and args.bitmap:
        raise CowfsError("--bitmap goes with --sync full, top or incremental")
    from .preflight import check_cluster_size

    return JobOptions(
        sync=sync,
        cluster_size=check_cluster_size(parse_size(args.cluster_size, "cluster size")),
        speed=parse_size(args.speed, "speed"),
        on_source_error=SourcePolicy(args.on_source_error),
        on_target_error=TargetPolicy(args.on_target_error),
        on_cbw_error=CbwPolicy(args.on_cbw_error),
        cbw_timeout=parse_seconds(args.cbw_timeout, "cbw timeout"),
        bitmap=args.bitmap,
        view=getattr(args, "view", False),  # `backup` only
    )


def _backup(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    images = [image["name"] for image in st["images"]]
    if args.repo is not None:
        requests = repo_cli.backup_requests(args, images, _options(args))
    else:
        requests = _file_requests(args, images)
    st = send_command(args.mountpoint, "backup", targets=requests, completion=args.completion)
    return _report_started(args, st)


def _file_requests(args: argparse.Namespace, images: list[str]) -> dict[str, dict]:
    """Each image's file target, its format and options, as the daemon takes them."""
    if not args.target:
        raise CowfsError("a backup needs --target (or --repo)")
    targets = _per_image(args.target, images, "--target")
    backings = _per_image(args.backing, images, "--backing")
    for name in backings:
        if name not in targets:
            raise CowfsError(f"--backing {name}=... names an image without --target")
    requests = {}
    for name, target in targets.items():
        backing = backings.get(name)
        fmt, options = _target_options(args, target, backing)
        requests[name] = {
            "target": str(Path.cwd() / target),
            "fmt": fmt,
            "compress": args.compress,
            "backing": None if backing is None else str(Path.cwd() / backing),
            "force": args.force,
            "options": options.to_json(),
        }
    return requests


def _report_started(args: argparse.Namespace, st: dict) -> int:
    job_id = st["started"]
    print(job_id)
    for job in st["jobs"]:
        if job["id"] == job_id and job["view"] is not None:
            print(job["view"])
    sys.stdout.flush()
    if not args.wait:
        return EXIT_OK
    try:
        st = _wait_for_job(args.mountpoint, job_id)
    except KeyboardInterrupt:
        return _interrupted(args.mountpoint, st)
    jobs = [job for job in st["jobs"] if job["id"] == job_id]
    for job in jobs:
        print(f"{job['image']}: {job['state']}  ->  {job['target']}")
    return EXIT_OK if all(job["state"] == "complete" for job in jobs) else EXIT_INCOMPLETE


def _per_image(values: list[str], images: list[str], option: str) -> dict[str, Path]:
    """`IMAGE=PATH` values, or one bare `PATH` on a mount of one image. A name before `=`
    that is no image is a mistake, not a file name (a path with `=` has a `/` first)."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name in images:
            key, where = name, path
        elif sep and "/" not in name:
            raise CowfsError(f"{option} {value}: no image {name!r} here ({', '.join(images)})")
        elif len(images) == 1:
            key, where = images[0], value
        else:
            raise CowfsError(
                f"{option} {value}: name the image ({', '.join(images)}) as IMAGE=PATH"
            )
        if key in out:
            raise CowfsError(f"{option} names image {key} twice")
        out[key] = Path(where)
    return out


def _wait_for_job(mountpoint: Path, job_id: int) -> dict:
    """Until every job of `job_id` has ended, its record written: the daemon answers a
    `wait` as soon as that happens (or after PROGRESS_S, for a progress bar on a
    terminal), so a short job returns as soon as it is done, not at the next poll."""
    tty = sys.stderr.isatty()
    bar = bytes_bar(f"job {job_id}") if tty else None
    try:
        while True:
            st = request(mountpoint, "wait", job=job_id, timeout=PROGRESS_S if tty else 10.0)
            jobs = [job for job in st["jobs"] if job["id"] == job_id]
            if bar is not None:
                bar.total = sum(job["bytes_total"] for job in jobs)
                bar.n = sum(job["bytes_done"] for job in jobs)
                bar.refresh()
            if all(job["state"] in FINAL_STATES for job in jobs):
                return st
    finally:
        if bar is not None:
            bar.close()


def _tracking(t: dict[str, Any]) -> str:
    if t["failed"]:
        return f"failed ({t['failed']}); the next save retries"
    return (
        f"{t['intent_regions']} intent region(s) of {format_bytes(t['intent_region'])} "
        f"marked; bitmaps saved every {t['save_period']:g} s while writes come "
        f"({t['saves']} saves, {t['intent_writes']} intent writes)"
    )


def _status(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    if st.get("restore"):
        restore_cli.print_status(st)
        return EXIT_OK
    mounted = "mounted" if st["mounted"] else "unmounted, jobs copy what is left"
    print(f"mount: {st['mountpoint']} ({mounted}), pid {st['pid']}")
    for image in st["images"]:
        print(f"image: {image['name']}  <-  {image['source']}, {format_bytes(image['size'])}")
        for b in image["bitmaps"]:
            print(
                f"  bitmap {b['name']}: {_bitmap_state(b)}, dirty {format_bytes(b['dirty_bytes'])}"
            )
        if image["bitmaps"]:
            print(f"  change tracking: {_tracking(image['tracking'])}")
    for job in st["jobs"]:
        _print_job(job)
    return EXIT_OK


def _print_job(job: dict) -> None:
    total, done = job["bytes_total"], job["bytes_done"]
    pct = 100.0 * done / total if total else 100.0
    why = f" ({job['paused_reason']})" if job.get("paused_reason") else ""
    print(f"job {job['id']}: {job['image']}")
    print(f"state: {job['state']}{why}")
    print(f"source: {job['source']}  ->  target: {job['target']} ({job['format']})")
    print(f"sync: {job['sync']}, cluster size {format_bytes(job['cluster_size'])}")
    print(f"point in time: {job['point_in_time']}")
    print(f"progress: {pct:.1f}% ({format_bytes(done)} of {format_bytes(total)})")
    if job["state"] in FINAL_STATES:
        return
    eta = f", ETA {job['eta_s']:.0f} s" if job.get("eta_s") is not None else ""
    print(
        f"copied: {format_bytes(job['bytes_copier'])} by the copier, "
        f"{format_bytes(job['bytes_cbw'])} by copy-before-write"
    )
    print(f"rate: {format_bytes(job['rate'])}/s{eta}, speed limit {_speed_text(job['speed'])}")
    if job.get("view"):
        print(f"view: {job['view']} (until `cowfs end`)")
    if job.get("dirty_extents"):
        print(f"dirty extents: {job['dirty_extents']}")
    if job.get("last_error"):
        print(f"last error: {job['last_error']}")


def _finish(args: argparse.Namespace) -> int:
    st = read_status(args.mountpoint)
    try:
        if st["mounted"] and is_mounted(Path(st["mountpoint"])):
            _unmount(Path(st["mountpoint"]))
        return _wait_and_report(st)
    except KeyboardInterrupt:
        return _interrupted(args.mountpoint, st)


def _unmount_command(args: argparse.Namespace) -> int:
    st = send_command(args.mountpoint, "unmount")
    try:
        _wait_for_exit(Path(st["mountpoint"]), st)
    except KeyboardInterrupt:
        return _interrupted(args.mountpoint, st)
    print(f"unmounted {st['mountpoint']}")
    if st.get("restore"):  # the copy finished from the quiet backup: what DEST is now
        return _report_record(Path(st["dest"]))
    return EXIT_OK


def _end(args: argparse.Namespace) -> int:
    st = send_command(args.mountpoint, "end", job=args.job)
    job_id = st["ending"]
    try:
        st = _wait_for_job(args.mountpoint, job_id)  # a copier may still be at work
    except KeyboardInterrupt:
        return _interrupted(args.mountpoint, st)
    records = [read_record(Path(job["target"])) for job in st["jobs"] if job["id"] == job_id]
    for record in records:
        _print_record(record)
    return EXIT_OK if all(verdict(r) == "complete" for r in records) else EXIT_INCOMPLETE


def _release(args: argparse.Namespace) -> int:
    offset, length = parse_size(args.offset, "offset"), parse_size(args.length, "length")
    st = send_command(
        args.mountpoint, "release", job=args.job, image=args.image, offset=offset, length=length
    )
    print(
        f"released {format_bytes(st['released'])} of whole clusters from {offset}; "
        f"freed {format_bytes(st['freed'])} of the fleecing store"
    )
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    st = send_command(args.mountpoint, "cancel", job=args.job)
    job_id = args.job if args.job is not None else max(job["id"] for job in st["jobs"])
    jobs = [job for job in st["jobs"] if job["id"] == job_id]
    try:
        with contextlib.suppress(CowfsError):  # the daemon went away: its mount's job
            _wait_for_job(args.mountpoint, job_id)
        if not is_mounted(Path(st["mountpoint"])):
            _wait_for_exit(Path(st["mountpoint"]), st)
    except KeyboardInterrupt:
        return _interrupted(args.mountpoint, st)
    for job in jobs:
        if job["format"] == "repo":  # a repository's job leaves a snapshot or nothing
            print(f"cancelled: {job['image']}: no snapshot in {job['target'].rpartition('/')[0]}")
        else:
            _print_record(read_record(Path(job["target"])))
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
    return _control(args.mountpoint, "pause", job=args.job)


def _resume(args: argparse.Namespace) -> int:
    return _control(args.mountpoint, "resume", job=args.job)


def _set_speed(args: argparse.Namespace) -> int:
    speed = parse_size(args.speed, "speed")
    return _control(args.mountpoint, "set-speed", speed=speed, job=args.job)


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
    from .chain import links
    from .repo.snapshot import is_snapshot

    if is_snapshot(args.target):
        return _snapshot_info(args)
    target = Path(args.target).absolute()
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


def _snapshot_info(args: argparse.Namespace) -> int:
    """A repository snapshot's record, kept in its manifest (there only if complete)."""
    from dataclasses import asdict

    from .repo.snapshot import RepoSnapshot

    access = repo_cli.access_for(args.target.rpartition("/")[0], args.endpoint)
    snapshot = RepoSnapshot.open(args.target, access)
    record, manifest = snapshot.record, snapshot.manifest
    if args.json:
        print(
            json.dumps(asdict(record) | {"verdict": verdict(record), "manifest": asdict(manifest)})
        )
    else:
        _print_record(record)
        print(
            f"snapshot: {manifest.snapshot}, parent {manifest.parent or '-'}: "
            f"{manifest.chunks} chunks of {format_bytes(manifest.chunk_size)}, "
            f"{manifest.zero_chunks} zero, {manifest.new_chunks} uploaded "
            f"({format_bytes(manifest.new_bytes)})"
        )
    return EXIT_OK if verdict(record) == "complete" else EXIT_INCOMPLETE


def _bitmap(args: argparse.Namespace) -> int:
    from .bitmap import BitmapStore, bitmap_rows
    from .preflight import check_cluster_size, check_source

    source = args.source.absolute()
    check_source(source)
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:  # bitmaps change only while no job runs: a running job owns them
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        granularity = None
        if args.action == "add":
            granularity = check_cluster_size(parse_size(args.granularity, "granularity"))
        if not locked:  # a mount holds the image: it owns the bitmaps, ask it
            return _bitmap_through_mount(source, args, granularity)
        store = BitmapStore.load(source, holding_lock=True)
        match args.action:
            case "list":
                size = os.fstat(fd).st_size
                return _bitmap_list(bitmap_rows(store, size, None), args.json)
            case "add":
                assert granularity is not None
                store.add(args.name, granularity, os.fstat(fd).st_size)
            case "remove":
                store.remove(args.name)
            case "clear":
                store.clear(args.name)
        store.close(os.fstat(fd))
    finally:
        os.close(fd)
    return EXIT_OK


def _bitmap_through_mount(source: Path, args: argparse.Namespace, granularity: int | None) -> int:
    """A bitmap command for an image a mount serves, run by that mount's daemon."""
    from .bitmap import BitmapStore, bitmap_rows
    from .claims import image_entry

    try:
        mountpoint = Path(image_entry(source).read_text())
    except OSError:  # a daemon that is not a mount's (or going away): the file is the truth
        if args.action == "list":
            store = BitmapStore.load(source, holding_lock=False)
            size = os.stat(source).st_size
            return _bitmap_list(bitmap_rows(store, size, store.in_use_by), args.json)
        busy = f"source {source} is in use by a cowfs job; try again when it has ended"
        raise CowfsError(busy) from None
    request: dict[str, Any] = {"image": source.resolve().name, "action": args.action}
    if args.action != "list":
        request |= {"name": args.name, "granularity": granularity}
    st = send_command(mountpoint, "bitmap", **request)
    image = next(i for i in st["images"] if i["name"] == request["image"])
    if args.action == "list":
        return _bitmap_list(image["bitmaps"], args.json)
    return EXIT_OK


def _bitmap_state(row: dict[str, Any]) -> str:
    state = "consistent" if row["consistent"] else f"inconsistent: {row['reason']}"
    if row["recovered"]:
        grew = format_bytes(row["recovered"]["grew_bytes"])
        state += f", recovered after a crash of pid {row['recovered']['pid']}, grew by {grew}"
    return state


def _bitmap_list(rows: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        state = _bitmap_state(row)
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
    the newest job's record says (a mount that ran no job: just that it is gone)."""
    _wait_for_exit(Path(status["mountpoint"]), status)
    written = status.get("target") or status.get("dest")  # a backup's, a live restore's
    if written is None:
        print(f"unmounted {status['mountpoint']}")
        return EXIT_OK
    if status.get("format") == "repo":
        return _report_snapshot(written)
    return _report_record(Path(written))


def _report_snapshot(name: str) -> int:
    """A repository job's outcome: its snapshot exists only if it completed."""
    from .repo.snapshot import RepoSnapshot
    from .repo.store import RepoError

    try:
        snapshot = RepoSnapshot.open(name, repo_cli.access_for(name.rpartition("/")[0], None))
    except RepoError as e:
        print(f"incomplete: no snapshot {name} ({e.message}); the mount's log says why")
        return EXIT_INCOMPLETE
    _print_record(snapshot.record)
    return EXIT_OK


def _report_record(target: Path) -> int:
    record = read_record(target)
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
        with bytes_bar("finishing") as bar:
            while not select.select([pidfd], [], [], PROGRESS_S)[0]:
                try:
                    status = read_status(mountpoint)
                except CowfsError:
                    continue  # the daemon is going away
                bar.total, bar.n = status.get("bytes_total", 0), status.get("bytes_done", 0)
                bar.set_postfix_str(status.get("state", ""), refresh=False)
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
    by = "on demand (copy on read)" if record.sync == "restore" else "by copy-before-write"
    print(
        f"copied: {format_bytes(record.bytes_copier)} by the copier, "
        f"{format_bytes(record.bytes_cbw)} {by}, "
        f"{format_bytes(record.bytes_written)} written"
    )
    if record.bitmap:
        print(f"bitmap: {record.bitmap}")
    if record.group is not None:
        peers = ", ".join(record.peers) or "none"
        print(f"job: {record.group}, with the peers {peers}")
    if record.backing:
        print(f"backing file: {record.backing}")
    for merged in record.merged:
        print(f"merged: {merged}")
    if record.duration_s is not None:
        print(f"duration: {record.duration_s:.1f} s")
    for err in record.errors:
        print(f"error: {err}")


_COMMANDS = {
    "mount": _mount,
    "backup": _backup,
    "unmount": _unmount_command,
    "status": _status,
    "finish": _finish,
    "cancel": _cancel,
    "end": _end,
    "release": _release,
    "pause": _pause,
    "resume": _resume,
    "set-speed": _set_speed,
    "info": _info,
    "bitmap": _bitmap,
    "verify": restore_cli.verify,
    "restore": restore_cli.restore,
    "commit": restore_cli.commit,
    "repo": repo_cli.command,
}
