"""A backup job into a repository: the request as the CLI sends it, and its target.

The CLI resolves the repository's address and the caller's credentials and sends them
with the request, so the daemon (started earlier, maybe by someone else's shell) acts
for whoever asked. Everything a bad request could get wrong is checked here, in the
daemon's worker thread, before the point in time: the repository opens, the sync mode
suits a repository, an incremental's bitmap is consistent and anchored at a snapshot
of this repository, and that snapshot is intact.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CowfsError
from ..options import JobOptions, SyncMode
from .chunker import DEFAULT_SPOOL_SIZE, RepoTarget
from .format import Index, Manifest
from .repository import Repository
from .store import S3Access

if TYPE_CHECKING:
    from ..disk import Disk

DEFAULT_SPOOL = Path("/var/tmp")


@dataclass(frozen=True)
class RepoRequest:
    url: str
    access: S3Access | None
    spool: Path = DEFAULT_SPOOL
    spool_size: int = DEFAULT_SPOOL_SIZE

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "access": None if self.access is None else self.access.to_json(),
            "spool": str(self.spool),
            "spool_size": self.spool_size,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RepoRequest":
        access = doc.get("access")
        return cls(
            url=doc["url"],
            access=None if access is None else S3Access(**access),
            spool=Path(doc["spool"]),
            spool_size=int(doc["spool_size"]),
        )


def check_sync(options: JobOptions) -> None:
    """A chunk is hashed whole, so a repository takes whole images (full) or whole
    chunks around dirty clusters (incremental); never a view."""
    if options.sync not in (SyncMode.FULL, SyncMode.INCREMENTAL):
        raise CowfsError(f"a repository takes --sync full or incremental, not {options.sync}")
    if options.view:
        raise CowfsError("--view goes with a file target, not a repository")


def open_repo_target(disk: "Disk", req: RepoRequest, options: JobOptions) -> RepoTarget:
    """Blocking: the target of `disk`'s next snapshot, its parent checked if incremental."""
    check_sync(options)
    repo = Repository.open(req.url, req.access)
    if repo.chunk_size % options.cluster_size:
        raise CowfsError(
            f"cluster size {options.cluster_size} does not divide the repository's chunk "
            f"size {repo.chunk_size}"
        )
    parent = None
    if options.sync is SyncMode.INCREMENTAL:
        assert options.bitmap is not None
        parent = _parent(repo, disk, options.bitmap)
    return RepoTarget(repo, disk.name, parent, req.spool, req.spool_size, options.cluster_size)


def _parent(repo: Repository, disk: "Disk", name: str) -> tuple[Manifest, Index]:
    """The snapshot the bitmap counts writes since: the incremental's every clean chunk
    comes from its index."""
    bitmap = disk.dirty.get(name)
    if not bitmap.consistent:
        raise CowfsError(
            f"bitmap {name!r} of {disk.path} is inconsistent ({bitmap.reason}); "
            f"take a full backup with --sync full --bitmap {name}"
        )
    anchor = bitmap.anchor
    full = f"take a full backup into the repository with --sync full --bitmap {name}"
    if anchor is None:
        raise CowfsError(f"bitmap {name!r} counts writes since no backup; {full}")
    target = str(anchor["target"])
    if not target.startswith(repo.url + "/"):
        raise CowfsError(
            f"bitmap {name!r} counts writes since {target}, not a snapshot of {repo.url}; {full}"
        )
    manifest = repo.manifest(target[len(repo.url) + 1 :])
    if manifest.record.get("job") != anchor["job"]:
        raise CowfsError(f"snapshot {target} is not the backup bitmap {name!r} anchors; {full}")
    return manifest, repo.index(manifest)
