"""The FUSE operations: a thin pyfuse3 adapter presenting each image as a live file.

The mount's root lists the images, named like their sources, and nothing else
(job control is a socket outside the mount: no image name can shadow it). Every
mutating operation goes through the image's Disk (barrier, copy-before-write,
bitmaps). Must never raise anything but FUSEError out of a handler: pyfuse3 would
tear the mount down. One error boundary (`_boundary`) turns OSError into its
errno and anything else into failed backups plus EIO.
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

from .busypoll import BusyPoller
from .disk import Disk
from .registry import Registry
from .transfer import read_cached

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
ATTR_TIMEOUT = 1.0
"""Only this mount changes the sources (they are locked), so the kernel may cache attributes."""


def _boundary(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapper(self: "LiveFS", *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:  # a bug: no running backup can be trusted after it
            log.exception("internal error in %s", handler.__name__)
            for disk in self.disks.values():
                for job in list(disk.jobs):
                    job.fail(f"internal error in {handler.__name__}: {e!r}")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class LiveFS(pyfuse3.Operations):
    """A directory of live images; writes copy old clusters first."""

    def __init__(self, registry: Registry, poller: BusyPoller) -> None:
        super().__init__()
        self.registry = registry
        self.poller = poller
        self.disks = {ROOT + 1 + i: disk for i, disk in enumerate(registry.disks.values())}
        self.names = {os.fsencode(disk.name): inode for inode, disk in self.disks.items()}
        self.handles: dict[int, Disk] = {}
        self.next_fh = 1
        self.created_ns = time.time_ns()

    def _disk(self, inode: int) -> Disk:
        try:
            return self.disks[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

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
        st = os.fstat(self._disk(inode).fd)
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
        if parent_inode == ROOT and name in self.names:
            return self._attrs(self.names[name])
        if parent_inode == ROOT and name == b"..":
            return self._attrs(ROOT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_boundary
    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    @_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        disk = self._disk(inode)
        if fields.update_size:
            await disk.truncate(attr.st_size)
        if fields.update_mode:
            os.fchmod(disk.fd, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(
                disk.fd,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
            )
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(disk.fd)
            os.utime(
                disk.fd,
                ns=(
                    attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
                ),
            )
        return self._attrs(inode)

    @_boundary
    async def statfs(self, ctx):
        first = next(iter(self.disks.values()))
        vfs = os.fstatvfs(first.fd)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, name, getattr(vfs, name))
        data.f_files, data.f_ffree, data.f_favail = len(self.disks) + 1, 0, 0
        data.f_namemax = vfs.f_namemax
        return data

    # -- the live files ---------------------------------------------------------

    @_boundary
    async def open(self, inode, flags, ctx):
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        disk = self._disk(inode)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            # libfuse asks for atomic O_TRUNC: no setattr follows, so truncate here
            await disk.truncate(0)
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = disk
        self.registry.open_files += 1
        return pyfuse3.FileInfo(fh=fh)

    @_boundary
    async def read(self, fh, off, size):
        self.poller.request_seen()
        fd = self.handles[fh].fd
        view = memoryview(bytearray(size))
        got = read_cached(fd, view, off)  # from the page cache, or else in a thread
        if got is None or got < size:
            got = await trio.to_thread.run_sync(os.preadv, fd, [view], off)
        return view[:got]

    @_boundary
    async def write(self, fh, off, buf):
        self.poller.request_seen()
        return await self.handles[fh].write(off, buf)

    @_boundary
    async def fsync(self, fh, datasync):
        fd = self.handles[fh].fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    @_boundary
    async def flush(self, fh):
        pass  # durability is fsync's job, as for any local file

    @_boundary
    async def release(self, fh):
        del self.handles[fh]
        self.registry.open_files -= 1

    # -- the root directory -------------------------------------------------------

    @_boundary
    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    @_boundary
    async def readdir(self, fh, start_id, token):
        for inode, disk in self.disks.items():
            if inode > start_id and not pyfuse3.readdir_reply(
                token, os.fsencode(disk.name), self._attrs(inode), inode
            ):
                return

    @_boundary
    async def releasedir(self, fh):
        pass
