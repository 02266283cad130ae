"""Claims: one daemon at a time owns a name (a target, a mountpoint), however it is spelled.

A claim is an flock on a lock file in cowfs's run directory. The lock file is named
after the real directory that holds the name (its device and inode) and the name
itself, so every spelling of a path (relative, with `..`, through symlinked
directories) meets the same claim. The kernel drops an flock when its holder dies,
so a crashed daemon leaves no stale claim. A check made after taking the claim
cannot race with another cowfs; `rename_noreplace` keeps a file that appears from
elsewhere from being replaced by accident.

Beside a mountpoint's claim lives the mount's control socket (control.py), found
by the same key: it outlives the mount while the job still copies.
"""

import ctypes
import errno
import fcntl
import hashlib
import os
from pathlib import Path

from .errors import CowfsError
from .libc import libc

RUN_DIR_MODE = 0o700


def run_dir() -> Path:
    """cowfs's run directory, private to this user: /run/cowfs for root."""
    uid = os.geteuid()
    if uid == 0:
        path = Path("/run/cowfs")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "cowfs"
    else:
        path = Path(f"/tmp/cowfs-{uid}")
    try:
        path.mkdir(mode=RUN_DIR_MODE, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise CowfsError(f"cannot use the run directory {path}: {e.strerror}") from None
    if st.st_uid != uid:  # /tmp is shared: never trust a directory someone else made
        raise CowfsError(f"the run directory {path} belongs to another user")
    return path


def path_key(path: Path) -> str:
    """One key for every spelling of `path` (which need not exist; its directory must)."""
    path = Path.cwd() / path  # not normalised: `..` after a symlink is the kernel's to resolve
    if path.is_symlink():
        path = path.resolve()
    st = os.stat(path.parent)
    name = os.fsencode(path.name)
    return hashlib.sha256(b"%x:%x:" % (st.st_dev, st.st_ino) + name).hexdigest()[:32]


def claim_file(kind: str, path: Path, suffix: str) -> Path:
    """The run directory's file of `kind` for `path`: `.lock` for the claim, `.sock` ..."""
    return run_dir() / f"{kind}-{path_key(path)}{suffix}"


def image_entry(source: Path) -> Path:
    """Where a mount notes which mountpoint serves `source` (its real path): how
    `cowfs bitmap` finds the daemon that owns a mounted image's bitmaps."""
    return claim_file("image", source.resolve(), ".mount")


class Claim:
    """Exclusive ownership of `path` as a `kind` ("target" or "mount") until released."""

    def __init__(self, lock: Path, fd: int) -> None:
        self.lock = lock
        self._fd: int | None = fd

    @classmethod
    def take(cls, kind: str, path: Path, what: str) -> "Claim":
        """Claim `path`, or raise CowfsError naming the daemon that holds it."""
        try:
            lock = claim_file(kind, path, ".lock")
        except OSError as e:
            raise CowfsError(f"{what} {path}: {e.strerror}") from None
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CowfsError(
                    f"{what} {path} is in use by another cowfs job (pid {holder})"
                ) from None
            if _same_file(fd, lock):  # not a lock file its last holder unlinked meanwhile
                claim = cls(lock, fd)
                claim.held_by(os.getpid())
                return claim
            os.close(fd)

    def held_by(self, pid: int) -> None:
        """Name the holder (after a fork, the daemon), for the messages of those refused."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, b"%d\n" % pid, 0)

    def release(self) -> None:
        """Unlink, then unlock: whoever opened the old file before sees it is gone."""
        if self._fd is None:
            return
        self.lock.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (renameat2).

    Filesystems without RENAME_NOREPLACE get link + unlink, which fails the same way;
    those without hard links either (some FUSE filesystems) a check, then a rename:
    racy against other programs, never against another cowfs, which the claim keeps out."""
    if not libc.renameat2(
        _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE
    ):
        return
    err = ctypes.get_errno()
    if err not in _UNSUPPORTED:
        raise OSError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)
