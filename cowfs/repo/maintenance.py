"""Keeping a repository honest and small: verify, prune and gc.

verify re-reads every chunk a snapshot references and names the snapshots a bad or
missing chunk breaks; the chunks it found bad are listed in the repository, so the
next backup uploads them again rather than trusting them. prune deletes snapshots
by a retention policy (each image's newest always stays: the next incremental's
parent). gc deletes the chunks no surviving index references, only while no backup
runs (repository.py's locks) and only chunks older than a grace period.
"""

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .format import SNAPSHOT_PREFIX, ZERO_HASH, Manifest, digest_of_key
from .repository import Repository
from .store import MissingObject, RepoError

READERS = 4


@dataclass
class VerifyReport:
    snapshots: int = 0
    chunks: int = 0
    checked: int = 0
    """Bytes re-hashed."""
    problems: dict[bytes, str] = field(default_factory=dict)
    """Bad chunks and why."""
    broken: dict[str, list[str]] = field(default_factory=dict)
    """Snapshot -> what breaks it."""


def verify(repo: Repository, progress: Callable[[int], None] = lambda n: None) -> VerifyReport:
    report = VerifyReport()
    users: dict[bytes, list[str]] = {}
    lengths: dict[bytes, int] = {}
    for manifest in repo.snapshots():
        report.snapshots += 1
        try:
            index = repo.index(manifest)
        except RepoError as e:
            report.broken.setdefault(manifest.snapshot, []).append(e.message)
            continue
        for i, digest in enumerate(index.hashes):
            if digest != ZERO_HASH:
                users.setdefault(digest, []).append(manifest.snapshot)
                lengths[digest] = index.extent(i)[1]

    def check(digest: bytes) -> tuple[bytes, str | None]:
        try:
            repo.get_chunk(digest, lengths[digest])
        except MissingObject:
            return digest, "missing"
        except ValueError as e:
            return digest, f"damaged ({e})"
        return digest, None

    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        for digest, problem in pool.map(check, users):
            report.chunks += 1
            report.checked += lengths[digest]
            progress(lengths[digest])
            if problem is not None:
                report.problems[digest] = problem
                for name in sorted(set(users[digest])):
                    why = f"chunk {digest.hex()} {problem}"
                    report.broken.setdefault(name, []).append(why)
    repo.set_bad_chunks(report.problems)
    return report


# -- prune ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def any(self) -> bool:
        return any((self.last, self.daily, self.weekly, self.monthly))


def to_keep(manifests: list[Manifest], policy: Retention) -> set[str]:
    """The snapshots of one image the policy keeps (as borg and PBS count: the newest
    of each of the last N days, weeks, months), and always the newest."""
    newest_first = sorted(manifests, key=lambda m: m.time, reverse=True)
    keep = {m.snapshot for m in newest_first[: max(1, policy.last)]}
    periods: list[tuple[int, Callable[[datetime], object]]] = [
        (policy.daily, lambda t: t.date()),
        (policy.weekly, lambda t: t.isocalendar()[:2]),
        (policy.monthly, lambda t: (t.year, t.month)),
    ]
    for count, period in periods:
        seen: set[object] = set()
        for m in newest_first:
            if len(seen) >= count:
                break
            bucket = period(m.time.astimezone(UTC))
            if bucket not in seen:
                seen.add(bucket)
                keep.add(m.snapshot)
    return keep


def prune(
    repo: Repository, policy: Retention, dry_run: bool, image: str | None = None
) -> tuple[list[Manifest], list[Manifest]]:
    """(kept, deleted) snapshots; chunks are left for gc."""
    by_image: dict[str, list[Manifest]] = {}
    for m in repo.snapshots():
        if image is None or m.image == image:
            by_image.setdefault(m.image, []).append(m)
    kept: list[Manifest] = []
    deleted: list[Manifest] = []
    for manifests in by_image.values():
        keep = to_keep(manifests, policy)
        for m in manifests:
            (kept if m.snapshot in keep else deleted).append(m)
    if not dry_run:
        for m in deleted:
            repo.delete_snapshot(m)
    return kept, deleted


# -- gc ------------------------------------------------------------------------------


@dataclass
class GcReport:
    referenced: int = 0
    deleted: int = 0
    freed: int = 0
    young: int = 0
    """Unreferenced chunks spared: younger than the grace period."""


def gc(repo: Repository, grace: timedelta) -> GcReport:
    report = GcReport()
    repo.lock_gc()
    try:
        referenced: set[bytes] = set()
        indexes = set()
        for manifest in repo.snapshots():
            referenced.update(repo.index(manifest).hashes)
            indexes.add(manifest.index)
        referenced.discard(ZERO_HASH)
        report.referenced = len(referenced)
        cutoff = datetime.now(UTC) - grace
        for info in list(repo.chunk_infos()):
            digest = digest_of_key(info.key)
            if digest is None or digest in referenced:
                continue
            if info.modified > cutoff:
                report.young += 1
                continue
            repo.store.delete(info.key)
            report.deleted += 1
            report.freed += info.size
        for info in list(repo.store.list(SNAPSHOT_PREFIX)):  # a dead backup's index
            if info.key.endswith(".index") and info.key not in indexes and info.modified < cutoff:
                repo.store.delete(info.key)
        repo.bump_generation()
    finally:
        repo.unlock_gc()
    return report
