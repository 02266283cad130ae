"""A served file's attributes, shared by the live mount and the live restore: what the
kernel is told of the file behind a node, and how chmod, chown and utime reach it."""

import os
import stat

import pyfuse3


def fill(attrs: pyfuse3.EntryAttributes, fd: int, size: int | None = None) -> None:
    """`attrs` from the file behind `fd` (its size, unless the node keeps its own)."""
    st = os.fstat(fd)
    attrs.st_mode = st.st_mode
    attrs.st_nlink = 1
    attrs.st_uid, attrs.st_gid = st.st_uid, st.st_gid
    attrs.st_size = st.st_size if size is None else size
    attrs.st_blocks = st.st_blocks
    attrs.st_atime_ns, attrs.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
    attrs.st_ctime_ns = st.st_ctime_ns


def apply(fd: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
    """The mode, owner and times a setattr asks for (the size is the caller's)."""
    if fields.update_mode:
        os.fchmod(fd, stat.S_IMODE(attr.st_mode))
    if fields.update_uid or fields.update_gid:
        uid = attr.st_uid if fields.update_uid else -1
        os.fchown(fd, uid, attr.st_gid if fields.update_gid else -1)
    if fields.update_atime or fields.update_mtime:
        st = os.fstat(fd)
        atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
        os.utime(fd, ns=(atime, mtime))
