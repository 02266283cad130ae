"""The radosgw harness itself (scripts/radosgw.sh, helpers/radosgw.py): a real S3 engine
answers, clusters in two DIRs stay apart, and stop leaves no daemon behind. If these fail,
every S3 test against radosgw is suspect."""

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers.mounting import pid_gone
from helpers.radosgw import (
    Endpoint,
    make_bucket,
    parse_exports,
    running_radosgw,
    s3_client,
    start,
    stop,
)

MiB = 1 << 20


def test_put_get_list_delete(radosgw: Endpoint) -> None:
    """A 4 MiB object (one RADOS stripe) goes in and comes back byte for byte."""
    client = make_bucket(radosgw, "harness-roundtrip")
    data = os.urandom(4 * MiB)
    client.put_object(Bucket="harness-roundtrip", Key="dir/blob", Body=data)
    assert client.get_object(Bucket="harness-roundtrip", Key="dir/blob")["Body"].read() == data
    listed = client.list_objects_v2(Bucket="harness-roundtrip")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("dir/blob", 4 * MiB)]
    client.delete_object(Bucket="harness-roundtrip", Key="dir/blob")
    assert client.list_objects_v2(Bucket="harness-roundtrip")["KeyCount"] == 0
    client.delete_bucket(Bucket="harness-roundtrip")


def test_printed_env_is_the_written_env(radosgw: Endpoint) -> None:
    """DIR/env is what start printed, and the ports keep clear of the OSD's 6800-7300."""
    assert parse_exports((radosgw.dir / "env").read_text()) == radosgw.env()
    url = urlsplit(radosgw.url)
    assert url.hostname == "127.0.0.1" and not 6800 <= (url.port or 0) <= 7300
    assert set(radosgw.pids()) == {"mon.a", "osd.0", "client.rgw"}
    assert not any(pid_gone(pid) for pid in radosgw.pids().values())


def test_two_clusters_at_once_and_stop_kills_them(tmp_path: Path) -> None:
    """Two clusters started together are independent (ports, fsid, buckets); a second start
    in a running DIR is refused; stop kills exactly its own daemons, keeps the logs."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    with contextlib.ExitStack() as stack:
        for d in dirs:
            stack.callback(stop, d)
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(start, dirs)
        assert a.url != b.url
        fsids = {(d / "ceph.conf").read_text().split("fsid = ")[1].split()[0] for d in dirs}
        assert len(fsids) == 2
        make_bucket(a, "only-in-a").put_object(Bucket="only-in-a", Key="k", Body=b"a")
        assert [x["Name"] for x in s3_client(b).list_buckets()["Buckets"]] == []
        with pytest.raises(RuntimeError, match="already running"):
            start(dirs[0])

        a_pids, b_pids = a.pids(), b.pids()
        assert len(a_pids) == len(b_pids) == 3 and not set(a_pids.values()) & set(b_pids.values())
        stop(dirs[0])
        assert all(pid_gone(pid) for pid in a_pids.values())
        assert not any(pid_gone(pid) for pid in b_pids.values()), "stopping a killed b"
        assert s3_client(b).list_buckets()["Buckets"] == []
    assert all(pid_gone(pid) for pid in b_pids.values())
    for d in dirs:
        assert not (d / "pids").exists() and not (d / "mon.a").exists()
        assert (d / "client.rgw.log").exists()  # for the post-mortem
    stop(dirs[0])  # idempotent
    stop(tmp_path / "never-started")


def test_failed_start_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    """A mon port in the OSD's range is refused before anything starts."""
    with (
        pytest.raises(RuntimeError, match="COWFS_MON_PORT=6800 is in the OSD's port range"),
        running_radosgw(tmp_path / "c", {"COWFS_MON_PORT": "6800"}),
    ):
        pass
    assert not (tmp_path / "c" / "pids").exists()
