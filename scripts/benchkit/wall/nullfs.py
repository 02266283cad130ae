"""The bare pyfuse3 file system of bench phase (m): one file, whose write is one pwrite.

    python nullfs.py BACKING MOUNTPOINT [--writeback-cache]

Serves BACKING as MOUNTPOINT/<its name> in the foreground until unmounted. A write is
`os.pwrite` into BACKING and nothing else -- no bitmap, no barrier, no copy -- so what a
writer loses through it against BACKING itself is what FUSE and pyfuse3 (its binding,
its trio loop, one Python process) cost, before any of cowfs's own work. Mounted with
pyfuse3's default options and cowfs's attribute timeout, as cowfs mounts.
"""

import argparse
import errno
import os
import stat

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
FILE = ROOT + 1
ATTR_TIMEOUT = 1.0
"""cowfs's (cowfs/fs.py)."""


class NullFS(pyfuse3.Operations):
    def __init__(self, backing: str, writeback_cache: bool) -> None:
        super().__init__()
        self.enable_writeback_cache = writeback_cache
        self.fd = os.open(backing, os.O_RDWR)
        self.name = os.fsencode(os.path.basename(backing))

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT
        a.st_blksize = 4096
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode == FILE:
            st = os.fstat(self.fd)
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = st.st_size
            a.st_blocks = st.st_blocks
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = (
                st.st_atime_ns,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == FILE and fields.update_size:
            os.ftruncate(self.fd, attr.st_size)
        return self._attrs(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=FILE)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fd)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--writeback-cache", action="store_true", help="the kernel's writeback cache")
    a = p.parse_args()
    fs = NullFS(a.backing, a.writeback_cache)
    options = set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=nullfs"}
    pyfuse3.init(fs, a.mountpoint, options)
    try:
        trio.run(pyfuse3.main)  # returns once unmounted
    finally:
        pyfuse3.close(unmount=True)
        os.close(fs.fd)


if __name__ == "__main__":
    main()
