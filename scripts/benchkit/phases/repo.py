"""(l): backups into a deduplicating chunk repository on radosgw, against a qcow2 chain.

A throwaway one-node Ceph with radosgw (`scripts/radosgw.sh`, memstore) per repetition,
a bucket made with boto3 and `cowfs repo init s3://BUCKET/repo` (default 4M chunks); one
running mount of a fresh copy of the image, and two bitmaps on it, one per side, so
that both sides back up the same point in time and the same dirty set:

- full: `cowfs backup MP --repo URL --bitmap R --wait` against `--target FULL.qcow2
  --bitmap Q --wait` (+fsync), the order alternating by repetition; QEMU's full backup
  job into qcow2 (the anchor's `nowriter`, +fsync) for context;
- per `--dirty` percentage: random 64K writes through the live file (other offsets and
  data for each, as (j)), then an incremental into the repository against one into the
  next qcow2 link (`--backing` the link before): time, and bytes uploaded (`new_bytes` of
  `repo list --json`) against the link's allocated size;
- `DAILIES` daily incrementals of `DAILY_PCT` % fresh random writes each, on both sides:
  the chunk objects they added to the bucket (list_objects_v2 under chunks/) against
  the allocated size of their qcow2 links; and the whole bucket against the whole chain;
- restore of the newest snapshot: `cowfs restore URL/IMAGE@TIME DEST` against `cowfs
  restore TOP DEST` of the chain (every link in the page cache), MiB/s (+fsync); both
  must equal the source at that point in time.

The cowfs commands run with XDG_CACHE_HOME and XDG_CONFIG_HOME in the work directory
(the repository's chunk cache and remembered endpoint stay out of the user's home) and
the cluster's credentials in AWS_*; the mount's daemon is started with them too.
"""

import json
import os
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..anchor import qb
from ..harness import DIRTY_BS, REPO, MiB, ServingMount, fsync_seconds, log, py_spy, run_cowfs
from ..qemu import anchor_bench
from ..workspace import Bench

RADOSGW = REPO / "scripts" / "radosgw.sh"
BUCKET = "cowfs-bench"
PREFIX = "repo"
REPO_BITMAP, CHAIN_BITMAP = "repo", "chain"
"""One bitmap per side on the same mount: each counts writes since its own side's backup."""
DAILIES = 10
DAILY_PCT = 1.0
"""(l)'s daily incrementals: how many, and the share of the image each dirties."""


def repo_vs_qcow2(b: Bench, rep: int, item: None) -> dict[str, Any]:
    """(l) once per repetition: QEMU's full job, then one radosgw cluster and one mount
    for the full backups, the `--dirty` incrementals, the dailies and the restores."""
    n = f"{b.rep_name(rep)} (l)"
    log(f"{n} QEMU full backup job into qcow2 (context)")
    out: dict[str, Any] = {"qemu": anchor_bench(b, "nowriter", DIRTY_BS, 0, 0,
                                                "--target-format", "qcow2")}  # fmt: skip
    src, expected = b.fresh("l_src.raw"), b.wd / "l_expected.raw"
    links: list[Path] = []
    restored = [b.wd / "l_restored_repo.raw", b.wd / "l_restored_chain.raw"]
    rgw = b.wd / "l_rgw"
    xdg = b.wd / "l_xdg"
    try:
        with cowfs_env(xdg), radosgw(rgw, b.a.size) as endpoint:
            repo = Repo(endpoint)
            qb.sparse_copy(str(b.pristine), str(expected))
            with ServingMount(src, b.mnt) as m:
                out |= sides(b, rep, m, repo, links, expected)
                out["unmount_ok"] = m.end("unmount") == 0
            out["source_check"] = qb.compare_files(str(src), str(expected))
            log(f"{n} restore {out['top']} from the repository and from the qcow2 chain")
            out["restore"] = restores(b, rep, repo, out.pop("top"), links[-1], restored, expected)
    finally:
        b.rm(src, expected, *links, *restored)
        shutil.rmtree(xdg, ignore_errors=True)  # the chunk cache of a repository now gone
    out["restore"]["chain_links"] = len(links)
    return out


def sides(
    b: Bench, rep: int, m: ServingMount, repo: "Repo", links: list[Path], expected: Path
) -> dict[str, Any]:
    """Both sides' backups on the running mount `m`: full, `--dirty`, dailies. `links`
    fills with the qcow2 chain; `expected` follows the source."""
    n = f"{b.rep_name(rep)} (l)"
    out: dict[str, Any] = {"inc": {}}
    log(f"{n} full backup: repository on radosgw vs qcow2")
    links.append(b.wd / "l_full.qcow2")
    out["full"] = pair(b, rep, m, repo, links, ("--sync", "full"), "l_full")
    link = 0
    for pct in b.a.dirty:
        log(f"{n} {pct:g}% dirty: incremental into the repository vs into a qcow2 link")
        out["inc"][f"{pct:g}%"] = incremental(b, rep, m, repo, links, expected, pct, link)
        link += 1
    log(f"{n} {DAILIES} daily incrementals of {DAILY_PCT:g}% each, both sides")
    before = repo.chunk_bytes()
    chain_before = allocated(links)
    days = []
    for _ in range(DAILIES):
        days.append(incremental(b, rep, m, repo, links, expected, DAILY_PCT, link))
        link += 1
    stored, chain = repo.chunk_bytes(), allocated(links)
    out["daily"] = {
        "repo_stored_mib": (stored - before) / MiB,
        "chain_alloc_mib": (chain - chain_before) / MiB,
        "repo_new_mib": sum(d["repo"]["new_mib"] for d in days),
        "dirty_mib": sum(d["dirty_mib"] for d in days),
        "repo_s": statistics.median(d["repo"]["cli_s"] for d in days),
        "qcow2_s": statistics.median(d["qcow2"]["cli_plus_fsync_s"] for d in days),
        "complete_ok": all(d["repo"]["complete_ok"] and d["qcow2"]["complete_ok"] for d in days),
    }
    out["stored"] = {"bucket_mib": stored / MiB, "chain_mib": chain / MiB,
                     "snapshots": len(repo.rows())}  # fmt: skip
    out["top"] = days[-1]["repo"]["snapshot"] if days else out["full"]["repo"]["snapshot"]
    return out


def incremental(
    b: Bench,
    rep: int,
    m: ServingMount,
    repo: "Repo",
    links: list[Path],
    expected: Path,
    pct: float,
    link: int,
) -> dict[str, Any]:
    """`pct` % of the image dirtied through the live file (the `link`-th set of offsets
    and data), then an incremental on each side; the new qcow2 link joins `links`."""
    wl = b.dirty_workload(pct, link=link)
    qb.run_workload(str(m.live), wl)
    qb.apply_workload(str(expected), wl)
    os.sync()  # the writes' writeback must not land in the incrementals' window
    dirty = bitmap_dirty(m)
    links.append(b.wd / f"l_inc{len(links)}.qcow2")
    out = pair(b, rep, m, repo, links, ("--sync", "incremental"), f"l_inc_{pct:g}")
    out["dirty_mib"] = dirty[REPO_BITMAP] / MiB
    out["same_dirty_ok"] = dirty[REPO_BITMAP] == dirty[CHAIN_BITMAP]
    return out


def pair(
    b: Bench,
    rep: int,
    m: ServingMount,
    repo: "Repo",
    links: list[Path],
    sync: tuple[str, str],
    tag: str,
) -> dict[str, Any]:
    """One backup into the repository and one into `links[-1]` (backed by the link before
    it when incremental), in an order that alternates by repetition."""
    tgt = links[-1]
    backing = ("--backing", str(links[-2])) if len(links) > 1 else ()
    out: dict[str, Any] = {}
    for side in ("repo", "qcow2") if rep % 2 == 0 else ("qcow2", "repo"):
        os.sync()
        if side == "repo":
            with py_spy(m.pid, b.profile_path(f"{tag}_repo")):
                out["repo"] = repo.backup(m, *sync, "--bitmap", REPO_BITMAP)
        else:
            out["qcow2"] = b.timed_job(m, tgt, *sync, "--bitmap", CHAIN_BITMAP, *backing)
            out["qcow2"]["alloc_mib"] = tgt.stat().st_blocks * 512 / MiB
    return out


def bitmap_dirty(m: ServingMount) -> dict[str, int]:
    """Each bitmap's dirty bytes, from the daemon's status."""
    image = m.poll()["images"][0]
    return {bm["name"]: int(bm["dirty_bytes"]) for bm in image["bitmaps"]}


def allocated(paths: list[Path]) -> int:
    return sum(p.stat().st_blocks * 512 for p in paths)


def restores(
    b: Bench,
    rep: int,
    repo: "Repo",
    snapshot: str,
    top: Path,
    dests: list[Path],
    expected: Path,
) -> dict[str, Any]:
    """`cowfs restore URL/SNAPSHOT` and `cowfs restore TOP` into raw files (order
    alternating by repetition), each +fsync and checked against `expected`."""
    sources = {"repo": (f"{repo.url}/{snapshot}", "--endpoint", repo.endpoint),
               "chain": (str(top),)}  # fmt: skip
    out: dict[str, Any] = {}
    for side in ("repo", "chain") if rep % 2 == 0 else ("chain", "repo"):
        dest = dests[0] if side == "repo" else dests[1]
        os.sync()
        restore_s, done = qb.timed(run_cowfs, "restore", sources[side][0], str(dest),
                                   *sources[side][1:])  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"cowfs restore failed: {done.stdout.strip()} {done.stderr.strip()}")
        fsync_s = fsync_seconds(dest)
        total = restore_s + fsync_s
        out[side] = {"restore_s": restore_s, "fsync_s": fsync_s, "total_s": total,
                     "mib_s": b.a.size / MiB / total,
                     "verify": qb.compare_files(str(dest), str(expected))}  # fmt: skip
        b.rm(dest)
    return out


# -- the repository and its S3 engine ---------------------------------------------------


class Repo:
    """`s3://BUCKET/PREFIX` on the cluster at `endpoint`: made (bucket, `repo init`) on
    creation; its backups, rows and chunk objects."""

    def __init__(self, endpoint: str) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        self.url = f"s3://{BUCKET}/{PREFIX}"
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}),
        )
        self.s3.create_bucket(Bucket=BUCKET)
        done = run_cowfs("repo", "init", self.url, "--endpoint", endpoint)
        if done.returncode:
            raise RuntimeError(f"cowfs repo init failed: {done.stderr.strip()}")

    def backup(self, m: ServingMount, *options: str) -> dict[str, Any]:
        """`cowfs backup MP --repo URL ... --wait` timed as a user waits for it (nothing
        to fsync: the job is complete once its manifest is stored), the job's own
        `elapsed_s`, and what `repo list` says of the snapshot."""
        argv = ("backup", str(m.mountpoint), "--repo", self.url, "--endpoint", self.endpoint)
        cli_s, done = qb.timed(run_cowfs, *argv, *options, "--wait")
        if not done.stdout.strip():
            raise RuntimeError(f"cowfs backup --repo failed: {done.stderr.strip()}")
        job = m.job(int(done.stdout.split()[0]))
        snapshot = str(job["target"]).rpartition("/")[2]
        row = next((r for r in self.rows() if r["snapshot"] == snapshot), None)
        return {
            "complete_ok": done.returncode == 0 and job["state"] == "complete" and bool(row),
            "snapshot": snapshot,
            "bytes_written": job["bytes_written"],
            "cli_s": round(cli_s, 4),
            "job_s": job["elapsed_s"],
            "new_mib": row["new_bytes"] / MiB if row else 0.0,
        }

    def rows(self) -> list[dict[str, Any]]:
        """`cowfs repo list --json`."""
        done = run_cowfs("repo", "list", self.url, "--json", "--endpoint", self.endpoint)
        done.check_returncode()
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def chunk_bytes(self) -> int:
        """The sizes of every chunk object in the bucket (list_objects_v2 under chunks/)."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{PREFIX}/chunks/"
        )
        return sum(o["Size"] for page in pages for o in page.get("Contents", []))


@contextmanager
def radosgw(where: Path, image_size: int) -> Iterator[str]:
    """`scripts/radosgw.sh start WHERE`, its variables (credentials) in os.environ while
    the block runs; its endpoint. Stopped (and its memory freed) on exit, whatever
    happened. The OSD keeps every object in memory: its cap covers a full backup, the
    incrementals and the dailies (chunks are whole 4 MiB, so a 1 % random dirty set
    uploads about half the image), and it allocates only what is stored."""
    memstore = max(4 << 30, image_size * (4 + DAILIES))
    env = dict(os.environ, COWFS_RGW_MEMSTORE=str(memstore))
    try:
        done = subprocess.run(["bash", str(RADOSGW), "start", str(where)], env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"radosgw.sh start failed: {done.stderr.strip()[-2000:]}")
        exported = dict(
            line.removeprefix("export ").split("=", 1)
            for line in done.stdout.splitlines()
            if line.startswith("export ")
        )
        with patched_env(exported):
            yield exported["AWS_ENDPOINT_URL"]
    finally:
        stop = subprocess.run(["bash", str(RADOSGW), "stop", str(where)], capture_output=True,
                              text=True, check=False)  # fmt: skip
        if stop.returncode:
            log(f"radosgw.sh stop {where} failed: {stop.stderr.strip()}")


@contextmanager
def cowfs_env(xdg: Path) -> Iterator[None]:
    """The repository's chunk cache and remembered endpoints in `xdg`, not in ~."""
    with patched_env({"XDG_CACHE_HOME": str(xdg / "cache"),
                      "XDG_CONFIG_HOME": str(xdg / "config")}):  # fmt: skip
        yield


@contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                with suppress(KeyError):
                    del os.environ[k]
            else:
                os.environ[k] = v
