"""The record beside each target: the only thing that says whether a target can be trusted.

Owns the record's file name, its fields, atomic replacement and the verdict
(`complete`, `failed`, `cancelled`, `incomplete`). A record is written when the
job starts (saying `running`), whenever the job reaches a final state, and at
the end; a crash therefore leaves `running`, which reads as `incomplete`.
Never reports `complete` unless the job itself wrote that state.
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .atomic import fsync_dir
from .errors import CowfsError

RECORD_SUFFIX = ".cowfs.json"
LOG_SUFFIX = ".cowfs.log"
FINAL_STATES = ("complete", "failed", "cancelled")


def record_path(target: Path) -> Path:
    return target.with_name(target.name + RECORD_SUFFIX)


def log_path(target: Path) -> Path:
    return target.with_name(target.name + LOG_SUFFIX)


@dataclass
class Record:
    status: str
    source: str
    target: str
    format: str
    size: int
    cluster_size: int
    sync: str
    point_in_time: str
    pid: int
    started: str
    finished: str | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_copier: int = 0
    bytes_cbw: int = 0
    bytes_written: int = 0
    duration_s: float | None = None
    errors: list[str] = field(default_factory=list)
    bitmap: str | None = None
    backing: str | None = None
    job: str | None = None
    """The job's id; a bitmap names the job that anchored it (chains are checked by it)."""
    group: int | None = None
    """The id of the job command this job was part of (`cowfs backup` prints it)."""
    peers: list[str] = field(default_factory=list)
    """The targets of the other jobs of the group."""
    checksums: str | None = None
    """The SHA-256 of the checksum file beside the target (sums.py): it covers that file."""
    checksum_algorithm: str | None = None
    merged: list[str] = field(default_factory=list)
    """The incrementals `cowfs commit` merged into this link, oldest first."""
    version: int = 1


RESERVE = 64 << 10
"""Bytes kept allocated for the next record, so that a target filesystem that fills up
(the very failure the record must report) can still take it."""


def write_record(path: Path, record: Record, reserve: bool = True) -> None:
    """Replace the record atomically: temp file, fsync, rename, fsync the directory.

    A reader (or a crash) sees either the old record or the new one, never half.
    The temp file is written into space reserved by the previous call (no O_TRUNC,
    then truncated to size); with `reserve`, space for the next record is set aside.
    """
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(asdict(record), indent=2, sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if reserve:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, RESERVE)
        finally:
            os.close(fd)


def read_record(target: Path) -> Record:
    """Load the record of `target`; a missing or damaged record is a clear error."""
    path = record_path(target)
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CowfsError(f"{target}: no cowfs record (expected {path})") from None
    except (OSError, ValueError) as e:
        raise CowfsError(f"{path}: unreadable record: {e}") from None
    if not isinstance(raw, dict):
        raise CowfsError(f"{path}: damaged record: not a JSON object")
    names = {f.name for f in fields(Record)}
    try:
        return Record(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:
        raise CowfsError(f"{path}: damaged record: {e}") from None


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; a killed daemon not yet reaped (a zombie) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def verdict(record: Record) -> str:
    """One word a script can trust: complete, failed, cancelled or incomplete."""
    return record.status if record.status in FINAL_STATES else "incomplete"


def headline(record: Record) -> str:
    """The verdict as a person reads it: a complete `none` job holds only the old content
    of the clusters overwritten while it ran, and says so."""
    word = verdict(record)
    if word == "complete" and record.sync == "none":
        return "complete (fleecing: overwritten clusters only)"
    return word
