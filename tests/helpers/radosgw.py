"""A real S3 engine for tests: Ceph's radosgw as a throwaway one-node cluster on 127.0.0.1.

scripts/radosgw.sh does the work (one mon, one OSD on memstore, radosgw with beast, up in
a second or two); this module runs it, reads the `export` lines it prints, and makes sure
`stop` runs whatever happens, so no daemon outlives a test. Moto checks our requests
against a model of S3; this checks them against an implementation that has real
multipart, ETag and consistency behaviour.

Plain Python without pytest, so a bench can use it too.
"""

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "radosgw.sh"
# What scripts/setup.sh installs for this: the daemons and radosgw-admin (ceph-common).
PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
# Start takes a second or two; this only bounds a cluster that can never come up.
START_TIMEOUT = 120.0


@dataclass(frozen=True)
class Endpoint:
    """One running radosgw: where it listens, the S3 user's keys, and its cluster's DIR."""

    url: str
    access_key: str
    secret_key: str
    region: str
    dir: Path

    def env(self) -> dict[str, str]:
        """The variables the script printed, for a subprocess (`cowfs`, the AWS CLI)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.url,
        }

    def pids(self) -> dict[str, int]:
        """The daemons' pids by name (mon.a, osd.0, client.rgw), as the script recorded
        them: to prove that stop leaves none, or to measure their memory."""
        return {p.stem: int(p.read_text()) for p in sorted((self.dir / "pids").glob("*.pid"))}


def missing_tools() -> list[str]:
    """The harness's programs not on PATH: empty when the packages are installed."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def parse_exports(text: str) -> dict[str, str]:
    """`export NAME=VALUE` lines (what the script prints and writes to DIR/env) as a dict;
    other lines are ignored."""
    found = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line.removeprefix("export ").split("=", 1)
            found[name.strip()] = value.strip()
    return found


def _script(
    action: str, cluster_dir: Path, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), action, str(cluster_dir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start(
    cluster_dir: Path, env: Mapping[str, str] | None = None, timeout: float = START_TIMEOUT
) -> Endpoint:
    """`radosgw.sh start DIR`, with `env` added to ours (COWFS_RGW_PORT, COWFS_MON_PORT,
    COWFS_RGW_MEMSTORE...). RuntimeError with the script's own explanation if it fails
    (it has already killed what it started by then)."""
    if missing := missing_tools():
        raise RuntimeError(
            f"radosgw harness: {', '.join(missing)} not found; install Debian's "
            f"{' '.join(PACKAGES)} (scripts/setup.sh does)"
        )
    result = _script("start", cluster_dir, timeout, env)
    if result.returncode != 0:
        raise RuntimeError(
            f"radosgw.sh start {cluster_dir} failed ({result.returncode}):\n{result.stderr}"
        )
    printed = parse_exports(result.stdout)
    return Endpoint(
        url=printed["AWS_ENDPOINT_URL"],
        access_key=printed["AWS_ACCESS_KEY_ID"],
        secret_key=printed["AWS_SECRET_ACCESS_KEY"],
        region=printed["AWS_DEFAULT_REGION"],
        dir=Path(cluster_dir).resolve(),
    )


def stop(cluster_dir: Path) -> None:
    """`radosgw.sh stop DIR`: SIGKILLs the cluster's daemons and waits for them; keeps the
    logs. Idempotent. RuntimeError if a daemon survived."""
    result = _script("stop", cluster_dir, 60)
    if result.returncode != 0:
        raise RuntimeError(f"radosgw.sh stop {cluster_dir} failed:\n{result.stderr}")


@contextlib.contextmanager
def running_radosgw(cluster_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[Endpoint]:
    """A radosgw for the `with` block, its cluster (data in memory, config and logs in
    `cluster_dir`) stopped at the end even if the start or the block failed."""
    try:
        yield start(cluster_dir, env)
    finally:
        stop(cluster_dir)


def s3_client(endpoint: Endpoint) -> Any:
    """A boto3 S3 client for `endpoint`. Path-style addressing: radosgw has no DNS name
    here for virtual-host buckets."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=Config(s3={"addressing_style": "path"}),
    )


def make_bucket(endpoint: Endpoint, name: str) -> Any:
    """Creates bucket `name` (3-63 characters: S3's rule, which radosgw enforces) and
    returns the client that made it, for the test to go on with."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket=name)
    return client
