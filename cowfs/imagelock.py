"""QEMU-compatible image locks: the source and the target are locked the way QEMU locks a disk.

Owns the byte-range locks cowfs holds on the source and the target while a job runs, so
that QEMU and cowfs see each other: a QEMU process pointed at an image cowfs is backing up
refuses to start with its own "Failed to get "write" lock" error, and cowfs refuses an
image a QEMU process is writing. flock(2), which cowfs uses against other cowfs jobs, is
invisible to QEMU: QEMU only looks at fcntl byte-range locks.

QEMU's scheme (block/file-posix.c, util/osdep.c, include/block/block-common.h):

- A permission is one bit: consistent read 0x01, write 0x02, write unchanged 0x04,
  resize 0x08 (BLK_PERM_ALL = 0x0f since QEMU 6.2; 6.1 and older also had graph-mod,
  0x10, which no current QEMU looks at).
- Each user of an image has `perm` (what it does) and `shared` (what it lets others do).
  For every bit i, file-posix holds a shared lock (F_RDLCK, one byte) on
  RAW_LOCK_PERM_BASE + i = 100 + i if the bit is in `perm`, and on
  RAW_LOCK_SHARED_BASE + i = 200 + i if the bit is NOT in `shared`
  (raw_apply_lock_bytes, through qemu_lock_fd(fd, off, 1, false)).
- It then tests, with F_OFD_GETLK for an exclusive lock (F_WRLCK), 200 + i for every bit
  in `perm` ("Failed to get "write" lock": someone does not share what I need) and
  100 + i for every bit not in `shared` ("Failed to get shared "write" lock": someone
  does what I do not allow) (raw_check_lock_bytes via qemu_lock_fd_test(fd, off, 1,
  true)). A test on an open file description never sees that description's own locks.
- Locks are taken before they are tested (raw_handle_perm_lock, RAW_PL_PREPARE), so of
  two processes racing for the same image at least one sees the other; whoever sees a
  conflict drops the bytes it took. The locks are OFD locks (F_OFD_SETLK): they belong to
  the open file description, not to the process, and go when its last fd is closed.

What QEMU holds, measured in /proc/locks with QEMU 7.2: `qemu-io` read-write (blk_new_open:
perm consistent read + write, shares everything) holds bytes 100 and 101; `qemu-io -r`
holds 100; a writable qemu-storage-daemon export holds 100, 101 and 203. A guest disk
(blkconf_apply_backend_options: perm consistent read + write, shares consistent read and
write unchanged, plus resize when the device can resize) holds 100, 101 and 201 (and 203).

On the source cowfs is what a guest disk is, and resizes too (the live file can be
truncated): perm consistent read + write + resize, shared consistent read + write
unchanged, so bytes 100, 101, 103, 201 and 203. What QEMU does beside a running VM it then
does beside cowfs: a QEMU that opens the image read-write fails with 'Failed to get
"write" lock'; `qemu-img convert` (which does not share write) fails with 'Failed to get
shared "write" lock'; `qemu-io -r` and `qemu-img info` work.
On the target cowfs takes the same permissions and shares only consistent read, so bytes
100, 101, 103 and 201-203: nobody else may write or resize it while the job runs, and
readers may look (as with QEMU's backup target, which must stay readable for fleecing).
Whether what they read can be trusted is the record's business, not the lock's.
"""

import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Literal

from cowfs.errors import CowfsError

PERM_BASE = 100
"""RAW_LOCK_PERM_BASE: byte 100 + i is locked by whoever uses permission bit i."""
SHARED_BASE = 200
"""RAW_LOCK_SHARED_BASE: byte 200 + i is locked by whoever does not share bit i."""

CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0x01, 0x02, 0x04, 0x08
ALL = 0x0F
"""BLK_PERM_ALL: the bits QEMU locks and tests (PERM_FOREACH)."""
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
"""bdrv_perm_names() of bits 0..3: the words QEMU's own lock errors use."""

Role = Literal["source", "target"]
ROLES: dict[Role, tuple[int, int]] = {
    "source": (CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED),
    "target": (CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ),
}
"""Per role: (perm, shared), as QEMU's BlockBackend permissions."""

_FLOCK = struct.Struct("=hh4xqqi4x")
"""struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (32 bytes)."""


def lock_image(fd: int, path: Path, role: Role) -> None:
    """Hold QEMU's locks for `role` on the open file description of `fd` until it is closed.

    Raises CowfsError, holding none of these locks, when another process (QEMU, or another
    cowfs) uses the image in a way `role` cannot share, or the locks cannot be taken.
    """
    perm, shared = ROLES[role]
    taken: list[int] = []
    conflict: str | None
    try:
        for offset in _lock_bytes(perm, shared):
            if not _try_share(fd, offset):
                conflict = f"it holds an exclusive lock on byte {offset}"
                break
            taken.append(offset)
        else:
            conflict = _conflict(fd, perm, shared)
    except OSError as e:
        _unlock(fd, taken)
        raise CowfsError(f"cannot lock {role} {path}: {e.strerror}") from None
    if conflict is not None:
        _unlock(fd, taken)
        raise CowfsError(f"{role} {path} is in use by another process (e.g. QEMU): {conflict}")


def _bits(mask: int) -> list[int]:
    return [i for i in range(len(PERM_NAMES)) if mask & (1 << i)]


def _lock_bytes(perm: int, shared: int) -> list[int]:
    """raw_apply_lock_bytes: 100 + i for each used bit, 200 + i for each unshared bit."""
    return [PERM_BASE + i for i in _bits(perm)] + [SHARED_BASE + i for i in _bits(ALL & ~shared)]


def _conflict(fd: int, perm: int, shared: int) -> str | None:
    """raw_check_lock_bytes: why another description's locks forbid (perm, shared), or None."""
    for i in _bits(perm):
        if _locked_by_other(fd, SHARED_BASE + i):
            return f'it does not share the "{PERM_NAMES[i]}" permission cowfs needs'
    for i in _bits(ALL & ~shared):
        if _locked_by_other(fd, PERM_BASE + i):
            return f'it holds the "{PERM_NAMES[i]}" permission, which cowfs does not share'
    return None


def _setlk(fd: int, lock_type: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0))


def _try_share(fd: int, offset: int) -> bool:
    """qemu_lock_fd(fd, offset, 1, exclusive=false); False if an exclusive lock is in the way
    (QEMU never takes one on these bytes, but anything else may)."""
    try:
        _setlk(fd, fcntl.F_RDLCK, offset)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock(fd: int, offsets: list[int]) -> None:
    for offset in offsets:
        _setlk(fd, fcntl.F_UNLCK, offset)


def _locked_by_other(fd: int, offset: int) -> bool:
    """qemu_lock_fd_test(fd, offset, 1, exclusive=true): is the byte locked elsewhere?"""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    lock_type = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))[0]
    return lock_type != fcntl.F_UNLCK
