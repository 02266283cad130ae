"""`cowfs commit TOP`: merge an incremental into its backing file, checksums and record too.

QEMU's `qemu-img commit` does the merge of the data (qcow2 chains are standard);
what it cannot do is keep cowfs's promises about the result. Merged by hand, the
backing file holds the image at TOP's point in time while its record and checksums
still describe its own: `verify` then reports every cluster the merge changed. This
does the merge the way cowfs can vouch for it:

1. the chain is opened as for a restore (every link complete, checksums intact);
2. the backing file's record says `running` first, so a crash during the merge
   leaves it untrusted, never trusted with mixed content;
3. `qemu-img commit -d` merges (TOP keeps its data: it still restores as before);
4. every cluster the merge wrote is read back from the backing file and checked
   against TOP's checksum; the merged checksums (TOP's where TOP holds a cluster,
   the backing file's elsewhere) are saved;
5. the record says complete, at TOP's point in time and under TOP's job id, so
   the next incremental of the bitmap that TOP anchored may name the merged file as
   its backing.
"""

import dataclasses
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from .chainread import BackupChain, ChainLink, CorruptCluster
from .claims import Claim
from .errors import EXIT_INCOMPLETE, CowfsError
from .record import record_path, write_record
from .sums import ABSENT, DATA, Checksums, sums_path
from .target.reader import open_link


def merged_sums(upper: Checksums, base: Checksums) -> Checksums:
    """What the backing file holds after the merge: `upper`'s clusters over `base`'s."""
    merged = Checksums(upper.size, upper.cluster_size)
    for i in range(merged.count):
        if upper.states[i] != ABSENT:
            source = upper
        elif i < base.count:
            source = base
        else:
            continue  # past the backing file's end: reads as zeros, as before
        if source.states[i] == DATA:
            merged.set_data(i, source.digest_of(i))
        else:
            merged.states[i] = source.states[i]
    return merged


def commit(top: Path) -> ChainLink:
    """Merge `top` into its backing file; returns the merged link (closed)."""
    chain = BackupChain.open(top)
    try:
        if len(chain.links) < 2:
            raise CowfsError(f"{top} has no backing file: there is nothing to merge it into")
        upper, base = chain.links[0], chain.links[1]
        if upper.sums.cluster_size != base.sums.cluster_size:
            raise CowfsError(
                f"{top} and {base.path} were backed up with different cluster sizes "
                f"({upper.sums.cluster_size} and {base.sums.cluster_size}): cowfs cannot "
                "merge their checksums"
            )
        claims = [Claim.take("target", link.path, "backup") for link in (upper, base)]
        try:
            return _merge(upper, base)
        finally:
            for claim in claims:
                claim.release()
    finally:
        chain.close()


def _merge(upper: ChainLink, base: ChainLink) -> ChainLink:
    merged = merged_sums(upper.sums, base.sums)
    untrusted = dataclasses.replace(
        base.record, status="running", pid=os.getpid(), errors=["merge under way"]
    )
    write_record(record_path(base.path), untrusted, reserve=False)
    done = subprocess.run(
        ["qemu-img", "commit", "-q", "-d", str(upper.path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise CowfsError(
            f"qemu-img commit failed ({reason}); {base.path} is not trusted any more "
            f"(its record says running): restore from {upper.path}'s chain is broken",
            EXIT_INCOMPLETE,
        )
    link = ChainLink(base.path, base.record, merged, open_link(base.path), base.bottom)
    try:
        for i in range(merged.count):
            if upper.sums.states[i] != ABSENT:
                link.check(i)
    except CorruptCluster as e:
        raise CowfsError(
            f"the merge did not write what {upper.path} holds: {e.message}", EXIT_INCOMPLETE
        ) from None
    finally:
        link.file.close()
    checksums = merged.save(sums_path(base.path))
    record = dataclasses.replace(
        base.record,
        status="complete",
        size=upper.record.size,
        point_in_time=upper.record.point_in_time,
        job=upper.record.job,
        bitmap=upper.record.bitmap,
        finished=datetime.now(UTC).isoformat(),
        pid=os.getpid(),
        errors=[],
        checksums=checksums,
        merged=[*base.record.merged, str(upper.path)],
    )
    write_record(record_path(base.path), record, reserve=False)
    link.record = record
    return link
