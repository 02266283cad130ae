"""The mount's `.views` directory: `.views/<job>/<image>` (and `<image>.dirty` for an
incremental) for every open view, as inodes, names and attributes for fs.py.

Shown only while a view is open, so a mount without one lists its images and
nothing else. Views come and go with their jobs, so the kernel may not cache their
entries or attributes; their content never changes, so it may cache that.
"""

import errno
import os
import stat
from collections.abc import Callable

import pyfuse3

from .view import DIRTY_SUFFIX, View

NAME = b".views"
DIR = 1 << 40
"""The inode of `.views`; a job's directory is JOBS + its id, a file FILES + id << 16 + n."""
JOBS = 1 << 41
FILES = 1 << 42


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class ViewFile:
    """An open view (or its dirty extents): reads only."""

    def __init__(self, inode: int, view: View, dirty: bool) -> None:
        self.inode = inode
        self.view = view
        self.dirty = dirty

    async def read(self, offset: int, size: int) -> bytes:
        if self.dirty:
            return (self.view.dirty_extents() or b"")[offset : offset + size]
        return await self.view.read(offset, size)


class ViewTree:
    def __init__(self, views: Callable[[], dict[int, list[View]]], created_ns: int) -> None:
        """`views`: the open views by job id, asked afresh each time (they end)."""
        self._views = views
        self._created_ns = created_ns
        self._held: dict[int, tuple[ViewFile, int]] = {}
        """Files open now, by inode, with how many opens: they stay answerable after their
        job ends (reads then fail with EIO), so a reader sees why, not a vanished file."""

    def hold(self, f: ViewFile) -> None:
        _, count = self._held.get(f.inode, (f, 0))
        self._held[f.inode] = (f, count + 1)

    def drop(self, f: ViewFile) -> None:
        held, count = self._held[f.inode]
        if count == 1:
            del self._held[f.inode]
        else:
            self._held[f.inode] = (held, count - 1)

    def owns(self, inode: int) -> bool:
        return inode >= DIR

    def shown(self) -> bool:
        return bool(self._views())

    # -- names ---------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int:
        if parent == DIR:
            if name.isdigit() and int(name) in self._views():
                return JOBS + int(name)
        elif JOBS <= parent < FILES:
            for inode, entry in self._files(parent - JOBS):
                if entry == name:
                    return inode
        raise _error(errno.ENOENT)

    def entries(self, inode: int) -> list[tuple[int, bytes]]:
        """A directory's (inode, name) pairs; ENOTDIR for a file, ENOENT once gone."""
        if inode == DIR:
            return [(JOBS + job, str(job).encode()) for job in sorted(self._views())]
        if JOBS <= inode < FILES:
            if inode - JOBS not in self._views():
                raise _error(errno.ENOENT)
            return self._files(inode - JOBS)
        raise _error(errno.ENOTDIR)

    def _files(self, job: int) -> list[tuple[int, bytes]]:
        out = []
        for n, view in enumerate(self._views().get(job, [])):
            name = os.fsencode(view.name)
            out.append((FILES + (job << 16) + 2 * n, name))
            if view.dirty_extents() is not None:
                out.append((FILES + (job << 16) + 2 * n + 1, name + DIRTY_SUFFIX.encode()))
        return out

    def file(self, inode: int) -> ViewFile:
        if inode < FILES:
            raise _error(errno.EISDIR)
        job, n = divmod(inode - FILES, 1 << 16)
        views = self._views().get(job, [])
        if n // 2 < len(views):
            return ViewFile(inode, views[n // 2], dirty=bool(n % 2))
        if inode in self._held:
            return self._held[inode][0]
        raise _error(errno.ENOENT)

    # -- attributes ----------------------------------------------------------------------

    def attrs(self, inode: int, attrs: pyfuse3.EntryAttributes) -> None:
        attrs.attr_timeout = attrs.entry_timeout = 0
        if inode < FILES:
            self.entries(inode)  # ENOENT once the job's views are gone
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._created_ns
            return
        f = self.file(inode)
        job = f.view.job
        st = os.fstat(job.source_fd)
        attrs.st_mode = stat.S_IFREG | (stat.S_IMODE(st.st_mode) & 0o444)
        attrs.st_nlink = 1
        attrs.st_uid, attrs.st_gid = st.st_uid, st.st_gid
        attrs.st_size = len(f.view.dirty_extents() or b"") if f.dirty else job.size
        attrs.st_blocks = -(-attrs.st_size // 512)
        assert job.point_in_time is not None
        pit = int(job.point_in_time.timestamp() * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = pit
