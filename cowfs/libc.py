"""The C library's calls that Python's os module lacks (fallocate's modes, syncfs,
sync_file_range, renameat2), with their errors as OSError."""

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def check(result: int, what: str) -> None:
    """Raise the call's errno as OSError("what: reason") when it returned non-zero."""
    if result:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
