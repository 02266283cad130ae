"""What a run's repetitions come to: medians, spreads, the table of ratios, the checks.

The figures are relative by design -- cowfs against QEMU in the same run, against `cp`,
against the plain file -- so the table shows each ratio next to the issue's floor, with
the spread (min-max) of the per-repetition ratios, because figures from another day or
another load on these shared 2-core machines mean little. The table's rows are data
(`ROWS`: label, cowfs key, reference key, unit, floor), read from the flattened result,
so a phase that did not run leaves no row. A check is any boolean or exit code in the
result whose key says it is one (`checks`); the run fails if one is false.

This module measures nothing and starts nothing: it reads the results `phases` produced.
"""

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from .harness import MiB
from .phases.backups import RSS_LIMIT_MIB
from .phases.barrier import BARRIER_GOAL_MS
from .phases.chain import LIVE_READS
from .phases.repo import DAILIES, DAILY_PCT

Row = tuple[str, str, str, str, str]
"""(label, cowfs key, reference key, unit, floor on the ratio): one line of the table."""

CONSTANT_REFS = {"limit": RSS_LIMIT_MIB, "goal": BARRIER_GOAL_MS}
"""Table references that are fixed figures, not measurements."""

ROWS: list[tuple[str, list[Row]]] = [
    ("bs", [
        ("(a) {k} writes during backup", "a.{bs}.cowfs.writer.mib_s",
         "a.{bs}.qemu.backup.writer.mib_s", "MiB/s", ">=1 (vs QEMU)"),
        ("(a) {k} p99 latency", "a.{bs}.cowfs.writer.lat_us.p99",
         "a.{bs}.qemu.backup.writer.lat_us.p99", "us", ""),
        ("(a) {k} during copy only", "a.{bs}.cowfs.writer.during_job.mib_s",
         "a.{bs}.qemu.backup.writer.during_job.mib_s", "MiB/s", ">=1 (vs QEMU)"),
        ("(b) {k} idle mount vs plain", "b.{bs}.cowfs.writer.mib_s",
         "b.{bs}.plain.writer.mib_s", "MiB/s", ""),
        ("(b) {k} idle p99 vs plain", "b.{bs}.cowfs.writer.lat_us.p99",
         "b.{bs}.plain.writer.lat_us.p99", "us", ""),
        ("(b) {k} idle mount vs QEMU idle", "b.{bs}.cowfs.writer.mib_s",
         "a.{bs}.qemu.fuse.writer.mib_s", "MiB/s", ""),
        ("(a) {k} wb: during backup vs QEMU", "a.{bs}.cowfs_wb.writer.mib_s",
         "a.{bs}.qemu.backup.writer.mib_s", "MiB/s", ""),
        ("(a) {k} wb: p99 vs QEMU", "a.{bs}.cowfs_wb.writer.lat_us.p99",
         "a.{bs}.qemu.backup.writer.lat_us.p99", "us", ""),
        ("(b) {k} wb: idle vs plain", "b.{bs}.cowfs_wb.writer.mib_s",
         "b.{bs}.plain.writer.mib_s", "MiB/s", ""),
        ("(b) {k} wb: idle p99 vs plain", "b.{bs}.cowfs_wb.writer.lat_us.p99",
         "b.{bs}.plain.writer.lat_us.p99", "us", ""),
    ]),
    ("", [
        ("(c) full backup vs QEMU job", "c.cowfs.job_plus_fsync_s",
         "c.qemu.nowriter.job_plus_fsync_s", "s", "<=1"),
        ("(c) full backup vs cp+fsync", "c.cowfs.job_plus_fsync_s", "c.cp.cp_total_s", "s",
         "<=3"),
        ("(c) incl. mount vs cp+fsync", "c.cowfs.with_mount_s", "c.cp.cp_total_s", "s", ""),
        ("(d) RSS 1 TiB top (limit)", "d.top.vm_hwm_mib", "limit", "MiB", "<1"),
        ("(d) RSS 1 TiB full (limit)", "d.full.vm_hwm_mib", "limit", "MiB", "<1"),
    ]),
    ("dirty", [
        ("(e) {p} dirty vs QEMU's dirty", "e.{p}.cowfs.dirty_mib",
         "e.{p}.qemu.nowriter.dirty_mib", "MiB", ""),
        ("(e) {p} full qcow2 vs QEMU full", "e.{p}.cowfs.full.job_plus_fsync_s",
         "e.{p}.qemu.nowriter.full_plus_fsync_s", "s", ""),
        ("(e) {p} incremental vs QEMU inc", "e.{p}.cowfs.inc.job_plus_fsync_s",
         "e.{p}.qemu.nowriter.job_plus_fsync_s", "s", ""),
        ("(e) {p} inc incl. mount vs QEMU", "e.{p}.cowfs.inc.with_mount_s",
         "e.{p}.qemu.nowriter.job_plus_fsync_s", "s", ""),
        ("(e) {p} inc vs full (incl. mount)", "e.{p}.cowfs.inc.with_mount_s",
         "e.{p}.cowfs.full.with_mount_s", "s", ""),
        ("(e) {p} inc/full: cowfs vs QEMU", "e.{p}.cowfs.inc_over_full",
         "e.{p}.qemu.nowriter.inc_over_full", "x", ""),
        ("(e) {p} inc file vs dirty data", "e.{p}.cowfs.inc.file_mib",
         "e.{p}.cowfs.dirty_mib", "MiB", ""),
    ]),
    ("", [
        ("(f) compressed vs qemu-img -c", "f.cowfs.job_plus_fsync_s",
         "f.qemu_img.convert_plus_fsync_s", "s", ""),
        ("(f) compr. incl. mount vs -c", "f.cowfs.with_mount_s",
         "f.qemu_img.convert_plus_fsync_s", "s", ""),
        ("(f) compressed size vs qemu-img -c", "f.cowfs.file_mib", "f.qemu_img.file_mib", "MiB",
         ""),
    ]),
    ("bs", [
        ("(g) {k} barrier p50 (goal 5 ms)", "g.{bs}.barrier_ms.p50", "goal", "ms", ""),
        ("(g) {k} barrier p99 (goal 5 ms)", "g.{bs}.barrier_ms.p99", "goal", "ms", "<1"),
        ("(g) {k} barrier max (goal 5 ms)", "g.{bs}.barrier_ms.max", "goal", "ms", ""),
        ("(g) {k} stall p99 (goal 5 ms)", "g.{bs}.stall_ms.p99", "goal", "ms", ""),
        ("(g) {k} p99 backups vs none", "g.{bs}.writer.lat_us.p99", "g.{bs}.idle.lat_us.p99",
         "us", ""),
        ("(g) {k} MiB/s backups vs none", "g.{bs}.writer.mib_s", "g.{bs}.idle.mib_s", "MiB/s",
         ""),
        ("(g) {k} wb: barrier p50 (goal)", "g.{bs}.wb.barrier_ms.p50", "goal", "ms", ""),
        ("(g) {k} wb: barrier p99 (goal)", "g.{bs}.wb.barrier_ms.p99", "goal", "ms", ""),
        ("(g) {k} wb: stall p99 (goal)", "g.{bs}.wb.stall_ms.p99", "goal", "ms", ""),
        ("(g) {k} wb: p99 vs no wb", "g.{bs}.wb.writer.lat_us.p99", "g.{bs}.writer.lat_us.p99",
         "us", ""),
    ]),
    ("dirty", [
        ("(h) {p} dirty vs QEMU's dirty", "h.{p}.cowfs.dirty_mib",
         "h.{p}.qemu.nowriter.dirty_mib", "MiB", ""),
        ("(h) {p} full --wait vs QEMU full", "h.{p}.cowfs.full.cli_plus_fsync_s",
         "h.{p}.qemu.nowriter.full_plus_fsync_s", "s", ""),
        ("(h) {p} inc --wait vs QEMU inc", "h.{p}.cowfs.inc.cli_plus_fsync_s",
         "h.{p}.qemu.nowriter.job_plus_fsync_s", "s", ""),
        ("(h) {p} inc job only vs QEMU inc", "h.{p}.cowfs.inc.job_plus_fsync_s",
         "h.{p}.qemu.nowriter.job_plus_fsync_s", "s", ""),
        ("(h) {p} inc vs (e) mount->finish", "h.{p}.cowfs.inc.cli_plus_fsync_s",
         "e.{p}.cowfs.inc.with_mount_s", "s", ""),
    ]),
    ("", [
        ("(i) view read vs plain read", "i.cowfs.mib_s", "i.plain.mib_s", "MiB/s", ""),
        ("(i) view read vs QEMU fleecing", "i.cowfs.mib_s", "i.qemu.mib_s", "MiB/s", ""),
        ("(i) writer, reading vs not", "i.writer_reading.mib_s", "i.writer_alone.mib_s",
         "MiB/s", ""),
        ("(i) writer vs QEMU's, reading", "i.writer_reading.mib_s",
         "i.qemu.writer_reading.mib_s", "MiB/s", ""),
        ("(j) verify vs check+convert null", "j.cowfs.verify.s", "j.qemu.verify.s", "s", ""),
        ("(j) verify vs check+convert raw", "j.cowfs.verify.s", "j.qemu.verify_file_s", "s",
         ""),
        ("(j) restore raw vs convert raw", "j.cowfs.restore_raw.total_s",
         "j.qemu.convert_raw.total_s", "s", ""),
        ("(j) restore qcow2 vs convert", "j.cowfs.restore_qcow2.total_s",
         "j.qemu.convert_qcow2.total_s", "s", ""),
        ("(j) qcow2 size vs convert", "j.cowfs.restore_qcow2.file_mib",
         "j.qemu.convert_qcow2.file_mib", "MiB", ""),
        ("(j) xxh3 share of full backup", "j.hash.xxh3_s", "j.chain.full.job_plus_fsync_s", "s",
         ""),
        ("(j) sums.data share of full", "j.hash.recording_s", "j.chain.full.job_plus_fsync_s",
         "s", ""),
        ("(j) full backup vs before sums", "j.baseline.new_s", "j.baseline.old_s", "s", ""),
        ("(j) live ready vs QSD export", "j.live.ready_s", "j.qsd.ready_s", "s", ""),
        ("(j) live read p50 vs plain file", "j.live.lat_us.p50", "j.plain.lat_us.p50", "us", ""),
        ("(j) live read p99 vs plain file", "j.live.lat_us.p99", "j.plain.lat_us.p99", "us", ""),
        ("(j) live read p50 vs QSD chain", "j.live.lat_us.p50", "j.qsd.lat_us.p50", "us", ""),
        ("(j) live read p99 vs QSD chain", "j.live.lat_us.p99", "j.qsd.lat_us.p99", "us", ""),
    ]),
    ("bs", [
        ("(k) {k} tracked vs untracked", "k.{bs}.tracked.mib_s", "k.{bs}.untracked.mib_s",
         "MiB/s", ">=0.97"),
        ("(k) {k} p99 tracked vs untracked", "k.{bs}.tracked.lat_us.p99",
         "k.{bs}.untracked.lat_us.p99", "us", ""),
    ]),
    ("dirty", [
        ("(k) {p} crash, 64M regions", "k.{p}.64M.recovered_mib", "k.{p}.64M.truly_dirty_mib",
         "MiB", ""),
        ("(k) {p} crash, 1M regions", "k.{p}.1M.recovered_mib", "k.{p}.1M.truly_dirty_mib",
         "MiB", ""),
        ("(k) {p} crash after 2 saves", "k.{p}.quiet.recovered_mib",
         "k.{p}.quiet.truly_dirty_mib", "MiB", ""),
    ]),
    ("", [
        ("(l) full: repo vs qcow2", "l.full.repo.cli_s", "l.full.qcow2.cli_plus_fsync_s", "s",
         ""),
        ("(l) full job: repo vs qcow2", "l.full.repo.job_s", "l.full.qcow2.job_plus_fsync_s",
         "s", ""),
        ("(l) full: repo vs QEMU qcow2 job", "l.full.repo.cli_s",
         "l.qemu.nowriter.job_plus_fsync_s", "s", ""),
        ("(l) full: qcow2 vs QEMU qcow2 job", "l.full.qcow2.cli_plus_fsync_s",
         "l.qemu.nowriter.job_plus_fsync_s", "s", ""),
        ("(l) full: uploaded vs qcow2 file", "l.full.repo.new_mib", "l.full.qcow2.alloc_mib",
         "MiB", ""),
    ]),
    ("dirty", [
        ("(l) {p} inc: repo vs qcow2", "l.inc.{p}.repo.cli_s",
         "l.inc.{p}.qcow2.cli_plus_fsync_s", "s", ""),
        ("(l) {p} inc: uploaded vs qcow2", "l.inc.{p}.repo.new_mib",
         "l.inc.{p}.qcow2.alloc_mib", "MiB", ""),
        ("(l) {p} inc: uploaded vs dirty", "l.inc.{p}.repo.new_mib", "l.inc.{p}.dirty_mib",
         "MiB", ""),
    ]),
    ("", [
        ("(l) 10 dailies: inc time (median)", "l.daily.repo_s", "l.daily.qcow2_s", "s", ""),
        ("(l) 10 dailies: stored vs chain", "l.daily.repo_stored_mib",
         "l.daily.chain_alloc_mib", "MiB", ""),
        ("(l) all: bucket chunks vs chain", "l.stored.bucket_mib", "l.stored.chain_mib", "MiB",
         ""),
        ("(l) restore: repo vs qcow2 chain", "l.restore.repo.mib_s", "l.restore.chain.mib_s",
         "MiB/s", ""),
    ]),
    ("bs", [
        (f"(m) {{k}} {label}", f"m.{{bs}}.{mine}.writer.mib_s", f"m.{{bs}}.{ref}.writer.mib_s",
         "MiB/s", "")
        for label, mine, ref in [
            ("pyfuse3 bare vs plain", "pyfuse3", "plain"),
            ("pyfuse3 bare wb vs plain", "pyfuse3_wb", "plain"),
            ("C libfuse vs plain", "libfuse", "plain"),
            ("C libfuse wb vs plain", "libfuse_wb", "plain"),
            ("C libfuse mt vs plain", "libfuse_mt", "plain"),
            ("C libfuse mt wb vs plain", "libfuse_mt_wb", "plain"),
            ("cowfs idle vs plain", "cowfs", "plain"),
            ("cowfs wb vs plain", "cowfs_wb", "plain"),
            ("pyfuse3 bare vs C libfuse", "pyfuse3", "libfuse"),
            ("pyfuse3 wb vs C libfuse wb", "pyfuse3_wb", "libfuse_wb"),
            ("cowfs idle vs pyfuse3 bare", "cowfs", "pyfuse3"),
            ("cowfs wb vs pyfuse3 wb", "cowfs_wb", "pyfuse3_wb"),
            ("cowfs wb vs C libfuse wb", "cowfs_wb", "libfuse_wb"),
        ]
    ]),
]  # fmt: skip
"""The table in order, in groups: once ("") or once per block size ("bs": {bs} is its bytes,
{k} its KiB as "64K") or per dirty percentage ("dirty": {p} is "1%")."""


def rows(sizes: list[int], dirty: list[float]) -> list[Row]:
    """`ROWS` for these block sizes and dirty percentages."""
    out: list[Row] = []
    for over, group in ROWS:
        fields: list[dict[str, Any]] = [{}]
        if over == "bs":
            fields = [{"bs": bs, "k": f"{bs // 1024}K"} for bs in sizes]
        elif over == "dirty":
            fields = [{"p": f"{pct:g}%"} for pct in dirty]
        for f in fields:
            out += [(label.format(**f), key.format(**f), ref.format(**f), unit, floor)
                    for label, key, ref, unit, floor in group]  # fmt: skip
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, bool | int | float):
            out[key] = v
    return out


def medians(reps: list[dict[str, Any]]) -> dict[str, Any]:
    flat = [flatten(r) for r in reps]
    keys = {k for f in flat for k in f}
    out: dict[str, Any] = {}
    for k in sorted(keys):
        vals = [f[k] for f in flat if k in f]
        out[k] = all(vals) if isinstance(vals[0], bool) else statistics.median(vals)
    return out


def floor_ok(ratio: float, floor: str) -> str:
    """'ok' or 'MISSED' for a floor such as '>=1 (vs QEMU)', '<=3' or '<1'; '' if none."""
    if not floor:
        return ""
    spec = floor.split()[0]
    op = spec.rstrip("0123456789.")
    bound = float(spec[len(op) :])
    ok = {">=": ratio >= bound, "<=": ratio <= bound, "<": ratio < bound}[op]
    return "ok" if ok else "MISSED"


def spread(reps: list[dict[str, Any]], key: str, ref_key: str) -> tuple[float, float] | None:
    """(min, max) of the per-repetition ratios of `key` to `ref_key`; None from one ratio."""
    ratios = []
    for f in reps:
        mine, ref = f.get(key), CONSTANT_REFS.get(ref_key, f.get(ref_key))
        if mine is not None and ref:
            ratios.append(mine / ref)
    return (min(ratios), max(ratios)) if len(ratios) > 1 else None


def table(
    med: dict[str, Any], reps: list[dict[str, Any]], sizes: list[int], dirty: list[float]
) -> tuple[list[dict[str, Any]], str]:
    """The table of medians; `reps` (flattened repetitions) give each ratio's spread."""
    out, lines = [], []
    head = (
        f"{'measure':34} {'cowfs':>9} {'reference':>10} {'ratio':>7} {'spread':>13} "
        f"{'unit':6} floor"
    )
    lines += [head, "-" * len(head)]
    for label, key, ref_key, unit, floor in rows(sizes, dirty):
        mine = med.get(key)
        ref = CONSTANT_REFS.get(ref_key, med.get(ref_key))
        if mine is None or not ref:
            continue
        ratio = mine / ref
        verdict = floor_ok(ratio, floor)
        lo_hi = spread(reps, key, ref_key)
        out.append({"measure": label, "cowfs": mine, "reference": ref, "ratio": ratio,
                    "spread": lo_hi, "unit": unit, "floor": floor,
                    "verdict": verdict})  # fmt: skip
        span = f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}" if lo_hi else ""
        lines.append(
            f"{label:34} {mine:9.4g} {ref:10.4g} {ratio:7.3f} {span:>13} {unit:6} {floor} "
            f"{verdict}".rstrip()
        )
    return out, "\n".join(lines)


def checks(med: dict[str, Any]) -> dict[str, bool]:
    """Every correctness check of the run, by key (medians of booleans are all())."""
    out = {k: v for k, v in med.items() if k.endswith((".equal", ".ok", "_ok"))}
    out |= {k: v == 0 for k, v in med.items() if k.endswith("finish_rc")}
    out |= {k: v for k, v in med.items() if k.endswith(".copied")}
    return out


def report(
    result: dict[str, Any], reps: list[dict[str, Any]], args: argparse.Namespace, elapsed: float
) -> int:
    """Complete `result` (JSON to `--json-out`), print the table and its legend; the
    exit code: 0 if every check passed, else 1."""
    med = medians(reps)
    ratios, text = table(med, [flatten(r) for r in reps], args.bs, args.dirty)
    ok = checks(med)
    result |= {"repeats": reps, "median": med, "ratios": ratios, "checks": ok,
               "ok": all(ok.values()), "elapsed_s": round(elapsed, 1)}  # fmt: skip
    result["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    m = result["meta"]
    print(
        f"cowfs bench: size {args.size // MiB} MiB, {args.total // MiB} MiB random writes, "
        f"speed {args.speed // MiB} MiB/s in (a), {args.repeat} repetition(s), medians; "
        f"{m['workdir_fs']['fstype']}, {m['cpus']} cpus (pinned: {args.cpus or 'no'}), "
        f"load {m['loadavg_start'][0]} -> {m['loadavg_end'][0]}, {elapsed:.0f} s"
    )
    legend(reps, args)
    print(text)
    spent = ", ".join(f"{k[8:]} {v:.0f} s" for k, v in med.items() if k.startswith("phase_s."))
    print(f"time per repetition (median): {spent}")
    bad = [k for k, v in ok.items() if not v]
    print(f"verification: {'PASS' if not bad else 'FAIL ' + ', '.join(bad)} ({len(ok)} checks)")
    return 0 if not bad else 1


def legend(reps: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """What the table's figures are, for the phases that ran."""
    print("(b) idle mount = a full backup whose copier has finished, still mounted")
    if "e" in args.phases:
        print("(e) incremental: mount -> finish (+fsync), no writer; QEMU: job (+fsync)")
    if "g" in args.phases:
        print(
            f"(g) {args.barriers} backup --sync none + cancel per repetition under the writer; "
            "barrier = how long it held new writes (status barrier_s); stall = the longest "
            "write during a backup command; none = the same passes, no job"
        )
    if "h" in args.phases:
        print(
            "(h) incremental on a running mount: backup --wait (+fsync) as the user waits, "
            "or the job's elapsed_s (+fsync); QEMU: job (+fsync)"
        )
    if "i" in args.phases:
        print(
            "(i) reading a --sync none view under the 64K writer vs the plain file (no "
            "writer) and QEMU's snapshot-access (same writer); the writer with vs without reader"
        )
        matched = [r["i"]["qemu"]["matches_pit"] for r in reps if "i" in r]
        print(f"(i) QEMU's view equal to the point in time: {matched} (cowfs's is checked)")
    if "j" in args.phases:
        print(
            "(j) a chain (full qcow2 + incrementals of --dirty) on a running mount, page cache "
            "warm (os.sync before each timed command, no drop); verify = `cowfs verify TOP` "
            "vs qemu-img check of each link + `qemu-img convert -n` into null-co (or into a "
            "raw file); restore (+fsync) vs qemu-img convert (+fsync: it does not flush)"
        )
        print(
            "(j) hashing share = XXH3-128 of the image's data clusters in process / the "
            "chain's full backup (job + fsync); 'before sums' = full backups by "
            "--baseline-rev, ABBA"
        )
        print(
            f"(j) {LIVE_READS} 64K preads of distinct clusters in the upper half, right after "
            f"`restore --live --speed {args.live_speed // MiB}M` returns, vs the restored raw "
            "file (page cache) and a read-only QSD FUSE export of the qcow2 chain"
        )
        per_read = [round(r["j"]["live"]["on_demand_per_read"], 2) for r in reps if "j" in r]
        print(f"(j) live restore: bytes restored on demand per 64K read: {per_read}")
    if "k" in args.phases:
        print(
            "(k) writes through an idle mount with a bitmap (intent records, saves) vs none; "
            "crash = the bitmap recovered after kill -9 vs the daemon's precise one"
        )
    if "l" in args.phases:
        print(
            "(l) one running mount, a bitmap per side: backup --repo s3://… on radosgw "
            "(memstore, 4M chunks) --wait vs --target qcow2 --wait (+fsync); uploaded = "
            "new_bytes of `repo list`, qcow2 = allocated (st_blocks); dailies: "
            f"{DAILIES} x {DAILY_PCT:g}% random 64K writes, chunk objects they added vs "
            "their qcow2 links; restore raw (+fsync) of the newest snapshot vs the chain's top"
        )
        links = [r["l"]["restore"]["chain_links"] for r in reps if "l" in r]
        print(f"(l) qcow2 chain links at the restore: {links}")
    if "m" in args.phases:
        print(
            "(m) the writer of (b), one repetition side by side, each on a fresh image: plain "
            "file; bare = a FUSE fs whose write is one pwrite (pyfuse3: wall/nullfs.py; C "
            "libfuse low-level: wall/nullfs.c, mt = multi-threaded loop); cowfs = idle "
            "`cowfs mount` (no job); wb = the kernel's writeback cache"
        )
    print("ratio = cowfs / reference: higher is better for MiB/s, lower for us, ms, s and MiB")
    print("spread = lowest-highest of the per-repetition ratios")
