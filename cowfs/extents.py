"""Which clusters of the source hold data at the point in time (SEEK_DATA/SEEK_HOLE).

The kernel answers from the filesystem's extent map without reading data, so a
1 TiB sparse image is scanned in milliseconds; but a file that random writes
have cut into thousands of extents takes tens of milliseconds, too long to hold
guest writes for. So a mount scans before its barrier (DataScan), in a thread,
and notes the writes that land meanwhile: every cluster they touch counts as
data. Filesystems that do not know holes report everything as data, which is
always safe, and so is counting a cluster as data that is not.
"""

import errno
import os

from bitarray import bitarray
from bitarray.util import ones, zeros


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


class DataScan:
    """A scan made before the point in time, kept true by the writes noted since."""

    def __init__(self, cluster_size: int) -> None:
        self.cluster_size = cluster_size
        self.bits = bitarray()
        self.size = 0
        self._written = bitarray()
        """Clusters written since the scan began: a bit each, so that fixing the point in
        time costs the same however many writes a long scan saw."""

    def note(self, offset: int, length: int) -> None:
        """A write (or a truncate's changed range) since the scan began."""
        if length <= 0:
            return
        first, end = offset // self.cluster_size, -(-(offset + length) // self.cluster_size)
        if end > len(self._written):
            self._written.extend(zeros(end - len(self._written)))
        self._written[first:end] = 1

    def scan(self, fd: int) -> None:
        """Blocking: run it in a thread, after the disk notes writes here."""
        self.size = os.fstat(fd).st_size
        self.bits = data_clusters(fd, self.size, self.cluster_size)

    def at(self, size: int) -> bitarray:
        """The data clusters of a source of `size` bytes now (under the barrier)."""
        cs = self.cluster_size
        nclusters = -(-size // cs)
        data = self.bits[:nclusters]
        data.extend(ones(nclusters - len(data)))  # grown since the scan: count as data
        written = self._written[:nclusters]
        written.extend(zeros(nclusters - len(written)))
        return data | written
