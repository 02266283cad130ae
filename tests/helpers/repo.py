"""Repositories under test (cowfs/repo/FORMAT.md): a directory or a bucket on radosgw,
read the way FORMAT.md says any tool may read them, without cowfs's own code.

`Repo` runs the `cowfs repo ...` commands a user runs (its URL, and for S3 the
endpoint given once to `repo init` and remembered), and reads the objects behind
them itself: manifests (JSON), indexes (parsed and checked here), chunk objects
(listed, sized, damaged on purpose). `Objects` is that raw access, a directory's
files or an S3 bucket's keys through boto3, with the same answers for both.
"""

import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from helpers.mounting import run_cowfs

HASH = 32
ZERO = bytes(HASH)
INDEX_HEADER = struct.Struct("<8sIIQQ")
"""FORMAT.md's index: magic, version, chunk size, image size, chunk count."""
CHUNK_MAGIC = b"CWCHUNK1"


class Objects(Protocol):
    """The keys of a repository as plain objects."""

    def listing(self, prefix: str = "") -> dict[str, int]:
        """Every key under `prefix` with its size."""
        ...

    def get(self, key: str) -> bytes: ...
    def put(self, key: str, data: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def fingerprint(self) -> dict[str, str]:
        """Every key with what identifies its content: to prove nothing changed."""
        ...


class DirObjects:
    def __init__(self, root: Path) -> None:
        self.root = root

    def listing(self, prefix: str = "") -> dict[str, int]:
        if not self.root.is_dir():
            return {}
        out = {}
        for path in self.root.rglob("*"):
            key = str(path.relative_to(self.root))
            if path.is_file() and key.startswith(prefix) and not path.name.startswith("."):
                out[key] = path.stat().st_size
        return out

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def delete(self, key: str) -> None:
        (self.root / key).unlink()

    def fingerprint(self) -> dict[str, str]:
        if not self.root.exists():
            return {}
        found = {}
        for path in self.root.rglob("*"):  # temporary files too: nothing may appear
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[str(path.relative_to(self.root))] = digest
        return found


class S3Objects:
    """A bucket and key prefix through boto3 (path-style, as radosgw wants)."""

    def __init__(
        self, endpoint: str, access_key: str, secret_key: str, bucket: str, prefix: str = "repo"
    ) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint, self.access_key, self.secret_key = endpoint, access_key, secret_key
        self.bucket = bucket
        self.prefix = prefix + "/"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def _all(self, prefix: str) -> Iterable[dict[str, Any]]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                yield from page.get("Contents", [])
        except self.client.exceptions.NoSuchBucket:
            return

    def beside(self, prefix: str) -> "S3Objects":
        """Another key prefix of the same bucket."""
        return S3Objects(self.endpoint, self.access_key, self.secret_key, self.bucket, prefix)

    def listing(self, prefix: str = "") -> dict[str, int]:
        start = len(self.prefix)
        return {o["Key"][start:]: o["Size"] for o in self._all(self.prefix + prefix)}

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def fingerprint(self) -> dict[str, str]:
        """Keys of the whole bucket (not only the prefix) with their ETags."""
        return {o["Key"]: f"{o['ETag']} {o['Size']}" for o in self._all("")}

    def bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            return False
        return True

    def remove_bucket(self) -> None:
        """Every object, then the bucket (the cluster's memory is for every test)."""
        if not self.bucket_exists():
            return
        for o in list(self._all("")):
            self.client.delete_object(Bucket=self.bucket, Key=o["Key"])
        self.client.delete_bucket(Bucket=self.bucket)


# -- the repository's objects as FORMAT.md defines them ---------------------------------------


@dataclass(frozen=True)
class Index:
    chunk_size: int
    size: int
    hashes: list[bytes]

    def chunks(self) -> set[bytes]:
        """The chunk objects this index references (all-zero chunks are stored nowhere)."""
        return {h for h in self.hashes if h != ZERO}


def parse_index(data: bytes) -> Index:
    """FORMAT.md's index, every field checked."""
    body, check = data[:-HASH], data[-HASH:]
    assert hashlib.sha256(body).digest() == check, "index: SHA-256 of its body does not match"
    magic, version, chunk_size, size, count = INDEX_HEADER.unpack_from(body)
    assert (magic, version) == (b"CWINDEX1", 1), (magic, version)
    assert count == -(-size // chunk_size), (count, size, chunk_size)
    assert len(body) == INDEX_HEADER.size + count * HASH, len(body)
    start = INDEX_HEADER.size
    return Index(
        chunk_size, size, [body[start + i * HASH : start + (i + 1) * HASH] for i in range(count)]
    )


def chunk_key(digest: bytes) -> str:
    h = digest.hex()
    return f"chunks/{h[:2]}/{h[2:4]}/{h}"


def chunk_hashes(data: bytes, chunk_size: int) -> list[bytes]:
    """What an index of an image holding `data` must say, chunk by chunk."""
    out = []
    for offset in range(0, len(data), chunk_size):
        piece = data[offset : offset + chunk_size]
        out.append(ZERO if not any(piece) else hashlib.sha256(piece).digest())
    return out


def stamp_key(snapshot: str, suffix: str) -> str:
    image, _, stamp = snapshot.rpartition("@")
    return f"snapshots/{image}/{stamp}{suffix}"


class Repo:
    """A repository as a user names it (`url`), with its objects beside it."""

    def __init__(self, kind: str, url: str, objects: Objects, endpoint: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.objects = objects
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"<Repo {self.url}>"

    # commands

    def cowfs(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """A cowfs command as a user runs it: no traceback, whatever its exit code."""
        result = run_cowfs(*args)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def init(self, chunk_size: str | None = "1M") -> subprocess.CompletedProcess[str]:
        args: list[str | Path] = ["repo", "init", self.url]
        if chunk_size is not None:
            args += ["--chunk-size", chunk_size]
        if self.endpoint is not None:
            args += ["--endpoint", self.endpoint]  # remembered: no other command needs it
        result = self.cowfs(*args)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert result.stdout.startswith(f"initialised {self.url}: "), result.stdout
        return result

    def repo(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cowfs("repo", action, self.url, *args)

    def rows(self) -> list[dict[str, Any]]:
        """`cowfs repo list --json`."""
        result = self.repo("list", "--json")
        assert result.returncode == 0, (result.stdout, result.stderr)
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def snapshot_names(self) -> list[str]:
        return [row["snapshot"] for row in self.rows()]

    def verify(self) -> subprocess.CompletedProcess[str]:
        return self.repo("verify", "--quiet")

    def assert_verifies(self, snapshots: int | None = None) -> str:
        result = self.verify()
        assert result.returncode == 0, (result.stdout, result.stderr)
        last = result.stdout.splitlines()[-1]
        assert last.startswith("verify: ok: "), result.stdout
        if snapshots is not None:
            assert last.startswith(f"verify: ok: {snapshots} snapshot(s), "), result.stdout
        return result.stdout

    def gc(self, grace: str = "0") -> subprocess.CompletedProcess[str]:
        return self.repo("gc", "--grace", grace)

    def snapshot_url(self, snapshot: str) -> str:
        return f"{self.url}/{snapshot}"

    # objects

    def config(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.objects.get("cowfs-repo.json"))
        return doc

    def manifest(self, snapshot: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.objects.get(stamp_key(snapshot, ".json")))
        assert doc["snapshot"] == snapshot and doc["status"] == "complete", doc
        return doc

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Every snapshot's manifest, by listing snapshots/ (the snapshots that exist)."""
        out = {}
        for key in self.objects.listing("snapshots/"):
            if key.endswith(".json"):
                doc = json.loads(self.objects.get(key))
                out[doc["snapshot"]] = doc
        return out

    def index(self, snapshot: str) -> Index:
        manifest = self.manifest(snapshot)
        data = self.objects.get(manifest["index"])
        assert hashlib.sha256(data).hexdigest() == manifest["index_sha256"], snapshot
        index = parse_index(data)
        assert (index.size, index.chunk_size) == (manifest["size"], manifest["chunk_size"])
        assert len(index.hashes) == manifest["chunks"], manifest
        return index

    def referenced(self, snapshots: Iterable[str] | None = None) -> set[bytes]:
        """The chunks the indexes of `snapshots` (default: every snapshot) reference."""
        names = self.manifests() if snapshots is None else snapshots
        out: set[bytes] = set()
        for name in names:
            out |= self.index(name).chunks()
        return out

    def users(self, digest: bytes) -> set[str]:
        """The snapshots whose index references chunk `digest`."""
        return {name for name in self.manifests() if digest in self.index(name).hashes}

    def chunks(self) -> dict[bytes, int]:
        """Every chunk object: its digest and its size (compressed)."""
        out = {}
        for key, size in self.objects.listing("chunks/").items():
            name = key.rsplit("/", 1)[-1]
            assert key == chunk_key(bytes.fromhex(name)), f"a chunk at the wrong key: {key}"
            out[bytes.fromhex(name)] = size
        return out

    def stored_bytes(self) -> int:
        return sum(self.chunks().values())

    def locks(self) -> list[str]:
        return sorted(self.objects.listing("locks/"))

    def damage_chunk(self, digest: bytes) -> None:
        """Flip one byte in the payload of a chunk object (past its magic and codec)."""
        key = chunk_key(digest)
        data = bytearray(self.objects.get(key))
        at = len(CHUNK_MAGIC) + 1 + (len(data) - len(CHUNK_MAGIC) - 1) // 2
        data[at] ^= 0x40
        self.objects.put(key, bytes(data))

    def fingerprint(self) -> dict[str, str]:
        return self.objects.fingerprint()


def dir_repo(root: Path) -> Repo:
    return Repo("dir", str(root), DirObjects(root))


def restore_snapshot(repo: Repo, snapshot: str, dest: Path, *options: str) -> None:
    """`cowfs restore REPO/IMAGE@TIME DEST` must end complete."""
    result = repo.cowfs("restore", repo.snapshot_url(snapshot), dest, *options)
    assert result.returncode == 0, (snapshot, result.stdout, result.stderr)
    assert result.stdout.startswith(f"restored: {dest} (raw, "), result.stdout
    assert "every cluster verified" in result.stdout, result.stdout


def copy_of(path: Path, into: Path) -> Path:
    shutil.copyfile(path, into)
    return into
