"""A backup chain read back, every cluster checked against the checksum of its link.

Which link holds a cluster follows from the checksum files, top down: the first
link whose job put the cluster in its target (as data or as zero) holds it; below
the last link the image reads as zeros. That is what QEMU reads too, as long as
each file agrees with its checksums (a qcow2 cluster no job wrote must read
through): `verify` checks exactly that, link by link, and every read here checks
the clusters it returns. Shared by `cowfs verify`, `cowfs restore` and the live
restore; knows nothing of FUSE or of the destination.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bitarray.util import zeros

from .chain import links
from .errors import CowfsError
from .record import Record
from .sums import ABSENT, RELEASED, ZERO, Checksums, digest, sums_path
from .target.reader import Qcow2Link, RawLink, open_link
from .transfer import is_zero

BLOCK = 1 << 20
"""The unit a whole-chain pass reads at once (at least the largest cluster of the chain)."""


class CorruptCluster(CowfsError):
    """A cluster that does not read as its checksum says; names the file and offset."""

    def __init__(self, path: Path | str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: cluster at offset {offset}: {reason}")
        self.path = path
        self.offset = offset


@dataclass
class ChainLink:
    path: Path
    record: Record
    sums: Checksums
    file: RawLink | Qcow2Link
    bottom: bool
    """Nothing below it: a cluster it does not hold reads as zero."""

    def cluster_into(self, i: int, buf: bytearray, pos: int) -> bool:
        """Fill buf[pos:] with the verified bytes of this link's cluster `i` (as long as
        its extent); False, leaving buf as it was, if this link does not hold it (and
        then it reads through, as it must). Raises CorruptCluster."""
        sums = self.sums
        state = sums.states[i] if i < sums.count else ABSENT
        if state == ABSENT:
            self._check_absent(i)
            return False
        start, length = sums.extent(i)
        if state == RELEASED:
            raise CorruptCluster(self.path, start, "released by a view's reader: not in the backup")
        view = memoryview(buf)[pos : pos + length]
        try:
            _, held = self.file.read_into(view, start)
        except CowfsError as e:  # a damaged table or a cluster outside the file
            raise CorruptCluster(self.path, start, e.message) from None
        if not held and not (self.bottom and isinstance(self.file, Qcow2Link)):
            raise CorruptCluster(self.path, start, "missing from the file (reads through)")
        if state == ZERO:
            if not is_zero(buf, pos, length):
                raise CorruptCluster(self.path, start, "should read as zeros but does not")
        elif digest(view) != sums.digest_of(i):
            raise CorruptCluster(self.path, start, "checksum mismatch")
        return True

    def check(self, i: int) -> None:
        """Verify cluster `i` of this link, whatever it holds there. Raises CorruptCluster."""
        self.cluster_into(i, bytearray(self.sums.cluster_size), 0)

    def _check_absent(self, i: int) -> None:
        """A cluster no job of this link wrote must read through (qcow2) or, in a raw
        file (which has no backing), read as zeros."""
        if i >= self.sums.count:
            return
        start, length = self.sums.extent(i)
        try:
            if isinstance(self.file, RawLink):
                if self.file.is_hole(start, length):
                    return
                buf = bytearray(length)
                self.file.read_into(memoryview(buf), start)
                if not is_zero(buf, 0, length):
                    raise CorruptCluster(self.path, start, "a hole of the backup holds data")
            elif self.file.holds(start, length)[0]:
                raise CorruptCluster(self.path, start, "holds data no backup job wrote there")
        except CorruptCluster:
            raise
        except CowfsError as e:
            raise CorruptCluster(self.path, start, e.message) from None


class BackupChain:
    """The links of TARGET's chain, top first, each with its record, checksums and file."""

    def __init__(self, top: Path, chain: list[ChainLink]) -> None:
        self.top = top
        self.links = chain
        self.record = chain[0].record
        self.size = self.record.size
        self.cluster_size = max(link.sums.cluster_size for link in chain)
        """The unit of `read`: every link's clusters nest in it."""
        self.granule = min(link.sums.cluster_size for link in chain)

    @classmethod
    def open(cls, top: Path) -> "BackupChain":
        """Open every link; a link that is missing, not complete, without checksums or
        with a damaged checksum file is a CowfsError that names it."""
        chain: list[ChainLink] = []
        try:
            walked = list(links(top))
            for n, link in enumerate(walked):
                if link.problem is not None or link.record is None:
                    what = "the backup" if n == 0 else "its backing file"
                    raise CowfsError(f"{link.path}: {what} cannot be trusted: {link.problem}")
                record = link.record
                if record.sync == "none":
                    raise CowfsError(
                        f"{link.path}: a fleecing target (--sync none) holds only the old "
                        "content of overwritten clusters: it is not an image"
                    )
                if record.sync == "restore":
                    raise CowfsError(f"{link.path}: a restored image, not a backup")
                if record.checksums is None:
                    raise CowfsError(
                        f"{link.path}: no checksums recorded (written by an older cowfs); "
                        "take a new full backup to verify"
                    )
                sums = Checksums.load(sums_path(link.path), record.checksums)
                if sums.size != record.size or sums.cluster_size != record.cluster_size:
                    raise CowfsError(f"{sums_path(link.path)}: does not match its record")
                file = open_link(link.path)
                chain.append(ChainLink(link.path, record, sums, file, n == len(walked) - 1))
        except BaseException:
            for done in chain:
                done.file.close()
            raise
        return cls(top, chain)

    def close(self) -> None:
        for link in self.links:
            link.file.close()

    def read(self, offset: int, length: int) -> bytearray:
        """The image's verified bytes at [offset, offset+length): `offset` aligned to
        `cluster_size`, the range inside the image. Each cluster is read straight into
        place, unless a link above holds part of it. Raises CorruptCluster."""
        g = self.granule
        out = bytearray(length)
        todo = ~zeros(-(-length // g))
        for link in self.links:
            cs = link.sums.cluster_size
            for lo in range(0, length, cs):
                first = lo // g
                end = min(first + cs // g, len(todo))
                unresolved = todo.count(1, first, end)
                if not unresolved:
                    continue
                i = (offset + lo) // cs
                if unresolved == end - first:
                    if link.cluster_into(i, out, lo):
                        todo[first:end] = 0
                    continue
                scratch = bytearray(cs)
                if link.cluster_into(i, scratch, 0):
                    for j in range(first, end):
                        if todo[j]:
                            a, b = j * g - lo, min((j + 1) * g, length) - lo
                            out[lo + a : lo + b] = scratch[a:b]
                            todo[j] = 0
            if not todo.any():
                break
        return out  # what no link holds reads as zeros

    def blocks(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of the image in whole-chain units."""
        step = max(BLOCK, self.cluster_size)
        for offset in range(0, self.size, step):
            yield offset, min(step, self.size - offset)

    @property
    def bytes_to_verify(self) -> int:
        return sum(link.sums.size for link in self.links)

    def verify(
        self, progress: Callable[[int], None] = lambda n: None, limit: int = 10
    ) -> Iterator[str]:
        """Every problem of every link: its structure, then every cluster (the shadowed
        ones too) against its checksum. Yields up to `limit` per file; `progress` hears
        the bytes checked."""
        for link in self.links:
            problems = link.file.check(link.record.size)
            yield from problems[:limit]
            found = len(problems)
            for i in range(link.sums.count):
                if found >= limit:
                    break
                try:
                    link.check(i)
                except CorruptCluster as e:
                    found += 1
                    yield e.message
                progress(link.sums.extent(i)[1])
