"""The FUSE operations: pyfuse3 over node objects, behind one typed error boundary.

The mount's root lists its images, named like their sources, and `.views` while
a view is open (viewtree.py), nothing else: job control is a socket outside the
mount, so no image name can shadow it. A node answers for its own attributes and
I/O; every mutating operation of an image goes through its Disk (barrier,
copy-before-write, bitmaps). Handlers raise OSError with an errno for what a
caller did wrong; `_boundary` turns that into the errno and anything else (a
bug) into failed backups plus EIO, since pyfuse3 tears the mount down on any
exception but FUSEError.
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

from . import fileattrs, viewtree
from .barrier import Fence
from .busypoll import BusyPoller
from .disk import Disk
from .registry import Registry
from .transfer import read_cached
from .viewtree import ViewFile, ViewTree

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
ATTR_TIMEOUT = 1.0
"""Only this mount changes the sources (they are locked), so the kernel may cache attributes."""


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class ImageNode:
    """A live image: reads from the source, writes through the Disk."""

    def __init__(self, inode: int, disk: Disk) -> None:
        self.inode = inode
        self.disk = disk
        self.name = os.fsencode(disk.name)

    def attrs(self, attrs: pyfuse3.EntryAttributes) -> None:
        fileattrs.fill(attrs, self.disk.fd)

    async def setattr(self, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
        if fields.update_size:
            await self.disk.truncate(attr.st_size)
        with self.disk.attributes() as fd:
            fileattrs.apply(fd, attr, fields)

    async def open(self, flags: int) -> None:
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            # libfuse asks for atomic O_TRUNC: no setattr follows, so truncate here
            await self.disk.truncate(0)

    async def read(self, offset: int, size: int) -> memoryview:
        fd = self.disk.fd
        view = memoryview(bytearray(size))
        got = read_cached(fd, view, offset)  # from the page cache, or else in a thread
        if got is None or got < size:
            got = await trio.to_thread.run_sync(os.preadv, fd, [view], offset)
        return view[:got]

    async def write(self, offset: int, data: bytes) -> int:
        return await self.disk.write(offset, data)

    async def fsync(self, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, self.disk.fd)


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
            for node in self.nodes.values():
                for job in list(node.disk.jobs):
                    job.fail(f"internal error in {handler.__name__}: {e!r}")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class LiveFS(pyfuse3.Operations):
    """A directory of nodes; the images' writes copy old clusters first."""

    def __init__(self, registry: Registry, poller: BusyPoller, writeback_cache: bool) -> None:
        super().__init__()
        self.enable_writeback_cache = writeback_cache
        self.registry = registry
        self.poller = poller
        self.nodes = {
            ROOT + 1 + i: ImageNode(ROOT + 1 + i, disk)
            for i, disk in enumerate(registry.disks.values())
        }
        self.names = {node.name: node for node in self.nodes.values()}
        self.created_ns = time.time_ns()
        self.views = ViewTree(registry.views, self.created_ns)
        self.handles: dict[int, ImageNode | ViewFile] = {}
        self.fences: dict[int, Fence] = {}
        """Handles the barrier opened to fence the kernel's cache: their fsync waits."""
        self.next_fh = 1

    def _node(self, inode: int) -> ImageNode:
        try:
            return self.nodes[inode]
        except KeyError:
            raise _error(errno.EISDIR if inode == ROOT else errno.ENOENT) from None

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
        elif self.views.owns(inode):
            self.views.attrs(inode, attrs)
        else:
            self._node(inode).attrs(attrs)
        return attrs

    @_boundary
    async def lookup(self, parent_inode, name, ctx):
        if parent_inode == ROOT and name in self.names:
            return self._attrs(self.names[name].inode)
        if parent_inode == ROOT and name == b"..":
            return self._attrs(ROOT)
        if parent_inode == ROOT and name == viewtree.NAME and self.views.shown():
            return self._attrs(viewtree.DIR)
        if self.views.owns(parent_inode):
            return self._attrs(self.views.lookup(parent_inode, name))
        raise _error(errno.ENOENT)

    @_boundary
    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    @_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == ROOT:
            raise _error(errno.EPERM)
        if self.views.owns(inode):
            raise _error(errno.EROFS)
        await self._node(inode).setattr(attr, fields)
        return self._attrs(inode)

    @_boundary
    async def statfs(self, ctx):
        first = next(iter(self.nodes.values()))
        vfs = os.fstatvfs(first.disk.fd)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, name, getattr(vfs, name))
        data.f_files, data.f_ffree, data.f_favail = len(self.nodes) + 1, 0, 0
        data.f_namemax = vfs.f_namemax
        return data

    # -- files ------------------------------------------------------------------

    @_boundary
    async def open(self, inode, flags, ctx):
        handle: ImageNode | ViewFile
        if self.views.owns(inode):
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                raise _error(errno.EROFS)
            handle = self.views.file(inode)
            self.views.hold(handle)
        else:
            handle = self._node(inode)
            await handle.open(flags)
        self.registry.open_files += 1
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        fence = self.registry.barrier.fence_of(ctx.pid)
        if fence is not None:
            self.fences[fh] = fence
        # A view bypasses the page cache: what a reader got must never outlive what the
        # view may still serve (a released range, a failed job: EIO). A fence keeps the
        # cache: the kernel drops it on other opens, writing back dirty pages one at a
        # time first, which held a fence for tens of milliseconds.
        return pyfuse3.FileInfo(
            fh=fh, direct_io=isinstance(handle, ViewFile), keep_cache=fence is not None
        )

    @_boundary
    async def read(self, fh, off, size):
        self.poller.request_seen()
        return await self.handles[fh].read(off, size)

    @_boundary
    async def write(self, fh, off, buf):
        self.poller.request_seen()
        return await self._image_handle(fh).write(off, buf)

    @_boundary
    async def fsync(self, fh, datasync):
        handle = self.handles[fh]
        if fh in self.fences:
            await self.fences[fh].reached()
        elif isinstance(handle, ImageNode):
            await handle.fsync(datasync)

    def _image_handle(self, fh: int) -> ImageNode:
        handle = self.handles[fh]
        if not isinstance(handle, ImageNode):
            raise _error(errno.EROFS)
        return handle

    @_boundary
    async def flush(self, fh):
        pass  # durability is fsync's job, as for any local file

    @_boundary
    async def release(self, fh):
        handle = self.handles.pop(fh)
        self.fences.pop(fh, None)
        if isinstance(handle, ViewFile):
            self.views.drop(handle)
        self.registry.open_files -= 1

    # -- the root directory -------------------------------------------------------

    @_boundary
    async def opendir(self, inode, ctx):
        if inode == ROOT:
            return ROOT
        if self.views.owns(inode):
            self.views.entries(inode)  # ENOTDIR, or ENOENT once gone
            return inode
        raise _error(errno.ENOTDIR)

    @_boundary
    async def readdir(self, fh, start_id, token):
        if fh == ROOT:
            entries = [(inode, node.name) for inode, node in self.nodes.items()]
            if self.views.shown():
                entries.append((viewtree.DIR, viewtree.NAME))
        else:
            entries = self.views.entries(fh)
        for inode, name in entries:  # inodes ascend: start_id says where the last call ended
            if inode > start_id and not pyfuse3.readdir_reply(
                token, name, self._attrs(inode), inode
            ):
                return

    @_boundary
    async def releasedir(self, fh):
        pass
