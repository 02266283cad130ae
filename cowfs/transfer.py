"""Moving clusters from the source to the target: the only code that reads old data.

Blocking and free of trio, so the copier can run it in a worker thread and
copy-before-write can run it inline; both get the same zero handling. Never
decides which clusters to copy or marks anything done: that is the job's.
"""

import errno
import functools
import os
from typing import Protocol

_ZERO = bytes(16 << 20)  # the largest cluster size: enough zeros for any padding


class Target(Protocol):
    def write(self, offset: int, data: memoryview) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...


@functools.cache
def _zeros(length: int) -> bytes:
    return bytes(length)


def is_zero(buf: bytearray, pos: int, length: int) -> bool:
    # startswith is a memcmp in place: 0.9 us per 64 KiB, where bytes(view) == zeros
    # copies first (2.1 us) and comparing memoryviews is 25x slower still.
    return buf[pos] == 0 and buf.startswith(_zeros(length), pos, pos + length)


class SourceError(OSError):
    """Reading the source failed; the job's source error policy decides what follows."""


class TargetError(OSError):
    """Writing the target failed; the job's target error policy decides what follows."""


def copy_range(
    source_fd: int,
    target: Target,
    offset: int,
    length: int,
    cluster_size: int,
    buf: bytearray,
    nowait: bool = False,
) -> int:
    """Copy [offset, offset+length) cluster by cluster; returns the bytes written.

    `offset` is cluster-aligned; `length` is whole clusters except at the end
    of the image. Bytes past the source's current end read as zeros (the
    source shrank after the point in time only through copy-before-write, so
    this happens only for clusters whose old content was zero anyway).
    With `nowait`, raises BlockingIOError before writing anything unless the
    whole range is in the page cache: the caller then copies in a thread.
    Other failures raise SourceError or TargetError, naming the offset.
    """
    view = memoryview(buf)[:length]
    try:
        _read(source_fd, view, offset, nowait)
    except BlockingIOError:
        raise
    except OSError as e:
        raise SourceError(e.errno, f"reading the source at offset {offset}: {e.strerror}") from e
    try:
        return write_nonzero(target, buf, offset, length, cluster_size)
    except OSError as e:
        raise TargetError(e.errno, f"writing the target at offset {offset}: {e.strerror}") from e


def read_cached(fd: int, view: memoryview, offset: int) -> int | None:
    """Read from the page cache only: the bytes read, or None if that would block.

    Filesystems without RWF_NOWAIT (FUSE, NFS) answer EOPNOTSUPP: None too, so the
    caller reads in a thread as it would for a cold cache."""
    try:
        return os.preadv(fd, [view], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def _read(source_fd: int, view: memoryview, offset: int, nowait: bool) -> None:
    length = len(view)
    if nowait:
        cached = read_cached(source_fd, view, offset)
        if cached is None or cached < length:
            raise BlockingIOError(f"bytes at {offset} are not in the page cache")
        return
    got = os.preadv(source_fd, [view], offset)
    while 0 < got < length:  # short read: retry for the rest, stop at EOF
        more = os.preadv(source_fd, [view[got:]], offset + got)
        if more == 0:
            break
        got += more
    if got < length:
        view[got:] = _ZERO[: length - got]


def write_nonzero(
    target: Target, buf: bytearray, offset: int, length: int, cluster_size: int
) -> int:
    """Write the non-zero clusters of buf[:length] in runs; returns the bytes written."""
    view = memoryview(buf)[:length]
    written = 0
    run_start = None  # start of the current run of non-zero clusters
    for pos in range(0, length, cluster_size):
        size = min(cluster_size, length - pos)
        if is_zero(buf, pos, size):
            if run_start is not None:
                target.write(offset + run_start, view[run_start:pos])
                written += pos - run_start
                run_start = None
            target.write_zeroes(offset + pos, size)
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        target.write(offset + run_start, view[run_start:])
        written += length - run_start
    return written
