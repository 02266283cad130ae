"""Checks of a mount request before anything is created, locked or mounted.

Every refusal is a CowfsError with one line that names the culprit. Never
changes anything on disk: a refused request leaves no trace.
"""

import errno
import os
from pathlib import Path

from .errors import CowfsError
from .target.qcow2 import backing_name

MIN_CLUSTER = 4 << 10
MAX_CLUSTER = 16 << 20


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


def check_target(target: Path, source: os.stat_result, mountpoint: Path, force: bool) -> None:
    parent = target.parent
    if not parent.is_dir():
        raise CowfsError(f"target directory {parent} does not exist")
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
    if not os.path.isfile(target):
        raise CowfsError(f"target {target} exists and is not a regular file")
    if not force:
        raise CowfsError(f"target {target} exists (use --force to overwrite it)")


def check_backing(backing: Path, source: os.stat_result, target: Path) -> None:
    """The previous link of a chain: an existing regular file, neither source nor target."""
    try:
        st = os.stat(backing)
    except OSError as e:
        raise CowfsError(f"backing file {backing}: {e.strerror}") from None
    if not os.path.isfile(backing):
        raise CowfsError(f"backing file {backing} is not a regular file")
    if (st.st_dev, st.st_ino) == (source.st_dev, source.st_ino):
        raise CowfsError(f"backing file {backing} is the source itself")
    link: Path | None = backing
    seen: set[tuple[int, int]] = set()
    while link is not None:  # the new target must not read through itself
        st = os.stat(link)
        if (st.st_dev, st.st_ino) in seen:
            raise CowfsError(f"the backing chain of {backing} loops at {link}")
        seen.add((st.st_dev, st.st_ino))
        if target.exists() and os.path.samefile(link, target):
            raise CowfsError(f"target {target} is part of the backing chain of {backing}")
        name = backing_name(link)
        link = None if name is None else link.parent / name
        if link is not None and not link.exists():
            raise CowfsError(f"backing file {link} of the chain of {backing} is missing")
