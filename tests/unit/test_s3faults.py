"""The fault-injecting S3 proxy (helpers/s3faults.py) itself: that it forwards boto3's
traffic so exactly that SigV4 signatures still verify, and that each fault looks to
boto3 the way the real failure would.

The upstream is moto's S3 server, run in-process with IAM authentication on, so that it
checks every signature (a proxy that altered Host, the target or the body would get
SignatureDoesNotMatch). HTTP framing that boto3 never sends (chunked request bodies,
bodies delimited by close, an upstream that drops idle connections) is checked against a
tiny echo upstream instead.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import random
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    FlexibleChecksumError,
    ReadTimeoutError,
)
from helpers.s3faults import FaultProxy, read_chunked_raw

BUCKET = "s3faults"
MIB = 1 << 20


@dataclass
class Upstream:
    """moto's S3, and the keys of an IAM user allowed s3:*."""

    url: str
    key_id: str
    secret: str


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[Upstream]:
    """moto's server on a free port, signatures checked, with one bucket.

    moto only authenticates once IAM authentication is on; its first three actions
    (creating the user, its policy and its key) are let through unauthenticated."""
    server_module = pytest.importorskip("moto.server")
    werkzeug_log = logging.getLogger("werkzeug")
    log_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    previous = _moto_reset_auth(url, "3")
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="s3faults")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="s3faults", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="s3faults")["AccessKey"]
        upstream = Upstream(url, key["AccessKeyId"], key["SecretAccessKey"])
        s3_client(upstream, url).create_bucket(Bucket=BUCKET)
        yield upstream
    finally:
        _moto_reset_auth(url, previous)
        server.stop()
        werkzeug_log.setLevel(log_level)


def _moto_reset_auth(url: str, count: str) -> str:
    """Set how many more actions moto lets through unauthenticated ("inf": all, its
    default); returns the previous setting, which is process-wide."""
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},  # not a form: moto reads the raw body
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])


def s3_client(upstream: Upstream, endpoint: str, secret: str | None = None, **config: Any) -> Any:
    """A boto3 S3 client for `endpoint`: path-style, and by default no retries, so that
    each fault reaches the test (botocore's standard mode would retry 5xx and
    connection errors twice). No retries is ``total_max_attempts: 1``: botocore's
    ``max_attempts`` counts retries, so ``max_attempts: 1`` is two attempts."""
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "retries": {"total_max_attempts": 1},
        "connect_timeout": 2,
        "read_timeout": 10,
    }
    options.update(config)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=upstream.key_id,
        aws_secret_access_key=secret or upstream.secret,
        config=Config(**options),
    )


@pytest.fixture
def proxy(moto_s3: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(moto_s3.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def s3(moto_s3: Upstream, proxy: FaultProxy) -> Any:
    return s3_client(moto_s3, proxy.url)


def put(s3: Any, key: str, data: bytes = b"payload") -> bytes:
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    return data


def get(s3: Any, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def error_code(info: pytest.ExceptionInfo[ClientError]) -> tuple[int, str]:
    response = info.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


# -- forwarding -----------------------------------------------------------------------------


def test_5mib_objects_round_trip_with_valid_signatures(
    moto_s3: Upstream, proxy: FaultProxy, s3: Any
) -> None:
    data = random.Random(5).randbytes(5 * MIB)
    s3.put_object(Bucket=BUCKET, Key="big/bytes", Body=data)
    # A file-like body makes botocore send Expect: 100-continue and wait for the 100.
    s3.put_object(Bucket=BUCKET, Key="big/file", Body=io.BytesIO(data))
    assert get(s3, "big/bytes") == data
    assert get(s3, "big/file") == data
    assert s3.head_object(Bucket=BUCKET, Key="big/file")["ContentLength"] == 5 * MIB
    # Keep-alive: one client, one connection, all five requests.
    assert proxy.connections_accepted == 1
    assert proxy.requests == [
        ("PUT", f"/{BUCKET}/big/bytes"),
        ("PUT", f"/{BUCKET}/big/file"),
        ("GET", f"/{BUCKET}/big/bytes"),
        ("GET", f"/{BUCKET}/big/file"),
        ("HEAD", f"/{BUCKET}/big/file"),
    ]
    # The upstream does check signatures: the round trips above were verified.
    forged = s3_client(moto_s3, proxy.url, secret="not-the-secret")
    with pytest.raises(ClientError) as info:
        forged.get_object(Bucket=BUCKET, Key="big/bytes")
    assert error_code(info) == (403, "SignatureDoesNotMatch")
    assert proxy.faults_injected == 0


# -- fail -------------------------------------------------------------------------------------


def test_fail_count_fails_that_many_requests_then_forwards(proxy: FaultProxy, s3: Any) -> None:
    data = put(s3, "fail/count")
    fault = proxy.fail(500, count=2)
    for _ in range(2):
        with pytest.raises(ClientError) as info:
            get(s3, "fail/count")
        assert error_code(info) == (500, "InternalError")
    assert get(s3, "fail/count") == data
    assert fault.hits == 2
    assert proxy.faults_injected == 2
    assert [seen.fault for seen in proxy.seen] == [None, "fail", "fail", None]


@pytest.mark.parametrize(
    ("status", "code"), [(500, "InternalError"), (503, "SlowDown"), (403, "AccessDenied")]
)
def test_fail_answers_as_s3_would(proxy: FaultProxy, s3: Any, status: int, code: str) -> None:
    put(s3, "fail/codes")
    proxy.fail(status)
    with pytest.raises(ClientError) as info:
        get(s3, "fail/codes")
    assert error_code(info) == (status, code)
    # HEAD responses have no body: botocore makes the code from the status alone.
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket=BUCKET, Key="fail/codes")
    assert error_code(info)[0] == status
    # An uploaded body is read before the fault: the connection stays usable.
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=BUCKET, Key="fail/codes", Body=io.BytesIO(b"x" * MIB))
    assert error_code(info) == (status, code)
    proxy.heal()
    assert get(s3, "fail/codes") == b"payload"
    assert proxy.connections_accepted == 1


def test_fail_matches_methods_and_paths_until_healed(proxy: FaultProxy, s3: Any) -> None:
    put(s3, "match/a")
    proxy.fail(503, methods=["put"], path_contains="match/b")
    assert get(s3, "match/a") == b"payload"
    put(s3, "match/a", b"other key: forwarded")
    with pytest.raises(ClientError):
        put(s3, "match/b")
    with pytest.raises(ClientError):
        put(s3, "match/b")
    proxy.heal()
    put(s3, "match/b")
    assert proxy.faults_injected == 2


def test_fail_for_seconds_expires_by_the_clock(moto_s3: Upstream) -> None:
    now = [1000.0]
    with FaultProxy(moto_s3.url, clock=lambda: now[0]) as proxy:
        s3 = s3_client(moto_s3, proxy.url)
        put(s3, "fail/seconds")
        fault = proxy.fail(500, seconds=30)
        with pytest.raises(ClientError):
            get(s3, "fail/seconds")
        now[0] += 29.9
        with pytest.raises(ClientError):
            get(s3, "fail/seconds")
        now[0] += 0.2
        assert get(s3, "fail/seconds") == b"payload"
        assert fault.hits == 2


def test_botocore_retries_a_500_by_itself(moto_s3: Upstream, proxy: FaultProxy) -> None:
    """Why the other tests turn retries off: botocore's default (standard mode, three
    attempts) hides a transient 500 -- the proxy sees both attempts."""
    s3 = s3_client(moto_s3, proxy.url, retries={"mode": "standard"})
    put(s3, "retry/me")
    proxy.clear_counters()
    proxy.fail(500, count=1)
    assert get(s3, "retry/me") == b"payload"
    assert proxy.requests == [("GET", f"/{BUCKET}/retry/me")] * 2
    assert [seen.fault for seen in proxy.seen] == ["fail", None]


def test_a_concurrent_multipart_upload_survives_a_failed_part(
    moto_s3: Upstream, proxy: FaultProxy
) -> None:
    """s3transfer's parallel part uploads (file-like bodies: Expect: 100-continue) on
    several keep-alive connections; `path_contains` sees the query string, so one part
    can be singled out, and botocore's own retry carries the upload past it."""
    s3 = s3_client(moto_s3, proxy.url, retries={"mode": "standard"})
    data = random.Random(16).randbytes(16 * MIB)
    proxy.fail(500, count=1, path_contains="partNumber=2")
    config = TransferConfig(
        multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=4
    )
    s3.upload_fileobj(io.BytesIO(data), BUCKET, "multipart/me", Config=config)
    assert get(s3, "multipart/me") == data
    parts = [seen for seen in proxy.seen if "partNumber=" in seen.target]
    assert len(parts) == 5  # four parts, the second one twice
    assert [seen.fault for seen in parts if "partNumber=2" in seen.target] == ["fail", None]


def test_an_unreachable_upstream_is_a_502(moto_s3: Upstream) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        upstream = f"http://127.0.0.1:{unused.getsockname()[1]}"
        with FaultProxy(upstream) as proxy, pytest.raises(ClientError) as info:
            get(s3_client(moto_s3, proxy.url), "anything")
    assert error_code(info) == (502, "BadGateway")


# -- refuse / accept --------------------------------------------------------------------------


def test_refuse_refuses_connections_until_accept(proxy: FaultProxy, s3: Any) -> None:
    put(s3, "refuse/me")  # leaves a pooled keep-alive connection, which refuse drops
    url = proxy.url
    proxy.refuse()
    with pytest.raises(EndpointConnectionError):
        get(s3, "refuse/me")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    proxy.accept()
    assert proxy.url == url
    assert get(s3, "refuse/me") == b"payload"


def test_refuse_drops_a_request_in_flight(proxy: FaultProxy, s3: Any) -> None:
    put(s3, "refuse/in-flight")
    proxy.clear_counters()
    proxy.delay(60)
    outcome = run_in_thread(lambda: get(s3, "refuse/in-flight"))
    proxy.wait_requests(1)
    started = time.monotonic()
    proxy.refuse()  # joins the held request's thread: it must not sit out its 60 s
    assert time.monotonic() - started < 5
    assert isinstance(outcome(), ConnectionClosedError)
    proxy.heal()
    proxy.accept()
    assert get(s3, "refuse/in-flight") == b"payload"


# -- delay ------------------------------------------------------------------------------------


def test_delay_beyond_the_read_timeout_times_out(moto_s3: Upstream) -> None:
    started = time.monotonic()
    with FaultProxy(moto_s3.url) as proxy:
        s3 = s3_client(moto_s3, proxy.url, read_timeout=0.5)
        put(s3, "delay/me")
        fault = proxy.delay(60, count=1, methods=["GET"])
        with pytest.raises(ReadTimeoutError):
            get(s3, "delay/me")
        assert get(s3, "delay/me") == b"payload"  # the count is spent
        assert fault.hits == 1
    # Leaving released the request still held: no 60 s wait.
    assert time.monotonic() - started < 10


def test_heal_releases_held_requests(proxy: FaultProxy, s3: Any) -> None:
    put(s3, "delay/heal")
    proxy.clear_counters()
    proxy.delay(60)
    outcome = run_in_thread(lambda: get(s3, "delay/heal"))
    proxy.wait_requests(1)
    proxy.heal()
    assert outcome() == b"payload"


# -- corrupt ----------------------------------------------------------------------------------


def test_corrupt_next_get_flips_exactly_one_byte(moto_s3: Upstream, proxy: FaultProxy) -> None:
    # Without checksum validation, to see the damage itself.
    s3 = s3_client(moto_s3, proxy.url, response_checksum_validation="when_required")
    data = put(s3, "corrupt/me", random.Random(7).randbytes(MIB))
    fault = proxy.corrupt_next_get("corrupt/me", offset=1000)
    assert s3.head_object(Bucket=BUCKET, Key="corrupt/me")["ContentLength"] == MIB  # not GET
    damaged = get(s3, "corrupt/me")
    assert len(damaged) == len(data)
    assert [i for i in range(len(data)) if damaged[i] != data[i]] == [1000]
    assert get(s3, "corrupt/me") == data  # only the next one
    assert fault.hits == 1
    assert [seen.fault for seen in proxy.seen] == [None, None, "corrupt", None]


def test_botocore_detects_a_corrupt_body_by_default(moto_s3: Upstream, proxy: FaultProxy) -> None:
    """botocore (>= 1.36) sends a CRC32 with each upload and, when the store returns it,
    checks downloads against it: a damaged body raises on read, and is not retried."""
    s3 = s3_client(moto_s3, proxy.url, retries={"mode": "standard"})
    put(s3, "corrupt/checked", b"x" * 4096)
    proxy.clear_counters()
    proxy.corrupt_next_get("corrupt/checked")
    with pytest.raises(FlexibleChecksumError):
        get(s3, "corrupt/checked")
    assert len(proxy.requests) == 1


# -- HTTP framing, against an echo upstream ---------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    """Answers with the request body as received (framing included) and what it saw of
    the request in X-Echo-* headers. ``?mode=chunked`` answers chunked, ``close``
    without a length (closing after), ``drop`` with a length but closes the connection
    afterwards without saying so, like a server timing out an idle connection."""

    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline or not self.parse_request():
            self.close_connection = True
            return
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = read_chunked_raw(self.rfile)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = self.path.partition("mode=")[2]
        self.send_response(200)
        self.send_header("X-Echo-Host", self.headers.get("Host", ""))
        self.send_header("X-Echo-Expect", self.headers.get("Expect", "-"))
        self.send_header("X-Echo-Target", self.path)
        if self.command == "HEAD":
            self.send_header("Content-Length", "12345")
            self.end_headers()
        elif mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 7):
                piece = body[i : i + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            if mode != "close":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if mode in ("close", "drop"):
                self.close_connection = True
        self.wfile.flush()


@pytest.fixture
def echo() -> Iterator[str]:
    _Echo.connections = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_framing_passes_through_verbatim(echo: str) -> None:
    with FaultProxy(echo) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        # A chunked request body arrives with its framing, the Host header unchanged.
        client.request("PUT", "/k?mode=chunked", body=iter([b"abc", b"defghijk"]))
        response = client.getresponse()
        assert response.read() == b"3\r\nabc\r\n8\r\ndefghijk\r\n0\r\n\r\n"
        assert response.getheader("X-Echo-Host") == f"127.0.0.1:{proxy.port}"
        assert response.getheader("X-Echo-Target") == "/k?mode=chunked"
        # A HEAD keeps its Content-Length and has no body; the connection lives on.
        client.request("HEAD", "/k")
        response = client.getresponse()
        assert response.getheader("Content-Length") == "12345"
        assert response.read() == b""
        client.request("POST", "/k?x=%2F&a=b", body=b"0123456789")
        assert client.getresponse().read() == b"0123456789"
        assert proxy.connections_accepted == 1
        assert _Echo.connections == 1  # the upstream connection was kept alive too
        # A body delimited by close is passed on, then the client connection closed.
        client.request("POST", "/k?mode=close", body=b"until close")
        response = client.getresponse()
        assert response.read() == b"until close"
        assert response.getheader("Connection") == "close"
        client.close()


def test_an_idle_upstream_connection_closed_is_reopened(echo: str) -> None:
    with FaultProxy(echo) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for _ in range(3):
            client.request("PUT", "/k?mode=drop", body=b"again")
            assert client.getresponse().read() == b"again"
        assert proxy.connections_accepted == 1
        assert _Echo.connections == 3
        client.close()


def test_expect_100_continue_is_answered_by_the_proxy(echo: str) -> None:
    with FaultProxy(echo) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.settimeout(10)
        sock.sendall(
            b"PUT /k HTTP/1.1\r\nHost: example\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        reader = sock.makefile("rb")
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert reader.readline() == b"\r\n"
        sock.sendall(b"body")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.read() == b"body"
        assert response.getheader("X-Echo-Expect") == "-"  # hop-by-hop: not forwarded
        reader.close()


def test_exit_joins_every_thread_and_closes_every_socket(echo: str) -> None:
    with FaultProxy(echo) as proxy:
        idle = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        idle.request("GET", "/k")
        idle.getresponse().read()
        proxy.delay(60, path_contains="held")
        held = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        held.request("GET", "/held")
        proxy.wait_requests(2)
        assert any(t.name.startswith("s3faults-") for t in threading.enumerate())
    assert not [t.name for t in threading.enumerate() if t.name.startswith("s3faults-")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        held.getresponse()
    idle.close()
    held.close()


def run_in_thread(call: Callable[[], Any]) -> Callable[[], Any]:
    """Start `call` on a thread; the returned function joins it and gives its result or
    the exception it raised."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(call())
        except Exception as error:
            result.append(error)

    thread = threading.Thread(target=target)
    thread.start()

    def outcome() -> Any:
        thread.join(30)
        assert not thread.is_alive()
        return result[0]

    return outcome
