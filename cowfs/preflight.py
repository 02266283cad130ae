"""Checks of a mount request before anything is created, locked or mounted.

Every refusal is a CowfsError with one line that names the culprit. Never
changes anything on disk: a refused request leaves no trace.
"""

import errno
import os
import re
from pathlib import Path

from . import chain
from .bitmap import store_path
from .errors import CowfsError

MIN_CLUSTER = 4 << 10
MAX_CLUSTER = 16 << 20

OWN_FILE = re.compile(
    r".*\.cowfs(\.json|\.log|\.sums|-bitmaps\.json|-intent|-restore)(\.tmp)?|.*\.cowfs-\d+\.tmp",
    re.S,
)
"""Names of cowfs's own files (records, logs, checksums, bitmaps, intent records, restored
maps, their temporary files): never a target or a restore's destination, which would
destroy one of them or be mistaken for one."""


def check_cluster_size(size: int) -> int:
    if size < MIN_CLUSTER or size > MAX_CLUSTER or size & (size - 1):
        raise CowfsError(f"bad cluster size {size}: must be a power of two from 4K to 16M")
    return size


def check_source(source: Path) -> os.stat_result:
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise CowfsError(f"source {source} does not exist") from None
    except OSError as e:
        raise CowfsError(f"source {source}: {e.strerror}") from None
    if not os.path.isfile(source):
        raise CowfsError(f"source {source} is not a regular file")
    if not os.access(source, os.R_OK | os.W_OK):
        raise CowfsError(f"source {source} is not readable and writable by this user")
    return st


def check_mountpoint(mountpoint: Path) -> None:
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise CowfsError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            fix = f"clear it with fusermount3 -u {mountpoint}"
            raise CowfsError(f"mountpoint {mountpoint} is a stale mount; {fix}") from None
        raise CowfsError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise CowfsError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise CowfsError(f"mountpoint {mountpoint} is already a mount point")
    if os.listdir(mountpoint):
        raise CowfsError(f"mountpoint {mountpoint} is not empty")


def canonical_target(target: Path) -> Path:
    """The target's one true path: its real directory and its name (a symbolic link to an
    existing file is followed), whatever the spelling. A missing directory is left as is
    for check_target to name."""
    path = Path.cwd() / target
    if path.is_symlink() and path.exists():
        path = path.resolve()
    return path.parent.resolve() / path.name if path.parent.is_dir() else path


def check_target(
    target: Path, source_path: Path, source: os.stat_result, mountpoint: Path, force: bool
) -> None:
    """`target` is canonical (canonical_target)."""
    parent = target.parent
    if not parent.is_dir():
        raise CowfsError(f"target directory {parent} does not exist")
    if OWN_FILE.fullmatch(target.name) or target == store_path(source_path):
        raise CowfsError(
            f"target {target} is named like a file of cowfs's own; choose another name"
        )
    if target.resolve().is_relative_to(mountpoint.resolve()):
        raise CowfsError(f"target {target} lies inside the mountpoint {mountpoint}")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if target.is_symlink():
            raise CowfsError(f"target {target} is a dangling symbolic link") from None
        return
    if (st.st_dev, st.st_ino) == (source.st_dev, source.st_ino):
        raise CowfsError(f"target {target} is the source itself")
    bitmaps = store_path(source_path)
    if bitmaps.exists() and os.path.samefile(bitmaps, target):
        raise CowfsError(f"target {target} is the bitmap file of the source")
    if not os.path.isfile(target):
        raise CowfsError(f"target {target} exists and is not a regular file")
    if not force:
        raise CowfsError(f"target {target} exists (use --force to overwrite it)")


def check_backing(backing: Path, source: os.stat_result, target: Path) -> None:
    """The previous link of a chain: an existing regular file, neither source nor target,
    on a chain whose every link's record says complete (a link that is not would make
    the new one restore wrong data, whatever its own record said)."""
    try:
        st = os.stat(backing)
    except OSError as e:
        raise CowfsError(f"backing file {backing}: {e.strerror}") from None
    if not os.path.isfile(backing):
        raise CowfsError(f"backing file {backing} is not a regular file")
    if (st.st_dev, st.st_ino) == (source.st_dev, source.st_ino):
        raise CowfsError(f"backing file {backing} is the source itself")
    for link in chain.links(backing):  # the new target must not read through itself
        if target.exists() and link.path.exists() and os.path.samefile(link.path, target):
            raise CowfsError(f"target {target} is part of the backing chain of {backing}")
        if link.problem is not None:
            where = "" if link.path == backing else f" (in the chain of {backing})"
            raise CowfsError(f"backing file {link.path}{where} cannot be trusted: {link.problem}")
