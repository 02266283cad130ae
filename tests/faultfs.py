"""faultfs: a FUSE passthrough that fails chosen byte ranges, for fault tests of cowfs.

Usage: ``python tests/faultfs.py BACKING_DIR MOUNTPOINT`` (stays in the foreground).

The mount shows the regular files of BACKING_DIR (flat: no subdirectories) and
passes reads, writes, fsync, truncate, stat and statfs through to them, except
where a *fault* says otherwise: a request of a chosen operation (read, write,
fsync) on a chosen file (by its current name) that overlaps a chosen byte range fails with an errno
(default EIO), for the first N matching requests or always, optionally after a
delay. Disks fail this way, and QEMU's blkdebug driver injects errors the same
way; a mock could not show what cowfs does with a real EIO from the kernel.

Faults are set at run time through the hidden control file ``MOUNTPOINT/.faultfs``:
each write() to it is one JSON command,
``{"clear": true, "add": [{"name": "disk.img", "op": "read", "offset": 0,
"length": 4096, "times": 1, "errno": 5, "delay": 0.0}]}`` (both keys optional;
clear first), and a read returns the state as JSON: the faults with their hits
and remaining counts, request counters per operation, and the last failed requests.
Not xattrs: a filesystem that answers getxattr costs a round trip before every write.

Files are opened with direct_io, so every read and write of a caller becomes
FUSE requests at the caller's offsets: no page cache hides a fault or retries it
through readahead. flock is left to the kernel (no lock handlers), which then
emulates it locally; SEEK_DATA/SEEK_HOLE read as all data (pyfuse3 has no lseek).
Must exit cleanly, unmounting, on unmount, SIGTERM and SIGINT.
"""

import errno
import json
import logging
import os
import signal
import stat
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("faultfs")

CONTROL_NAME = ".faultfs"
FSTYPE = "fuse.faultfs"
ROOT = pyfuse3.ROOT_INODE
CONTROL = ROOT + 1
OPS = ("read", "write", "fsync")
ALL = 1 << 62
"""A length that covers any file."""
LOG_KEEP = 100
"""Failed requests remembered for the state read: enough for any one test."""


@dataclass
class Fault:
    """Requests of `op` on file `name` overlapping [offset, offset+length) fail.

    `times` None fails every match; an int fails that many matches, then the
    fault stays listed but inactive. `errno` 0 with a `delay` only slows requests.
    """

    name: str
    op: str = "read"
    offset: int = 0
    length: int = ALL
    times: int | None = None
    errno: int = errno.EIO
    delay: float = 0.0
    hits: int = 0

    @classmethod
    def parse(cls, raw: Any) -> "Fault":
        if not isinstance(raw, dict):
            raise ValueError("a fault must be a JSON object")
        known = {"name", "op", "offset", "length", "times", "errno", "delay"}
        if set(raw) - known or "name" not in raw:
            raise ValueError(f"bad fault keys: {sorted(raw)}")
        fault = cls(**raw)
        if fault.op not in OPS or fault.offset < 0 or fault.length <= 0:
            raise ValueError(f"bad fault {raw}")
        if fault.times is not None and fault.times < 0:
            raise ValueError(f"bad times in {raw}")
        return fault

    @property
    def active(self) -> bool:
        return self.times is None or self.hits < self.times

    def matches(self, name: str, op: str, offset: int, size: int) -> bool:
        if not self.active or name != self.name or op != self.op:
            return False
        if op == "fsync":
            return True
        return offset < self.offset + self.length and self.offset < offset + max(size, 1)


class FaultFS(pyfuse3.Operations):
    """A flat passthrough of BACKING_DIR's regular files, with injected faults."""

    def __init__(self, backing: Path) -> None:
        super().__init__()
        self.backing = backing
        self.inodes: dict[str, int] = {}
        self.names: dict[int, str] = {}
        self.next_inode = CONTROL + 1
        """Never reused: after a rename or unlink, a new name must not get an inode that
        another name (and the kernel's cache) still has."""
        self.files: dict[int, tuple[int, int]] = {}  # fh -> (backing fd, inode)
        self.snapshots: dict[int, bytes] = {}  # control fh -> state at open
        self.next_fh = 1
        self.faults: list[Fault] = []
        self.requests = dict.fromkeys(OPS, 0)
        self.failed: deque[dict[str, Any]] = deque(maxlen=LOG_KEEP)

    # -- faults ----------------------------------------------------------------

    def state(self) -> bytes:
        faults = [
            asdict(f) | {"remaining": None if f.times is None else max(0, f.times - f.hits)}
            for f in self.faults
        ]
        return json.dumps(
            {"faults": faults, "requests": self.requests, "failed": list(self.failed)}
        ).encode()

    def command(self, data: bytes) -> None:
        try:
            cmd = json.loads(data)
            if not isinstance(cmd, dict) or set(cmd) - {"clear", "add"}:
                raise ValueError(f"bad command {cmd!r}")
            new = [Fault.parse(raw) for raw in cmd.get("add", [])]
        except (ValueError, TypeError) as e:
            log.warning("control: %s", e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if cmd.get("clear"):
            self.faults.clear()
        self.faults.extend(new)
        log.info("faults now: %s", self.faults)

    async def inject(self, name: str, op: str, offset: int, size: int) -> None:
        """Count the request; fail it (after the fault's delay) if a fault matches."""
        self.requests[op] += 1
        for fault in self.faults:
            if fault.matches(name, op, offset, size):
                fault.hits += 1
                if fault.delay:
                    await trio.sleep(fault.delay)
                if fault.errno:
                    self.failed.append(
                        {"name": name, "op": op, "offset": offset, "size": size}
                        | {"errno": fault.errno}
                    )
                    raise pyfuse3.FUSEError(fault.errno)
                return

    # -- names and attributes ----------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.backing / name

    def _inode(self, name: str) -> int:
        if name not in self.inodes:
            inode = self.next_inode
            self.next_inode += 1
            self.inodes[name] = inode
            self.names[inode] = name
        return self.inodes[name]

    def _name(self, inode: int) -> str:
        try:
            return self.names[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.attr_timeout = 0  # the test changes BACKING_DIR behind our back
        attrs.entry_timeout = 0
        if inode in (ROOT, CONTROL):
            st = os.stat(self.backing)
            attrs.st_mode = stat.S_IFDIR | 0o755 if inode == ROOT else stat.S_IFREG | 0o600
            attrs.st_nlink = 2 if inode == ROOT else 1
        else:
            try:
                st = os.lstat(self._path(self._name(inode)))
            except (OSError, ValueError):  # ValueError: a gone name (NUL)
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            if not stat.S_ISREG(st.st_mode):
                raise pyfuse3.FUSEError(errno.ENOENT)
            attrs.st_mode = st.st_mode
            attrs.st_nlink = 1
            attrs.st_size = st.st_size
            attrs.st_blocks = st.st_blocks
            attrs.st_uid, attrs.st_gid = st.st_uid, st.st_gid
        attrs.st_blksize = 4096
        attrs.st_atime_ns, attrs.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        text = os.fsdecode(name)
        if text == CONTROL_NAME:
            return self._attrs(CONTROL)
        if text in (".", ".."):
            return self._attrs(ROOT)
        if "/" in text:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            st = os.lstat(self._path(text))
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self._inode(text))

    async def forget(self, inode_list):
        pass  # inode numbers stay valid for the life of the mount

    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == CONTROL:
            return self._attrs(inode)  # O_TRUNC of the control file: nothing to do
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        path = self._path(self._name(inode))
        try:
            if fields.update_size:
                os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(
                    path,
                    attr.st_uid if fields.update_uid else -1,
                    attr.st_gid if fields.update_gid else -1,
                )
            if fields.update_atime or fields.update_mtime:
                st = os.stat(path)
                os.utime(
                    path,
                    ns=(
                        attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                        attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
                    ),
                )
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return self._attrs(inode)

    async def statfs(self, ctx):
        vfs = os.statvfs(self.backing)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, name, getattr(vfs, name))
        for name in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(vfs, name))
        return data

    # -- files -------------------------------------------------------------------

    def _open_backing(self, name: str, flags: int, mode: int = 0o600) -> int:
        drop = os.O_NOCTTY | os.O_DIRECT | os.O_TRUNC  # the kernel sends truncation as setattr
        try:
            return os.open(self._path(name), (flags & ~drop) | os.O_CLOEXEC, mode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    def _new_fh(self) -> int:
        fh = self.next_fh
        self.next_fh += 1
        return fh

    async def open(self, inode, flags, ctx):
        fh = self._new_fh()
        if inode == CONTROL:
            self.snapshots[fh] = self.state()
        elif inode == ROOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        else:
            self.files[fh] = (self._open_backing(self._name(inode), flags), inode)
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def create(self, parent_inode, name, mode, flags, ctx):
        text = os.fsdecode(name)
        if parent_inode != ROOT or text == CONTROL_NAME or "/" in text:
            raise pyfuse3.FUSEError(errno.EPERM)
        fd = self._open_backing(text, flags | os.O_CREAT, stat.S_IMODE(mode))
        fh = self._new_fh()
        self.files[fh] = (fd, self._inode(text))
        return pyfuse3.FileInfo(fh=fh, direct_io=True), self._attrs(self._inode(text))

    async def unlink(self, parent_inode, name, ctx):
        text = os.fsdecode(name)
        if parent_inode != ROOT or text == CONTROL_NAME:
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            os.unlink(self._path(text))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        self._forget_name(text)

    def _forget_name(self, name: str) -> None:
        """`name` is gone: handles still open on its inode match no fault any more."""
        inode = self.inodes.pop(name, None)
        if inode is not None:
            self.names[inode] = f"\0gone-{inode}"  # a NUL: no fault or file has that name

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        """Faults name files: an open file renamed (cowfs's tmp-then-rename) takes the new
        name's faults from then on. RENAME_NOREPLACE and RENAME_EXCHANGE are refused."""
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        if ROOT not in (parent_inode_old, parent_inode_new) or flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if CONTROL_NAME in (old, new) or "/" in old + new:
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            os.rename(self._path(old), self._path(new))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        inode = self._inode(old)
        self._forget_name(new)
        del self.inodes[old]
        self.inodes[new] = inode
        self.names[inode] = new

    async def read(self, fh, off, size):
        if fh in self.snapshots:
            return self.snapshots[fh][off : off + size]
        fd, inode = self.files[fh]
        await self.inject(self._name(inode), "read", off, size)
        try:
            return os.pread(fd, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def write(self, fh, off, buf):
        if fh in self.snapshots:
            self.command(bytes(buf))
            return len(buf)
        fd, inode = self.files[fh]
        await self.inject(self._name(inode), "write", off, len(buf))
        try:
            return os.pwrite(fd, buf, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def fsync(self, fh, datasync):
        if fh in self.snapshots:
            return
        fd, inode = self.files[fh]
        await self.inject(self._name(inode), "fsync", 0, 0)
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def flush(self, fh):
        pass

    async def release(self, fh):
        if fh in self.snapshots:
            del self.snapshots[fh]
        else:
            os.close(self.files.pop(fh)[0])

    # -- the directory -------------------------------------------------------------

    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh, start_id, token):
        names = sorted(e.name for e in os.scandir(self.backing) if e.is_file(follow_symlinks=False))
        for index, name in enumerate(names[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name), self._attrs(self._inode(name)), index
            ):
                return

    async def releasedir(self, fh):
        pass


SIGNALS = {signal.SIGTERM, signal.SIGINT}


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_terminate_on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signals(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*SIGNALS) as signals:
        # Blocked since before the mount: a signal that came early is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        task_status.started()
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: faultfs.py BACKING_DIR MOUNTPOINT", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if os.environ.get("FAULTFS_DEBUG") else logging.WARNING,
        format="faultfs: %(message)s",
    )
    backing, mountpoint = Path(argv[0]).absolute(), Path(argv[1]).absolute()
    options = set(pyfuse3.default_options) | {
        "fsname=faultfs",
        "subtype=faultfs",
        "auto_unmount",
        "default_permissions",
    }
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # until trio listens for them
    pyfuse3.init(FaultFS(backing), str(mountpoint), options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
