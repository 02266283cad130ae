"""Object stores: where a repository's objects live, an S3 bucket or a local directory.

The repository (repository.py) needs five things of a store: put a whole object, get
it, ask whether it exists and how old it is, delete it, and list keys under a prefix
(only maintenance lists: verify, prune, gc, a rebuilt cache). Both stores give the
same answers, so the fast tests run on a directory and the real ones on radosgw.
Every failure is a RepoError that says what could not be done and why; an S3 store
retries what S3 says to retry, with back-off, before it gives up.
"""

import errno
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ..atomic import replace_file
from ..errors import CowfsError


class RepoError(CowfsError):
    """A repository operation failed; the message names the object and the reason."""


class MissingObject(RepoError):
    """The object is not in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes | memoryview) -> None: ...
    def get(self, key: str) -> bytes: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...


@dataclass(frozen=True)
class S3Access:
    """How to reach an S3 endpoint; sent from the CLI to the daemon with a backup request,
    so the daemon uses the credentials of whoever asked for the backup."""

    endpoint: str | None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    max_attempts: int = 6
    """Tries per request (boto3's standard retry mode: exponential back-off with jitter,
    on 5xx, throttling, timeouts and refused connections)."""
    timeout: float = 30.0
    """Seconds to connect, and to wait for each read of a response."""

    @classmethod
    def resolve(cls, endpoint: str | None) -> "S3Access":
        """The caller's credentials as boto3 finds them (environment, ~/.aws), read now."""
        import boto3

        session = boto3.session.Session()
        creds = session.get_credentials()
        if creds is None:
            raise RepoError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or configure ~/.aws/credentials)"
            )
        frozen = creds.get_frozen_credentials()
        return cls(
            endpoint=endpoint or os.environ.get("AWS_ENDPOINT_URL"),
            access_key=frozen.access_key,
            secret_key=frozen.secret_key,
            session_token=frozen.token,
            region=session.region_name or "us-east-1",
            max_attempts=int(os.environ.get("COWFS_S3_MAX_ATTEMPTS", "6")),
            timeout=float(os.environ.get("COWFS_S3_TIMEOUT", "30")),
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class S3Store:
    """A bucket and a key prefix on an S3 endpoint (boto3). Thread-safe: boto3 clients
    are, and every upload thread shares this one."""

    def __init__(self, bucket: str, prefix: str, access: S3Access) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(
            retries={"total_max_attempts": access.max_attempts, "mode": "standard"},
            connect_timeout=access.timeout,
            read_timeout=access.timeout,
            s3={"addressing_style": "path"},
            max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=access.endpoint,
            aws_access_key_id=access.access_key,
            aws_secret_access_key=access.secret_key,
            aws_session_token=access.session_token,
            region_name=access.region,
            config=config,
        )

    def put(self, key: str, data: bytes | memoryview) -> None:
        self._call("writing", key, self.client.put_object, Body=bytes(data))

    def get(self, key: str) -> bytes:
        reply = self._call("reading", key, self.client.get_object)
        try:
            return reply["Body"].read()
        except Exception as e:  # a connection that breaks mid-body: botocore's many kinds
            raise RepoError(f"reading {self.url}/{key}: {e}") from None

    def head(self, key: str) -> ObjectInfo | None:
        try:
            reply = self._call("looking up", key, self.client.head_object)
        except MissingObject:
            return None
        return ObjectInfo(key, reply["ContentLength"], reply["LastModified"])

    def delete(self, key: str) -> None:
        self._call("deleting", key, self.client.delete_object)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    yield ObjectInfo(key, item["Size"], item["LastModified"])
        except Exception as e:
            raise self._error("listing", prefix, e) from None

    def check(self) -> None:
        """Before anything starts: the bucket exists and these credentials may use it."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._error("opening the bucket of", "", e) from None

    def create_bucket(self) -> None:
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            return
        except Exception as e:
            raise self._error("creating the bucket of", "", e) from None

    def _call(self, doing: str, key: str, method: Any, **kwargs: Any) -> Any:
        try:
            return method(Bucket=self.bucket, Key=self.prefix + key, **kwargs)
        except Exception as e:  # botocore raises ClientError and a family of connection errors
            raise self._error(doing, key, e) from None

    def _error(self, doing: str, key: str, e: Exception) -> RepoError:
        where = f"{self.url}/{key}" if key else self.url
        response = getattr(e, "response", None)
        if response is not None:
            code = response.get("Error", {}).get("Code", "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") and key:
                return MissingObject(f"{where}: no such object")
            if code in ("NoSuchBucket",) or (status == 404 and not key):
                return RepoError(f"{doing} {where}: no bucket {self.bucket!r} on the endpoint")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                return RepoError(f"{doing} {where}: access denied ({code}): check the credentials")
            retried = " after retries" if isinstance(status, int) and status >= 500 else ""
            return RepoError(f"{doing} {where}: {code or status}{retried}")
        return RepoError(f"{doing} {where}: {e}")


class DirStore:
    """The same objects as files under a directory: keys are relative paths. Puts are
    atomic (temporary file, fsync, rename), as S3's are."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self.root / key
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, data, tmp=tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RepoError(f"writing {path}: {e.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{self.root / key}: no such object") from None
        except OSError as e:
            raise RepoError(f"reading {self.root / key}: {e.strerror}") from None

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self.root / key)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RepoError(f"looking up {self.root / key}: {e.strerror}") from None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, key: str) -> None:
        try:
            (self.root / key).unlink(missing_ok=True)
        except OSError as e:
            raise RepoError(f"deleting {self.root / key}: {e.strerror}") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        top = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if name.startswith("."):
                    continue  # a put in progress
                path = Path(dirpath) / name
                key = str(path.relative_to(self.root))
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def check(self) -> None:
        if not self.root.is_dir():
            raise RepoError(f"repository {self.root}: no such directory")
        if not os.access(self.root, os.W_OK):
            raise RepoError(f"repository {self.root}: {os.strerror(errno.EACCES)}")

    def create_bucket(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RepoError(f"creating {self.root}: {e.strerror}") from None


Store = S3Store | DirStore


def open_store(url: str, access: S3Access | None) -> Store:
    """`s3://bucket[/prefix]` (with `access`, resolved from the environment if None), or
    a local directory."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise RepoError(f"repository {url}: no bucket named")
        return S3Store(bucket, prefix, access or S3Access.resolve(None))
    if "://" in url:
        raise RepoError(f"repository {url}: only s3:// and local directories are known")
    return DirStore(Path(url).absolute())
