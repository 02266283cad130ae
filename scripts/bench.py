"""cowfs against QEMU's own backup job, side by side in one run, with ratios.

Why one command: the issue's floors are relative (cowfs vs QEMU in the same run,
vs `cp`), and figures from another day or another load on these shared 2-core
machines mean little. So both sides run here in one time window, on the same
image (`make_source_image`, seed 1), with the same writer process, offsets and
data (the anchor's `workload`, seed+1000 as its `bench` uses) and the same speed
limit, and the script prints ratios next to the issue's floors.

QEMU's side is `../shared/anchors/qemu_backup.py` (the anchor): run as its own
`bench` subprocess with only the phases needed, and imported (never copied) for
its image, writer, comparison and latency helpers.

Per repetition (medians over `--repeat`):
  (a) 64K and 4K random writes through the mount during a full backup at
      `--speed` (100M), vs the same writes through QEMU's FUSE export during
      its backup job at the same speed. The cowfs target must equal the
      pristine image afterwards, and the source the pristine image plus the writes.
  (b) the same writes through an *idle* cowfs mount -- a full backup whose copier
      has already finished (the job is still mounted, so every write still asks
      the done bitmap) -- vs the plain file. QEMU's export with no job is shown too.
  (c) full backup with no writer, unlimited: mount, immediately finish, until
      `finish` returns (the daemon fsyncs the target first) plus an fsync, vs
      QEMU's job (+fsync) and `cp --sparse=always` (+fsync).
  (d) peak RSS (VmHWM) of the daemon on a 1 TiB sparse source: sync top (writes
      through the mount, copier done, finish) and sync full (mount, status, cancel).
  (e) incremental backups (issue 3) with `--dirty` (1 %, 10 %) of the image dirty: a
      qcow2 full backup anchoring a bitmap, random 64K writes through a `--sync none`
      mount, then an incremental with no writer, mount -> finish (+fsync). Its time must
      follow the dirty data, not the image size, so it is shown against cowfs's own full
      backup, and against QEMU's incremental job of the very same dirty set (the anchor's
      `bench --sync incremental --phases nowriter`: its phase-1 writer has the same seed,
      block size and total as ours). Both incrementals must equal the source as it was.
  (f) compressed full backup (issue 3): `--compress` into qcow2 (mount -> finish, +fsync)
      vs `qemu-img convert -c -O qcow2` (+fsync) of the same image: time and file size.
  (g) the barrier of `cowfs backup` under a running writer: on a mount without --target,
      the writer (4K and 64K separately) writes in passes of `BARRIER_PASS` through the
      live file while `--barriers` (20) `cowfs backup --sync none` jobs start one after the
      other, each cancelled (`cowfs cancel MP JOB`: the mount keeps serving) before the
      next. Each job's `barrier_s` from `cowfs status --json` -- how long the barrier that
      fixed its point in time held new guest writes -- as p50/p99/max in ms against the
      issue's goal (p99 < 5 ms; shown, not asserted: with 20 barriers the nearest-rank p99
      is the max); the longest write that overlapped each `backup` command (what the guest
      felt); and the writer's own p99 latency and MiB/s against the very same passes
      through a mount of a fresh copy that runs no job.
  (h) incremental on a running mount: one mount without --target, a full qcow2 backup
      anchoring a bitmap (`cowfs backup --bitmap --wait`), the dirty writes of (e) through
      the live file, then `cowfs backup --sync incremental --backing FULL --wait` timed as
      a user waits for it (+fsync; no mount in it: the mount is running), and the job's own
      `elapsed_s` from status (+fsync), against QEMU's incremental job of the same dirty
      set in the same repetition (as in (e)), and against (e)'s mount -> finish when (e)
      ran too; then `cowfs unmount`. Both backups must equal the source as it was.
  (i) views (issue 11): the whole image read (1 MiB reads, page cache dropped first)
      through a `--sync none --view` job's view while the 64K writer writes to the live
      file, vs the plain image read with no writer, vs QEMU's own fleecing in the same
      repetition (qemu-storage-daemon: a copy-before-write filter over the source into
      a qcow2 fleecing image, snapshot-access over it, both FUSE exports). The view's
      hash must equal the pristine image's. The writer's MiB/s during the read against
      the same passes with the job running and no reader.
  (j) checksums, verify and restore: a chain built as in (h) on one running mount (a full
      qcow2 backup anchoring a bitmap, then per `--dirty` percentage the dirty writes --
      other offsets for each link -- and an incremental over the link before), read back
      with a warm page cache (os.sync before each timed command, as (c) and (f), no drop):
      `cowfs verify TOP` vs `qemu-img check` of every link + `qemu-img convert -n` of the top
      into a null-co node (every cluster read, nothing written), and vs the same checks +
      `qemu-img convert -O raw` into a file; `cowfs restore TOP DEST` (+fsync) vs `qemu-img
      convert -O raw` (+fsync: qemu-img's default cache mode does not flush), and both into
      qcow2. Every output must equal the source as it was at the top's point in time. What
      the checksums cost a full backup: XXH3-128 of the image's non-zero 64K clusters in
      process (and through `Checksums.data`, as the job records them) over the chain's full
      backup (job + fsync); with `--baseline-rev REV` (e.g. e7f9d40, the commit before
      checksums; needs this repository's history) also full backups by REV's code and this
      tree's, alternating ABBA. Then `LIVE_READS` 64K reads of distinct clusters of the upper
      half right after `cowfs restore TOP DEST --live MP --speed --live-speed` (20M) returns
      (the copier, filling from the start, does not reach them: every read restores its
      cluster first), vs the same reads of the raw file `cowfs restore` wrote (page cache)
      and of QEMU's nearest, a read-only qemu-storage-daemon FUSE export of the qcow2 chain;
      each read checked against the restored file. The live restore is then stopped with
      SIGTERM (it stays resumable; `cowfs unmount` would wait for the whole copy).
  (k) crash-safe change tracking (issue 9): the writes of (b) through a mount with no
      job, once with no bitmap (no tracking) and once with one (every write marks it,
      the first write into a region waits for its intent record, saves every 10 s),
      back to back in each repetition; then what a crash leaves: (h)'s dirty writes
      through a mount with a bitmap, kill -9 right after them (default intent regions
      of 64 MiB, and 1 MiB ones) or once saves cleared the intent, and the recovered
      bitmap (`cowfs bitmap list` after the crash) against the clusters truly written
      (the daemon's own bitmap just before the kill). The incremental on a running
      mount with tracking on is (h).
  (l) a deduplicating repository on radosgw (issue 13; scripts/radosgw.sh starts a
      throwaway one-node Ceph): on one long-lived mount, a full backup into the
      repository vs into a local qcow2 file (and QEMU's full job for context); 1 % and
      10 % incrementals of random 64 KiB writes into each, time and bytes uploaded vs
      the qcow2 link's; ten daily 1 % incrementals, the bytes stored in the bucket vs
      the qcow2 chain's; a restore from the repository vs from the chain.
  (m) the FUSE wall: (b)'s writes, per block size, side by side in one repetition, into
      the plain file and through bare FUSE file systems whose write is one pwrite --
      pyfuse3 (scripts/benchkit/wall/nullfs.py) and C libfuse3 low-level (nullfs.c, built
      at run time; single- and multi-threaded) -- and an idle `cowfs mount`, each without
      and with the kernel's writeback cache: how much of cowfs's gap to the plain file is
      FUSE, how much pyfuse3, how much cowfs.

The table shows medians over `--repeat` and the spread (min-max) of the per-repetition
ratios. `--phases` picks any of a-m, comma-separated (default all); figures of a
`--py-spy` run are not comparable.

Run as root with the project's venv:  .venv/bin/python scripts/bench.py
Everything lives in a private directory under `--workdir`, removed unless `--keep`.
Every mount, daemon and child is torn down on exit, Ctrl-C or SIGTERM.

This file is the entry point and the documentation; the code is the package beside it,
`scripts/benchkit/` (harness, qemu, phases as a table of functions, report, cli).
"""

import sys

from benchkit.cli import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__ or ""))
