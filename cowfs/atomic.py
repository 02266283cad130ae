"""Replacing a small file so that a reader, or a crash, sees the old one or the new one,
never half: temporary file, fsync, rename, fsync of the directory."""

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(
    path: Path, data: bytes | memoryview, mode: int = 0o644, tmp: Path | None = None
) -> None:
    """`tmp`: the temporary file's name (default PATH.tmp): a unique one lets several
    writers replace one file at once, the last rename winning."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
