"""The copier: copies, in the background, the clusters the sync mode selects.

Runs in the same trio loop as the FUSE handlers; the I/O itself runs in worker
threads so that the loop keeps serving the guest. Claims at most a batch at a
time, so a guest write waits for at most one batch. Never marks clusters done
itself: the job does, after the copy.
"""

import logging

import trio
from bitarray import bitarray

from .job import Job, JobState
from .policy import retry_delay

log = logging.getLogger(__name__)

WORKERS = 2
"""Two copies in flight keep the source's reads and the target's writes overlapping;
more only contend for the GIL and the page cache on these 2-core machines."""


class Copier:
    def __init__(self, job: Job) -> None:
        self.job = job
        self._remaining = bitarray()
        self._cursor = 0

    async def run(self) -> None:
        """Copy until every selected cluster is done; passes repeat for clusters that a
        failed copy-before-write left behind."""
        job = self.job
        while job.copying:
            self._remaining = job.selected & ~job.copy.done
            if not self._remaining.any():
                return
            self._cursor = 0
            async with trio.open_nursery() as nursery:
                for _ in range(WORKERS):
                    nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        job = self.job
        buf = bytearray(job.copy.batch_bytes)
        failures = 0
        while True:
            await job.wait_unpaused()
            first = self._remaining.find(1, self._cursor)
            if first < 0:
                return
            if job.copy.done[first]:
                self._cursor = first + 1
                continue
            if job.copy.claims.is_claimed(first):
                await job.copy.claims.wait(first)  # then look at `first` again
                continue
            runs = self._claim_batch(first)
            self._cursor = runs[-1][0] + runs[-1][1]
            copied = await job.copy_claimed(runs, buf)
            if copied is None:  # failed; the error policy wants these clusters again
                failures += 1
                self._cursor = min(self._cursor, first)
                if job.state is not JobState.PAUSED:
                    await trio.sleep(retry_delay(failures))
                continue
            failures = 0
            await job.copy.limiter.account(copied)

    def _claim_batch(self, first: int) -> list[tuple[int, int]]:
        """Claim up to a batch of wanted clusters from `first` (which is claimable) on, as
        (first, count) runs: neighbours, and the next wanted ones after a gap, so that a
        sparse selection (an incremental) copies many clusters per thread hop. Clusters
        someone else holds are skipped; a later pass takes what they leave undone."""
        copy = self.job.copy
        remaining = self._remaining
        runs: list[tuple[int, int]] = []
        budget = copy.batch_clusters
        pos = first
        while budget and pos >= 0:
            start = pos
            while (
                budget
                and pos < len(remaining)
                and remaining[pos]
                and not copy.done[pos]
                and copy.claims.claim(pos)
            ):
                pos += 1
                budget -= 1
            if pos > start:
                runs.append((start, pos - start))
            pos = remaining.find(1, pos + 1 if pos == start else pos)
        return runs


async def copy_in_background(job: Job) -> None:
    """Copy until done, failed or cancelled (the job's point in time is fixed already);
    first the zero clusters a job started under a barrier left to it."""
    try:
        with job.copier_scope:
            if job.zeroes.any():
                try:
                    await trio.to_thread.run_sync(job.write_zeroes)
                except OSError as e:
                    job.fail(f"writing the zero clusters of the target: {e.strerror}")
                    return
            await Copier(job).run()
    except Exception as e:  # a bug: the backup must say so rather than hang or lie
        log.exception("copier crashed")
        job.fail(f"internal error in the copier: {e!r}")
    finally:
        job.copier_finished()
