"""`cowfs repo ...` and the repository options of `cowfs backup` and `cowfs restore`.

A repository is named by `s3://bucket[/prefix]` or a directory. The endpoint of an
S3 repository is given once, to `repo init` (or any command's `--endpoint`), and
remembered for that repository in ~/.config/cowfs/endpoints.json; credentials come
from the usual AWS variables or ~/.aws, read by the command and handed to the
daemon with the backup request.
"""

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..atomic import replace_file
from ..errors import EXIT_INCOMPLETE, EXIT_OK, CowfsError
from ..options import JobOptions
from ..units import format_bytes, parse_seconds, parse_size
from .store import S3Access


def _endpoints_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "cowfs" / "endpoints.json"


def _remembered() -> dict[str, str]:
    try:
        return json.loads(_endpoints_file().read_text())
    except (FileNotFoundError, ValueError):
        return {}


def remember_endpoint(url: str, endpoint: str) -> None:
    known = _remembered() | {url.rstrip("/"): endpoint}
    path = _endpoints_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(known, indent=1).encode(), mode=0o600)


def access_for(url: str, endpoint: str | None) -> S3Access | None:
    """How to reach the repository at `url`: None for a directory."""
    if not url.startswith("s3://"):
        return None
    return S3Access.resolve(endpoint or _remembered().get(url.rstrip("/")))


def _repo_url(text: str) -> str:
    return text.rstrip("/") if text.startswith("s3://") else str(Path(text).absolute())


# -- cowfs backup --repo ---------------------------------------------------------------


def add_backup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repo", metavar="REPO", help="back up into a repository (s3://bucket/prefix or a dir)"
    )
    p.add_argument("--endpoint", metavar="URL", help="the S3 endpoint (remembered per repo)")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="IMAGE",
        help="with --repo: back up only IMAGE (once per image; default: every image)",
    )
    p.add_argument(
        "--spool",
        type=Path,
        default=Path("/var/tmp"),
        metavar="DIR",
        help="with --repo: where copied clusters wait for their chunk's upload",
    )
    p.add_argument(
        "--spool-size",
        default="1G",
        metavar="SIZE",
        help="with --repo: the spool's limit; copy-before-write fails the job beyond it",
    )


def backup_requests(
    args: argparse.Namespace, images: list[str], options: JobOptions
) -> dict[str, dict[str, Any]]:
    """Each image's request of a backup into the repository."""
    from .jobs import RepoRequest, check_sync

    if args.target or args.backing:
        raise CowfsError("--repo takes no --target or --backing: snapshots name themselves")
    if args.compress or args.format:
        raise CowfsError("--repo compresses every chunk itself (no --format, --compress)")
    check_sync(options)
    chosen = args.image or images
    for name in chosen:
        if name not in images:
            raise CowfsError(f"--image {name}: no such image here ({', '.join(images)})")
    if len(set(chosen)) < len(chosen):
        raise CowfsError("--image names an image twice")
    spool = args.spool.absolute()
    if not spool.is_dir():
        raise CowfsError(f"spool directory {spool} does not exist")
    url = _repo_url(args.repo)
    access = access_for(url, args.endpoint)
    from .repository import Repository

    Repository.open(url, access)  # bad credentials, no bucket, no repository: say so now
    repo = RepoRequest(url, access, spool, parse_size(args.spool_size, "spool size"))
    return {
        name: {
            "target": url,
            "fmt": "repo",
            "compress": False,
            "backing": None,
            "force": False,
            "options": options.to_json(),
            "repo": repo.to_json(),
        }
        for name in chosen
    }


# -- cowfs repo ----------------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction, parser_class: type) -> None:
    r = sub.add_parser("repo", help="a deduplicating repository of snapshots (S3 or a directory)")
    rs = r.add_subparsers(dest="action", required=True, parser_class=parser_class)
    i = rs.add_parser("init", help="make a new repository")
    i.add_argument("--chunk-size", default="4M", help="bytes per chunk, a power of two (4M)")
    ls = rs.add_parser("list", help="the snapshots, their sizes, new and shared bytes")
    ls.add_argument("--json", action="store_true")
    v = rs.add_parser("verify", help="re-hash every referenced chunk; exit 0 iff intact")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    p = rs.add_parser("prune", help="delete snapshots a retention policy does not keep")
    for period in ("last", "daily", "weekly", "monthly"):
        p.add_argument(f"--keep-{period}", type=int, default=0, metavar="N")
    p.add_argument("--image", help="only this image's snapshots")
    p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    g = rs.add_parser("gc", help="delete chunks no snapshot references")
    g.add_argument(
        "--grace",
        default="3600",
        metavar="SECONDS",
        help="spare unreferenced chunks younger than this (default 3600)",
    )
    for x in (i, ls, v, p, g):
        x.add_argument("repo", metavar="REPO", help="s3://bucket[/prefix] or a directory")
        x.add_argument("--endpoint", metavar="URL", help="the S3 endpoint (remembered per repo)")


def command(args: argparse.Namespace) -> int:
    from .repository import Repository

    url = _repo_url(args.repo)
    access = access_for(url, args.endpoint)
    if args.action == "init":
        chunk = parse_size(args.chunk_size, "chunk size")
        if chunk < 64 << 10 or chunk & (chunk - 1) or chunk > 64 << 20:
            raise CowfsError(f"chunk size {args.chunk_size}: a power of two, 64K..64M")
        repo = Repository.init(url, access, chunk)
        if access is not None and access.endpoint:
            remember_endpoint(url, access.endpoint)
        print(f"initialised {repo.url}: chunks of {format_bytes(chunk)}, sha256, zstd")
        return EXIT_OK
    repo = Repository.open(url, access)
    if access is not None and args.endpoint:
        remember_endpoint(url, args.endpoint)
    return {"list": _list, "verify": _verify, "prune": _prune, "gc": _gc}[args.action](repo, args)


def _list(repo: Any, args: argparse.Namespace) -> int:
    manifests = repo.snapshots()
    if args.json:
        rows = [
            {k: getattr(m, k) for k in ("snapshot", "size", "point_in_time", "parent")}
            | {k: getattr(m, k) for k in ("new_bytes", "data_bytes", "shared_bytes", "chunks")}
            for m in manifests
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for m in manifests:
        kind = "incremental" if m.parent else "full"
        print(
            f"{m.snapshot}  {format_bytes(m.size)}  {kind}  data {format_bytes(m.data_bytes)}"
            f"  new {format_bytes(m.new_bytes)} stored ({m.new_chunks} chunks)"
            f"  shared {format_bytes(m.shared_bytes)}"
        )
    stored = sum(info.size for info in repo.chunk_infos())
    print(f"{len(manifests)} snapshot(s); chunks stored: {format_bytes(stored)}")
    return EXIT_OK


def _verify(repo: Any, args: argparse.Namespace) -> int:
    from ..bars import bytes_bar
    from .maintenance import verify

    bar = bytes_bar("verifying") if sys.stderr.isatty() and not args.quiet else None
    try:
        report = verify(repo, bar.update if bar is not None else lambda n: None)
    finally:
        if bar is not None:
            bar.close()
    for name, why in sorted(report.broken.items()):
        print(f"broken: {name}: {why[0]}" + (f" (and {len(why) - 1} more)" if len(why) > 1 else ""))
    if report.broken:
        print(
            f"verify: FAILED: {len(report.problems)} bad chunk(s) break "
            f"{len(report.broken)} of {report.snapshots} snapshot(s); the next backup of "
            "each image uploads them again"
        )
        return EXIT_INCOMPLETE
    print(
        f"verify: ok: {report.snapshots} snapshot(s), {report.chunks} chunk(s), "
        f"{format_bytes(report.checked)} re-hashed"
    )
    return EXIT_OK


def _prune(repo: Any, args: argparse.Namespace) -> int:
    from .maintenance import Retention, prune

    policy = Retention(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    if not policy.any():
        raise CowfsError("prune needs a policy: --keep-last, --keep-daily, --keep-weekly ...")
    if min(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly) < 0:
        raise CowfsError("--keep-* counts are not negative")
    kept, deleted = prune(repo, policy, args.dry_run, args.image)
    verb = "would delete" if args.dry_run else "deleted"
    for m in deleted:
        print(f"{verb}: {m.snapshot}")
    print(f"prune: kept {len(kept)}, {verb} {len(deleted)} snapshot(s); `cowfs repo gc` frees")
    return EXIT_OK


def _gc(repo: Any, args: argparse.Namespace) -> int:
    from .maintenance import gc

    grace = timedelta(seconds=parse_seconds(args.grace, "grace"))
    report = gc(repo, grace)
    print(
        f"gc: deleted {report.deleted} chunk(s), freed {format_bytes(report.freed)}; "
        f"{report.referenced} referenced, {report.young} unreferenced within the grace period"
    )
    return EXIT_OK
