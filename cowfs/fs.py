"""The FUSE operations: a thin pyfuse3 adapter presenting the source as one live file.

The mount's root lists exactly one file, named like the source, and nothing else
(job control is a socket outside the mount: no image name can shadow it). Every
mutating operation asks the job for copy-before-write first, then touches the source.
Must never raise anything but FUSEError out of a handler: pyfuse3 would tear
the mount down. One error boundary (`_boundary`) turns OSError into its errno
and anything else into a failed backup plus EIO.
"""

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

from .bitmap import BitmapStore
from .busypoll import BusyPoller
from .job import Job
from .transfer import read_cached

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
LIVE = ROOT + 1
ATTR_TIMEOUT = 1.0
"""Only this mount changes the source (it is locked), so the kernel may cache attributes."""


def _boundary(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapper(self: "LiveFS", *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            log.exception("internal error in %s", handler.__name__)
            self.job.fail(f"internal error in {handler.__name__}: {e!r}")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class LiveFS(pyfuse3.Operations):
    """A directory with one file, the live image; writes copy old clusters first."""

    def __init__(
        self,
        job: Job,
        name: str,
        poller: BusyPoller,
        dirty: BitmapStore,
    ) -> None:
        super().__init__()
        self.poller = poller
        self.dirty = dirty  # every change to the source is recorded in every dirty bitmap
        self.job = job
        self.fd = job.source_fd
        self.name = name.encode()
        self.created_ns = time.time_ns()

    # -- attributes -----------------------------------------------------------

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.st_blksize = 4096
        if inode == ROOT:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.created_ns
            return attrs
        st = os.fstat(self.fd)
        attrs.st_mode = st.st_mode
        attrs.st_nlink = 1
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_size = st.st_size
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    @_boundary
    async def lookup(self, parent_inode, name, ctx):
        if parent_inode == ROOT and name == self.name:
            return self._attrs(LIVE)
        if parent_inode == ROOT and name == b"..":
            return self._attrs(ROOT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_boundary
    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    @_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode != LIVE:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size:
            await self._truncate(attr.st_size)
        if fields.update_mode:
            os.fchmod(self.fd, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(
                self.fd,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
            )
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(self.fd)
            os.utime(
                self.fd,
                ns=(
                    attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
                ),
            )
        return self._attrs(inode)

    @_boundary
    async def statfs(self, ctx):
        vfs = os.fstatvfs(self.fd)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, name, getattr(vfs, name))
        data.f_files, data.f_ffree, data.f_favail = 2, 0, 0
        data.f_namemax = vfs.f_namemax
        return data

    # -- the live file ----------------------------------------------------------

    async def _truncate(self, size: int) -> None:
        """Resize the source; shrinking destroys data, which is copied first."""
        if size < self.job.size:
            await self.job.copy_before_write(size, self.job.size - size)
        old = os.fstat(self.fd).st_size
        self.dirty.mark(min(old, size), abs(old - size))
        os.ftruncate(self.fd, size)

    @_boundary
    async def open(self, inode, flags, ctx):
        if inode != LIVE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            # libfuse asks for atomic O_TRUNC: no setattr follows, so truncate here
            await self._truncate(0)
        return pyfuse3.FileInfo(fh=LIVE)

    @_boundary
    async def read(self, fh, off, size):
        self.poller.request_seen()
        view = memoryview(bytearray(size))
        got = read_cached(self.fd, view, off)  # from the page cache, or else in a thread
        if got is None or got < size:
            got = await trio.to_thread.run_sync(os.preadv, self.fd, [view], off)
        return view[:got]

    @_boundary
    async def write(self, fh, off, buf):
        self.poller.request_seen()
        await self.job.copy_before_write(off, len(buf))
        self.dirty.mark(off, len(buf))
        return os.pwrite(self.fd, buf, off)

    @_boundary
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, self.fd)

    @_boundary
    async def flush(self, fh):
        pass  # durability is fsync's job, as for any local file

    @_boundary
    async def release(self, fh):
        pass  # the source stays open for the whole mount

    # -- the root directory -------------------------------------------------------

    @_boundary
    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    @_boundary
    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attrs(LIVE), 1)

    @_boundary
    async def releasedir(self, fh):
        pass
