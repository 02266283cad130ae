"""A repository endpoint that misbehaves during a backup (the repository issue, "Faults").

Why: object stores fail in ways a local disk does not: 500s and throttling for a
while, connections refused, answers that never come. A backup must ride out a short
outage (retries with back-off), and one that lasts must fail the job with the reason,
leave no snapshot, and leave the bitmap holding the union, so that the next
incremental, once the endpoint is back, still restores the image at its point in
time. Real radosgw behind a fault-injecting proxy (tests/helpers/s3faults.py); the
mount, the writes and the restores are real.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import files_equal, make_image
from helpers.mounting import Cli, Mounted
from helpers.radosgw import Endpoint, make_bucket
from helpers.s3faults import FaultProxy
from helpers.sizes import MiB

SIZE = 12 * MiB
CHUNK = "1M"


@pytest.fixture
def setup(
    tmp_path: Path,
    radosgw: Endpoint,  # noqa: F811 (the fixture)
) -> Iterator[tuple[Mounted, FaultProxy, Cli, str]]:
    """A mount of one image, a fresh bucket behind a proxy, and a CLI whose S3 requests
    give up fast (3 tries, 1 s timeouts) so a lasting fault fails within seconds."""
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    make_bucket(radosgw, bucket)
    env = (
        os.environ
        | radosgw.env()
        | {
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "COWFS_S3_MAX_ATTEMPTS": "3",
            "COWFS_S3_TIMEOUT": "1",
        }
    )
    cli = Cli(env=env)
    image = make_image(tmp_path / "vda.img", SIZE, seed=7)
    with FaultProxy(radosgw.url) as proxy:
        url = f"s3://{bucket}/repo"
        init = cli.cowfs("repo", "init", url, "--endpoint", proxy.url, "--chunk-size", CHUNK)
        assert init.returncode == 0, init.stderr
        with Mounted(image, tmp_path / "mnt", cli=cli) as m:
            yield m, proxy, cli, url


def backup(cli: Cli, m: Mounted, url: str, *options: str):
    return cli.cowfs(
        "backup", m.mountpoint, "--repo", url, "--bitmap", "nightly", *options, "--wait"
    )


def snapshots(cli: Cli, url: str) -> list[str]:
    listing = cli.cowfs("repo", "list", url, "--json")
    assert listing.returncode == 0, listing.stderr
    import json

    return [row["snapshot"] for row in json.loads(listing.stdout)]


def restore_equals(cli: Cli, url: str, name: str, expected: Path, tmp: Path) -> None:
    dest = tmp / f"restored-{uuid.uuid4().hex[:6]}.img"
    done = cli.cowfs("restore", f"{url}/{name}", dest)
    assert done.returncode == 0, done.stdout + done.stderr
    assert files_equal(dest, expected)


def dirty(m: Mounted, offsets: list[int]) -> None:
    fd = os.open(m.live, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, os.urandom(64 << 10), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_short_outage_is_ridden_out(setup, tmp_path):
    m, proxy, cli, url = setup
    proxy.fail(500, count=2, methods={"PUT"}, path_contains="/chunks/")
    proxy.fail(503, count=1, methods={"PUT"}, path_contains="/chunks/")
    done = backup(cli, m, url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert proxy.faults_injected == 3
    [name] = snapshots(cli, url)
    restore_equals(cli, url, name, m.source, tmp_path)


@pytest.mark.parametrize("fault", ["500", "refused", "timeout"])
def test_a_lasting_fault_fails_the_job_and_the_bitmap_keeps_the_union(setup, tmp_path, fault):
    m, proxy, cli, url = setup
    assert backup(cli, m, url).returncode == 0
    dirty(m, [1 * MiB, 5 * MiB])
    expected = tmp_path / "expected.img"
    expected.write_bytes(m.source.read_bytes())
    if fault == "500":
        proxy.fail(500, path_contains="/chunks/")
    elif fault == "timeout":
        proxy.delay(5, methods={"PUT"}, path_contains="/chunks/")
    failed = backup(cli, m, url, "--sync", "incremental") if fault != "refused" else None
    if fault == "refused":  # the endpoint is gone before the backup starts: one clear error
        proxy.refuse()
        failed = backup(cli, m, url, "--sync", "incremental")
        assert failed.returncode == 2, failed.stdout + failed.stderr
        assert failed.stderr.count("\n") == 1 and "cowfs: error:" in failed.stderr
        proxy.accept()
    else:
        assert failed is not None and failed.returncode == 1, failed.stdout + failed.stderr
        job = m.status()["jobs"][-1]
        assert job["state"] == "failed" and "upload" in job["last_error"], job
    proxy.heal()
    assert len(snapshots(cli, url)) == 1, "a failed backup left a snapshot"
    dirty(m, [9 * MiB])  # more writes after the failure: the union must hold both
    expected.write_bytes(m.source.read_bytes())
    done = backup(cli, m, url, "--sync", "incremental")
    assert done.returncode == 0, done.stdout + done.stderr
    newest = sorted(snapshots(cli, url))[-1]
    restore_equals(cli, url, newest, expected, tmp_path)
    verify = cli.cowfs("repo", "verify", url)
    assert verify.returncode == 0, verify.stdout


def test_a_damaged_answer_is_found_by_restore_not_trusted(setup, tmp_path):
    m, proxy, cli, url = setup
    assert backup(cli, m, url).returncode == 0
    [name] = snapshots(cli, url)
    proxy.corrupt_next_get("/chunks/", offset=100)
    dest = tmp_path / "restored.img"
    done = cli.cowfs("restore", f"{url}/{name}", dest)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "chunk damaged" in done.stdout, done.stdout
    info = cli.cowfs("info", dest)
    assert info.returncode == 1 and info.stdout.startswith("failed"), info.stdout


def test_a_full_spool_fails_the_job_never_the_guest(setup, tmp_path):
    """Uploads stall (each PUT held 3 s) while the guest writes all over the image:
    copy-before-write fills the 2 MiB spool with chunks it cannot complete, and the job
    fails with that reason; every guest write succeeds and reads back; no snapshot."""
    m, proxy, cli, url = setup
    proxy.delay(3, methods={"PUT"}, path_contains="/chunks/")
    patient = Cli(env=(cli.env or {}) | {"COWFS_S3_TIMEOUT": "30"})  # slow, not failing
    started = patient.cowfs(
        "backup", m.mountpoint, "--repo", url, "--bitmap", "nightly", "--spool-size", "2M"
    )
    assert started.returncode == 0, started.stderr
    offsets = [n * MiB + k * 128 * 1024 for n in range(SIZE // MiB) for k in range(8)]
    data = {offset: os.urandom(8192) for offset in offsets}
    fd = os.open(m.live, os.O_RDWR)
    try:
        for offset, chunk in data.items():
            assert os.pwrite(fd, chunk, offset) == len(chunk)
        for offset, chunk in data.items():
            assert os.pread(fd, len(chunk), offset) == chunk
    finally:
        os.close(fd)
    proxy.heal()
    waited = cli.cowfs("finish", m.mountpoint)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "no snapshot" in waited.stdout, waited.stdout
    assert snapshots(cli, url) == []
    assert "spool is full" in m.log_tail(), m.log_tail()
