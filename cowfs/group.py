"""A group: the jobs of one job command, with one point in time and one outcome.

Runs each job to its end while the mount keeps serving: the copier, then (for
`none`, which has nothing to copy) the end of the mount, then the target made
durable. Grouped completion (the default) says `complete` for no job until every
target is durable, and cancels the peers of a job that fails or is cancelled,
naming it; individual completion lets each job end on its own (QEMU's default).
"""

import enum
from collections.abc import Awaitable, Callable

import trio

from .copier import copy_in_background
from .job import Job, JobState
from .options import SyncMode


class Completion(enum.StrEnum):
    GROUPED = "grouped"
    INDIVIDUAL = "individual"


class Group:
    def __init__(
        self,
        group_id: int,
        jobs: list[Job],
        completion: Completion,
        on_end: Callable[[Job], Awaitable[None]],
    ) -> None:
        self.id = group_id
        self.jobs = jobs
        self.completion = completion
        self.on_end = on_end
        self.ended = trio.Event()
        self._flushed: set[Job] = set()
        self._settled = {job: trio.Event() for job in jobs}
        """Per job: its copier, zero-filling and flush have returned, so none of their
        worker threads uses the target any more."""
        for job in jobs:
            job.group = group_id
            job.peers = [peer.target.name for peer in jobs if peer is not job]

    @property
    def running(self) -> bool:
        return not self.ended.is_set()

    async def run(self, unmounted: trio.Event) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for job in self.jobs:
                    nursery.start_soon(self._run, job, unmounted)
                    nursery.start_soon(self._watch, job)
        finally:
            self.ended.set()

    async def _run(self, job: Job, unmounted: trio.Event) -> None:
        try:
            await self._copy_and_flush(job, unmounted)
        finally:
            self._settled[job].set()

    async def _copy_and_flush(self, job: Job, unmounted: trio.Event) -> None:
        await copy_in_background(job)
        if job.options.sync is SyncMode.NONE or job.options.view:  # until ended or unmounted
            await _first(unmounted, job.ended, job.end_requested)
            job.unmounted()
        if not await job.flush():
            return
        self._flushed.add(job)
        if self.completion is Completion.INDIVIDUAL:
            job.mark_complete()
        elif self._flushed.issuperset(self.jobs):
            for peer in self.jobs:
                peer.mark_complete()

    async def _watch(self, job: Job) -> None:
        await job.ended.wait()
        if job.state is not JobState.COMPLETE and self.completion is Completion.GROUPED:
            for peer in self.jobs:
                if peer is not job:
                    peer.cancel(f"its peer {job.target.name} {job.state}")
        # A job ends (fails, is cancelled) while its threads may still be copying: the
        # target is closed and the record written only once they have returned, or a
        # late write of theirs could land in whatever file reuses the target's fd. A
        # copy-before-write given up on (--cbw-timeout) may hang for good: not waited
        # for; the target is closed when it returns (Registry._job_ended).
        await self._settled[job].wait()
        if not job.options.cbw_timeout:
            await job.copy.quiet()
        await self.on_end(job)


async def _first(*events: trio.Event) -> None:
    """Return when any of `events` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)
