"""The mount's registry: its disks and its jobs, and the operations control asks for.

Starts job commands (validate and create targets in a worker thread, fix the
point in time under the barrier, commit), finds jobs by id, ends them, tells
whether the mount may go, and describes it all for `cowfs status`. What happens
when a job ends — the image unprotected, the bitmap anchored or given its bits
back, the record, the claim — happens here, once per job, while the mount serves.
"""

import logging
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from . import backup
from .backup import Prepared, TargetRequest
from .barrier import Barrier
from .bitmap import bitmap_rows
from .claims import Claim
from .disk import Disk
from .errors import CowfsError
from .group import Completion, Group
from .job import Job, JobState
from .options import SyncMode
from .view import DIRTY_SUFFIX, View, view_path

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, mountpoint: Path, disks: list[Disk], barrier: Barrier) -> None:
        self.mountpoint = mountpoint
        self.disks = {disk.name: disk for disk in disks}
        self.barrier = barrier
        self.groups: dict[int, Group] = {}
        self.mounted = True
        self.unmounted = trio.Event()
        self.done = trio.Event()
        """Set once the mount is gone and every group has ended."""
        self.open_files = 0
        """Open handles of the mount's files, views too (maintained by fs.py): `unmount`
        refuses while any."""
        self.unmount_on_cancel: set[int] = set()
        """Groups whose cancel also removes the mount (the job of `mount --target`)."""
        self._claims: dict[Job, Claim] = {}
        self._disk_of: dict[Job, Disk] = {}
        self._views: dict[Job, View] = {}
        self._starting: set[str] = set()
        self._nursery: trio.Nursery | None = None

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the groups until the mount is gone and every group has ended."""
        try:
            async with trio.open_nursery() as tracking:
                for disk in self.disks.values():
                    tracking.start_soon(disk.tracker.run)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await self.unmounted.wait()
                tracking.cancel_scope.cancel()  # no writes any more: the mount's end saves
        finally:
            self.done.set()

    def mount_gone(self) -> None:
        """No request is served any more: running jobs copy what is left from quiet sources."""
        self.mounted = False
        for group in self.groups.values():
            for job in group.jobs:
                job.unmounted()
        self.unmounted.set()

    def add_group(self, prepared: list[Prepared], completion: Completion) -> Group:
        """Run the jobs of committed `prepared` as one group."""
        assert self._nursery is not None
        group_id = max(self.groups, default=0) + 1
        group = Group(group_id, [p.job for p in prepared], completion, self._job_ended)
        for p in prepared:
            if p.claim is not None:
                self._claims[p.job] = p.claim
            self._disk_of[p.job] = p.disk
            if p.job.options.view:
                self._views[p.job] = View(p.job, p.disk.name)
        self.groups[group_id] = group
        self._nursery.start_soon(group.run, self.unmounted)
        return group

    # -- job commands ------------------------------------------------------------------

    async def backup(self, requests: dict[str, TargetRequest], completion: Completion) -> Group:
        """Start a job command; bad input raises CowfsError and changes nothing."""
        if not self.mounted:
            raise CowfsError("the mount is going away: no new jobs")
        disks = [self.disk(name) for name in requests]
        for disk in disks:
            busy = disk.running_job()
            if busy is not None or disk.name in self._starting:
                job = f" ({busy.group})" if busy is not None else ""
                raise CowfsError(f"image {disk.name} already has a running job{job}")
        names = set(requests)
        self._starting |= names
        try:
            prepared = await self._prepare(disks, requests)
            scans = []
            try:
                for p in prepared:  # before the barrier: it holds writes, the scan does not
                    scans.append(await p.disk.scan(p.job.cluster_size))
                async with self.barrier.hold(
                    [d.name for d in disks]
                ):  # the point in time, one for all images
                    now = datetime.now(UTC)
                    for p, scan in zip(prepared, scans, strict=True):
                        backup.begin(p, now, scan)
            except BaseException:
                for p in prepared:
                    backup.abort(p)
                raise
            finally:
                for p, scan in zip(prepared, scans, strict=False):
                    p.disk.scans.remove(scan)
            for p in prepared:
                p.job.barrier_s = self.barrier.held_s
            try:
                for p in prepared:
                    await trio.to_thread.run_sync(backup.commit, p)
            except BaseException:
                for p in prepared:
                    backup.abort(p)
                raise
            group = self.add_group(prepared, completion)
            for p in prepared:  # a point in time moved bits aside: save what a crash leaves
                if p.job.options.bitmap is not None:
                    await p.disk.tracker.save()
            return group
        finally:
            self._starting -= names

    async def _prepare(
        self, disks: list[Disk], requests: dict[str, TargetRequest]
    ) -> list[Prepared]:
        sources = [disk.path for disk in self.disks.values()]
        prepared: list[Prepared] = []
        try:
            for disk in disks:
                p = await trio.to_thread.run_sync(
                    backup.prepare, disk, requests[disk.name], self.mountpoint, sources
                )
                prepared.append(p)
            targets = [p.job.target.name for p in prepared]
            if len(set(targets)) < len(targets):
                raise CowfsError("two images of the job have the same target")
        except BaseException:
            for p in prepared:
                p.undo.close()
            raise
        return prepared

    async def bitmap_command(self, image: str, action: str, name: str, granularity: int) -> None:
        """`cowfs bitmap add|remove|clear` on a served image; saved at once (in use)."""
        disk = self.disk(image)
        if action == "list":
            return
        users = [job for job in disk.jobs if job.options.bitmap == name]
        if users and action in ("remove", "clear"):
            raise CowfsError(f"bitmap {name!r} is in use by job {users[0].group}")
        match action:
            case "add":
                disk.dirty.add(name, granularity, disk.size)
            case "remove":
                disk.dirty.remove(name)
            case "clear":
                disk.dirty.clear(name)
            case _:
                raise CowfsError(f"unknown bitmap action {action!r}")
        if not await disk.tracker.save():
            raise CowfsError(f"cannot save the bitmaps of {disk.path}: see the mount's log")

    def disk(self, name: str) -> Disk:
        try:
            return self.disks[name]
        except KeyError:
            served = ", ".join(sorted(self.disks))
            raise CowfsError(f"no image {name!r} in this mount (it serves {served})") from None

    def find(self, group_id: int | None) -> Group:
        """The group `group_id`, or the only running one."""
        if group_id is not None:
            try:
                return self.groups[group_id]
            except KeyError:
                raise CowfsError(f"no job {group_id} on this mount") from None
        running = [g for g in self.groups.values() if g.running]
        if len(running) == 1:
            return running[0]
        if not running:
            newest = max(self.groups, default=None)
            if newest is None:
                raise CowfsError("no job on this mount")
            return self.groups[newest]
        ids = ", ".join(str(g.id) for g in running)
        raise CowfsError(f"several jobs run ({ids}): name one")

    # -- views and jobs that collect until ended ----------------------------------------

    def views(self) -> dict[int, list[View]]:
        """The open views, by job (group) id."""
        out: dict[int, list[View]] = {}
        for view in self._views.values():
            if view.open and view.job.group is not None:
                out.setdefault(view.job.group, []).append(view)
        return out

    def end(self, group_id: int | None) -> Group:
        """`cowfs end`: a job that collects until ended (a view, sync none) ends, once its
        copier is through (the caller waits for that as for any job)."""
        group = self.find(group_id)
        if not any(job.options.view or job.options.sync is SyncMode.NONE for job in group.jobs):
            raise CowfsError(f"job {group.id} ends by itself (no view, not --sync none)")
        if not group.running:
            raise CowfsError(f"job {group.id} has ended already")
        if any(job.state is JobState.PAUSED for job in group.jobs):
            raise CowfsError(f"job {group.id} is paused: resume it, then end it")
        for job in group.jobs:
            job.end_requested.set()
        return group

    async def release(
        self, group_id: int, image: str | None, offset: int, length: int
    ) -> tuple[int, int]:
        """`cowfs release`: the view's reader is past [offset, offset+length); returns the
        bytes released (whole clusters) and the bytes freed in the fleecing store."""
        group = self.find(group_id)
        views = [v for v in self.views().get(group.id, []) if image in (None, v.name)]
        if not views:
            of = "" if image is None else f" of {image}"
            raise CowfsError(f"job {group.id} has no open view{of}")
        if len(views) > 1:
            names = ", ".join(v.name for v in views)
            raise CowfsError(f"job {group.id} has views of several images ({names}): name one")
        view = views[0]
        job = view.job
        if job.options.sync is not SyncMode.NONE:
            raise CowfsError(
                f"job {group.id} is a {job.options.sync} backup: its target must keep every "
                "cluster, so only a --sync none view can release ranges"
            )
        if offset < 0 or length <= 0 or offset >= job.size:
            raise CowfsError(f"bad range {offset}+{length} for a view of {job.size} bytes")
        released = job.release(offset, length)
        return released, await job.copy.in_thread(view.free)

    def unmount_refusal(self) -> str | None:
        """Why the mount may not go now, or None."""
        running = [str(g.id) for g in self.groups.values() if g.running]
        if running:
            return f"jobs still run ({', '.join(running)}): cancel them or use finish"
        if self.open_files:
            return f"files of the mount are open ({self.open_files} handles)"
        return None

    # -- a job's end -------------------------------------------------------------------

    async def _job_ended(self, job: Job) -> None:
        view = self._views.pop(job, None)
        if view is not None:
            view.close()
        disk = self._disk_of.pop(job)
        if job in disk.jobs:
            disk.jobs.remove(job)
        closing = not job.options.cbw_timeout  # with it, an abandoned copy may still write
        if closing and job.target.closed_before_record:
            await _close_target(job)
        recorded = True
        try:
            await trio.to_thread.run_sync(backup.write_job_record, job, False)
        except OSError as e:  # the record left behind (running) says incomplete: no lie
            log.error("cannot write the record of %s: %s", job.target.name, e)
            recorded = False
        if job.options.bitmap is not None:  # after the record: never anchored to a link
            complete = job.state is JobState.COMPLETE and recorded  # that says running
            disk.dirty.end_job(job.options.bitmap, backup.anchor(job) if complete else None)
            await disk.tracker.save()
        log.info("backup %s: %s", job.state, job.target.name)
        if closing:
            await self._let_go(job, close=not job.target.closed_before_record)
        else:  # once that copy's thread has returned: no task waits for one that hangs
            spawn = trio.lowlevel.spawn_system_task
            job.copy.when_quiet(lambda: spawn(self._let_go, job, True))

    async def _let_go(self, job: Job, close: bool) -> None:
        """Nothing writes the target any more: close it (unless `close` is False: closed
        already) and release its claim, so that another job may take it."""
        if close:
            await _close_target(job)
        claim = self._claims.pop(job, None)
        if claim is not None:
            claim.release()

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        open_views = self.views()
        jobs = [
            asdict(job.status())
            | {"id": g.id, "image": self._image_of(job), "completion": g.completion}
            | self._view_paths(g.id, job, open_views)
            for g in self.groups.values()
            for job in g.jobs
        ]
        images = []
        for disk in self.disks.values():
            running = disk.running_job()
            images.append(
                {
                    "name": disk.name,
                    "source": str(disk.path),
                    "size": disk.size,
                    "job": running.group if running is not None else None,
                    "bitmaps": bitmap_rows(disk.dirty, disk.size, os.getpid()),
                    "tracking": disk.tracker.status(),
                }
            )
        mount = {
            "pid": os.getpid(),
            "mountpoint": str(self.mountpoint),
            "mounted": self.mounted,
            "images": images,
            "jobs": jobs,
        }
        return (jobs[-1] if jobs else {}) | mount  # the newest job's fields: one-job scripts

    def _view_paths(self, group_id: int, job: Job, open_views: dict[int, list[View]]) -> dict:
        """The job's view and, for an incremental, its dirty extents file (or None)."""
        view = next((v for v in open_views.get(group_id, []) if v.job is job), None)
        if view is None:
            return {"view": None, "dirty_extents": None}
        path = view_path(self.mountpoint, group_id, view.name)
        dirty = path + DIRTY_SUFFIX if view.dirty_extents() is not None else None
        return {"view": path, "dirty_extents": dirty}

    def _image_of(self, job: Job) -> str:
        return Path(job.source).name


async def _close_target(job: Job) -> None:
    try:
        await trio.to_thread.run_sync(job.target.close)
    except OSError as e:  # a failed job's target, e.g. on a full filesystem
        log.warning("closing %s: %s", job.target.name, e)
