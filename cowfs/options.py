"""What a job is asked to do: its sync mode and options, as the CLI parses them.

Kept apart from job.py so that the CLI's quick commands (status, finish, info)
start without importing trio.
"""

import enum
from dataclasses import dataclass, fields

from .policy import CbwPolicy, SourcePolicy, TargetPolicy

FORMATS = ("raw", "qcow2")
"""The target formats (target/ implements them)."""


class SyncMode(enum.StrEnum):
    FULL = "full"
    TOP = "top"
    INCREMENTAL = "incremental"
    NONE = "none"


@dataclass(frozen=True)
class JobOptions:
    sync: SyncMode = SyncMode.FULL
    cluster_size: int = 64 << 10
    speed: int = 0
    on_source_error: SourcePolicy = SourcePolicy.REPORT
    on_target_error: TargetPolicy = TargetPolicy.REPORT
    on_cbw_error: CbwPolicy = CbwPolicy.BREAK_SNAPSHOT
    cbw_timeout: float = 0.0
    """Seconds a copy-before-write may hold up a guest write before the snapshot is
    broken instead (0: no limit)."""
    bitmap: str | None = None
    """The dirty bitmap this job anchors (full, top) or copies (incremental)."""
    view: bool = False
    """Show the image at the point in time as a read-only file; the job stays open
    until ended (`cowfs end`) or cancelled."""

    def to_json(self) -> dict:
        """For a backup request on the control socket."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, doc: dict) -> "JobOptions":
        return cls(
            sync=SyncMode(doc["sync"]),
            cluster_size=int(doc["cluster_size"]),
            speed=int(doc["speed"]),
            on_source_error=SourcePolicy(doc["on_source_error"]),
            on_target_error=TargetPolicy(doc["on_target_error"]),
            on_cbw_error=CbwPolicy(doc["on_cbw_error"]),
            cbw_timeout=float(doc["cbw_timeout"]),
            bitmap=doc["bitmap"],
            view=bool(doc["view"]),
        )
