"""Which clusters of the source hold data at the point in time (SEEK_DATA/SEEK_HOLE).

The kernel answers from the filesystem's extent map without reading data, so a
1 TiB sparse image is scanned in milliseconds. Filesystems that do not know
holes report everything as data, which is always safe.
"""

import errno
import os

from bitarray import bitarray


def data_clusters(fd: int, size: int, cluster_size: int) -> bitarray:
    """A bit per cluster, set where any byte of the cluster lies in a data extent."""
    nclusters = -(-size // cluster_size)
    data = bitarray(nclusters)
    data.setall(0)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                data.setall(1)
                return data
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        data[start // cluster_size : -(-end // cluster_size)] = 1
        pos = end
    return data
