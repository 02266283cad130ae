"""The live restore's FUSE operations: one read-write file, DEST as it fills.

The mount's root holds one file, named like DEST. Reads of clusters not yet
restored restore them first (copy on read); writes go to DEST through the restore,
which brings in the rest of a cluster they cover in part. Once every cluster is
restored the file is DEST itself, read and written directly. The image's size is
fixed: it is a disk.
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

from . import fileattrs
from .restore import Restore
from .transfer import read_cached

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
FILE = ROOT + 1
ATTR_TIMEOUT = 1.0


def _boundary(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """OSError becomes its errno; anything else is a bug: logged, EIO (pyfuse3 would
    tear the mount down on any other exception)."""

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class RestoreFS(pyfuse3.Operations):
    def __init__(self, restore: Restore) -> None:
        super().__init__()
        self.restore = restore
        self.name = os.fsencode(restore.dest.name)
        self.created_ns = time.time_ns()
        self.open_files = 0

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.attr_timeout = attrs.entry_timeout = ATTR_TIMEOUT
        attrs.st_blksize = 4096
        if inode == ROOT:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.created_ns
        elif inode == FILE:
            fileattrs.fill(attrs, self.restore.out.fd, self.restore.size)
        else:
            raise OSError(errno.ENOENT, "no such inode")
        return attrs

    @_boundary
    async def lookup(self, parent_inode, name, ctx):
        if parent_inode == ROOT and name == self.name:
            return self._attrs(FILE)
        if parent_inode == ROOT and name == b"..":
            return self._attrs(ROOT)
        raise OSError(errno.ENOENT, "no such file")

    @_boundary
    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    @_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode != FILE:
            raise OSError(errno.EPERM, "the root")
        if fields.update_size and attr.st_size != self.restore.size:
            raise OSError(errno.EPERM, "a restored disk keeps its size")
        fileattrs.apply(self.restore.out.fd, attr, fields)
        return self._attrs(inode)

    @_boundary
    async def open(self, inode, flags, ctx):
        if inode != FILE:
            raise OSError(errno.EISDIR, "the root")
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EPERM, "a restored disk keeps its size")
        self.open_files += 1
        return pyfuse3.FileInfo(fh=FILE)

    @_boundary
    async def read(self, fh, off, size):
        restore = self.restore
        size = max(0, min(size, restore.size - off))
        if not size:
            return b""
        first, last = restore.clusters(off, size)
        if restore.restored.find(0, first, last + 1) >= 0:
            await restore.fill(first, last)
        fd = restore.out.fd
        view = memoryview(bytearray(size))
        got = read_cached(fd, view, off)  # from the page cache, or else in a thread
        if got is None or got < size:
            got = await trio.to_thread.run_sync(os.preadv, fd, [view], off)
        return view[:got]

    @_boundary
    async def write(self, fh, off, buf):
        if off + len(buf) > self.restore.size:
            raise OSError(errno.ENOSPC, "past the end of the disk")
        return await self.restore.write(off, buf)

    @_boundary
    async def fsync(self, fh, datasync):
        await self.restore.save()

    @_boundary
    async def flush(self, fh):
        pass  # durability is fsync's job, as for any local file

    @_boundary
    async def release(self, fh):
        self.open_files -= 1

    @_boundary
    async def statfs(self, ctx):
        vfs = os.fstatvfs(self.restore.out.fd)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, name, getattr(vfs, name))
        data.f_files, data.f_ffree, data.f_favail = 2, 0, 0
        data.f_namemax = vfs.f_namemax
        return data

    @_boundary
    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise OSError(errno.ENOTDIR, "not a directory")
        return ROOT

    @_boundary
    async def readdir(self, fh, start_id, token):
        if start_id < FILE:
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE), FILE)

    @_boundary
    async def releasedir(self, fh):
        pass
