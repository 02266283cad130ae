"""A fault-injecting HTTP proxy between an S3 client (boto3) and a real S3 endpoint.

The S3 backend must survive what object stores really do: 500s and 503 SlowDowns,
endpoints that vanish (ECONNREFUSED) and come back, requests that hang past the
client's read timeout, and bodies that arrive damaged. A real radosgw does none of
that on demand, so tests point boto3 at a `FaultProxy` (``endpoint_url=proxy.url``)
and the proxy forwards to the real endpoint until the test asks for a fault.

Forwarding is verbatim, so SigV4 signatures stay valid: method, request target
(path and query, byte for byte), headers in their order and case -- including
``Host``, which names the proxy (the client signed for the proxy's host:port, and
neither radosgw nor a plain HTTP upstream checks that Host names itself) -- and the
body, chunked framing included. Only hop-by-hop headers are not forwarded
(``Connection``, ``Keep-Alive``, ``Expect``, ...): the proxy owns both connections,
and botocore never signs those headers.

``Expect: 100-continue`` (botocore sends it with every file-like PUT/POST body, e.g.
``upload_fileobj`` and ``put_object(Body=<file>)``) is answered by the proxy itself
before any fault applies: the body is always read, so a faulted request leaves the
keep-alive connection in a clean state. (A server that answers with a final status
instead must then close the connection: the client does not send the body.)

One thread per client connection (keep-alive: a connection serves requests until
the client closes it, `refuse` drops it or the proxy closes), and each client
connection has its own keep-alive connection upstream, opened on first use and
reopened once, transparently, when the upstream had closed it while idle. Request
bodies are buffered (S3 parts of a test are a few MiB) so that a stale upstream
connection can be retried; responses are streamed, except a response to corrupt.

Not supported (not needed by S3 over plain HTTP): TLS on either side, HTTP/2, and
``Upgrade``.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import TracebackType
from typing import NamedTuple
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

__all__ = ["Fault", "FaultProxy", "Seen", "S3_ERROR_CODES", "read_chunked_raw"]

S3_ERROR_CODES: dict[int, tuple[str, str]] = {
    400: ("InvalidRequest", "Invalid Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    409: ("OperationAborted", "A conflicting conditional operation is in progress."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented."),
    502: ("BadGateway", "The proxy could not reach the upstream endpoint."),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "The upstream endpoint did not answer in time."),
}
"""The S3 error code (and message) the proxy answers with for a status, so that botocore
parses a faulted response as the service's own. 503 is SlowDown, as S3 and radosgw's
rate limiter send it; `fail(503, code="ServiceUnavailable")` gives the other one."""

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect", "trailer"}
)
"""Request headers that belong to one connection, not to the request: the proxy answers
them itself (Expect) or runs its own upstream connection (Connection, Keep-Alive).
Transfer-Encoding is not among them: a chunked body is forwarded with its framing."""

_RESPONSE_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "trailer", "upgrade"}
)
"""Response headers the proxy sets itself: it re-frames a chunked body, and whether the
client connection stays open is the proxy's decision, not the upstream's (moto's
werkzeug server, for one, closes after every response)."""

_PIECE = 64 << 10
"""Streaming unit for response bodies."""

_JOIN_TIMEOUT = 10.0
"""How long close() and refuse() wait for a connection thread before reporting a leak."""


class Seen(NamedTuple):
    """One request as the proxy received it, and the fault it got (None: forwarded)."""

    method: str
    target: str
    """The request target as sent: path and query string."""
    fault: str | None


@dataclass
class Fault:
    """One armed fault; `FaultProxy.fail`, `delay` and `corrupt_next_get` return it so a
    test can ask how often it fired (`hits`) or disarm just this one (`cancel`)."""

    kind: str
    """"fail", "delay" or "corrupt"."""
    methods: frozenset[str] | None = None
    path_contains: str | None = None
    remaining: int | None = None
    """Requests it still applies to; None: unlimited."""
    deadline: float | None = None
    """Clock time after which it no longer applies; None: until healed."""
    status: int = 500
    code: str = ""
    seconds: float = 0.0
    offset: int = 0
    hits: int = 0
    cancelled: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Disarm this fault only (the proxy drops it on its next look)."""
        self.cancelled = True

    def _live(self, now: float) -> bool:
        if self.cancelled or (self.remaining is not None and self.remaining <= 0):
            return False
        return self.deadline is None or now < self.deadline

    def _matches(self, method: str, target: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.path_contains is None or self.path_contains in target

    def _take(self) -> None:
        self.hits += 1
        if self.remaining is not None:
            self.remaining -= 1


@dataclass
class _Conn:
    """A client connection, registered by the accepting thread before its handler thread
    starts, so that `refuse` and `close` can reach every connection, even one whose
    thread has not yet begun to read."""

    sock: socket.socket
    dropped: bool = False
    upstream: http.client.HTTPConnection | None = None


@dataclass
class _Plan:
    """The faults one request gets, picked when it arrives."""

    method: str
    target: str
    seen: Seen
    """Its entry in the log, to relabel if its response gets corrupted."""
    generation: int
    """heal() generation when it arrived: a heal from then on releases its delay."""
    delay: Fault | None = None
    fail: Fault | None = None
    corrupt: bool = False


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    """ThreadingHTTPServer with threads the proxy can find and join (the stdlib one
    makes them daemons and forgets them) and without its reverse DNS lookup."""

    request_queue_size = 128
    """boto3 opens up to 10 connections at once per client, s3transfer more: a short
    backlog would drop SYNs and cost a one-second retransmit."""

    def __init__(self, proxy: FaultProxy, port: int) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        self.proxy._adopt(self, request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        self.proxy._record_error()


class _Handler(BaseHTTPRequestHandler):
    """One client connection: requests in a loop while the client keeps it alive."""

    protocol_version = "HTTP/1.1"
    """Keep-alive by default, and Expect: 100-continue handled by parse_request."""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.proxy = self.server.proxy
        self.conn = self.proxy._conn_of(self.request)

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, http.client.HTTPException, ValueError):
            # The client went away or `refuse` dropped the connection; a dropped socket
            # also surfaces as ValueError from a file object that was closed under us.
            self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
        self._close_upstream()

    def log_message(self, format: str, *args: object) -> None:
        """Silence: pytest shows failures; per-request lines would drown them."""

    def handle_one_request(self) -> None:
        """The stdlib's, for every method at once (no do_GET, do_PUT, ...)."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        self._proxy_one()
        self.wfile.flush()

    # -- one request ------------------------------------------------------------------

    def _proxy_one(self) -> None:
        method, target = self.command, self.path
        body = self._read_body()
        plan = self.proxy._plan(method, target)
        if plan.delay is not None and not self.proxy._hold(plan, self.conn):
            self.close_connection = True  # dropped or closing while held: forward nothing
            return
        if plan.fail is not None:
            self._send_fault(plan.fail)
            return
        try:
            response = self._forward(method, target, body)
        except TimeoutError:
            self._send_error_xml(504, S3_ERROR_CODES[504][0], "proxy-upstream")
            return
        except (OSError, http.client.HTTPException):
            if self.conn.dropped:
                raise
            self._send_error_xml(502, S3_ERROR_CODES[502][0], "proxy-upstream")
            return
        self._relay(method, response, plan)

    def _read_body(self) -> bytes:
        """The request body as it came on the wire, chunked framing and all, so that it
        can be forwarded byte for byte (and re-sent on a fresh upstream connection)."""
        encoding = self.headers.get("Transfer-Encoding", "")
        if "chunked" in encoding.lower():
            return read_chunked_raw(self.rfile)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        wanted = int(length)
        data = self.rfile.read(wanted)
        if len(data) != wanted:
            raise ConnectionError("client closed the connection within the request body")
        return data

    def _forward(self, method: str, target: str, body: bytes) -> http.client.HTTPResponse:
        """Send the request upstream on this connection's keep-alive connection. A reused
        connection that the upstream had closed while idle fails at once; the request did
        not reach the upstream then, so it is sent once more on a fresh connection."""
        while True:
            if self.conn.upstream is None:
                self.conn.upstream = self.proxy._upstream_connection()
            upstream = self.conn.upstream
            reused = upstream.sock is not None
            try:
                upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        upstream.putheader(name, value)
                upstream.endheaders()
                if body:
                    upstream.send(body)
                return upstream.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self._close_upstream()
                if not reused or self.conn.dropped:
                    raise
            except BaseException:
                self._close_upstream()
                raise

    def _relay(self, method: str, response: http.client.HTTPResponse, plan: _Plan) -> None:
        """Send the upstream's response back: its status, reason and headers, and its body
        framed as the upstream framed it (Content-Length, or chunked, re-chunked; a body
        delimited by the upstream closing is passed on and then the connection closed)."""
        headers = [
            (name, value)
            for name, value in response.getheaders()
            if name.lower() not in _RESPONSE_HOP_BY_HOP
        ]
        status = response.status
        bodyless = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        until_close = not bodyless and not response.chunked and response.length is None
        if until_close:
            self.close_connection = True
        if self.close_connection:
            headers.append(("Connection", "close"))
        if response.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        chunked = response.chunked and not bodyless
        try:
            if bodyless:
                self._write_head(response, headers)
                return
            if plan.corrupt and 200 <= status < 300:
                data = response.read()
                offset = self.proxy._claim_corruption(plan) if data else None
                if offset is not None:
                    data = flip_byte(data, offset)
                self._write_head(response, headers)
                if data:
                    self.wfile.write(chunk_frame(data) if chunked else data)
            else:
                self._write_head(response, headers)
                while piece := response.read1(_PIECE):
                    self.wfile.write(chunk_frame(piece) if chunked else piece)
                if response.length:
                    # The upstream closed short of its Content-Length (read1 does not
                    # raise then): the client must see the body broken off too.
                    raise http.client.IncompleteRead(b"", response.length)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except http.client.IncompleteRead:
            # The upstream broke off mid-body: the client must see a broken body too,
            # not a short one that its framing would call complete.
            self.close_connection = True
            self._close_upstream()
        except BaseException:
            self._close_upstream()
            raise
        finally:
            response.close()

    def _write_head(
        self, response: http.client.HTTPResponse, headers: list[tuple[str, str]]
    ) -> None:
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def _send_fault(self, fault: Fault) -> None:
        self._send_error_xml(fault.status, fault.code, "fail")

    def _send_error_xml(self, status: int, code: str, request_id: str) -> None:
        """An S3-style error document, so that botocore raises the ClientError (with the
        Code) that the real service would cause."""
        message = S3_ERROR_CODES[status][1] if status in S3_ERROR_CODES else _phrase(status)
        resource = escape(self.path.split("?", 1)[0])
        document = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        payload = b"" if self.command == "HEAD" else document
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amz-request-id", request_id)
        self.send_header("X-Fault-Injected", code)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _close_upstream(self) -> None:
        upstream, self.conn.upstream = self.conn.upstream, None
        if upstream is not None:
            upstream.close()


def read_chunked_raw(rfile: io.BufferedIOBase) -> bytes:
    """A chunked body read off `rfile` (a buffered binary file) with its framing intact:
    chunk-size lines with any extensions, the chunks, the last chunk and the trailers."""
    parts: list[bytes] = []
    readline, read = rfile.readline, rfile.read
    while True:
        line = readline(65537)
        if not line.endswith(b"\n"):
            raise ConnectionError("chunked body: truncated chunk-size line")
        parts.append(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        data = read(size + 2)
        if len(data) != size + 2 or not data.endswith(b"\r\n"):
            raise ConnectionError("chunked body: truncated chunk")
        parts.append(data)
    while True:  # trailer section, ended by an empty line
        line = readline(65537)
        if not line.endswith(b"\n"):
            raise ConnectionError("chunked body: truncated trailers")
        parts.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(parts)


def chunk_frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying `data` (non-empty: an empty one would end the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def flip_byte(data: bytes, offset: int) -> bytes:
    """`data` with the byte at `offset` (the last byte, if shorter) inverted: exactly one
    byte differs, whatever its value was."""
    at = min(offset, len(data) - 1)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


class FaultProxy:
    """Forwards HTTP from 127.0.0.1:`port` to `upstream`, with faults on demand.

    A context manager: listening when entered (the port is free and fixed for the
    proxy's life, so `url` stays valid across `refuse`/`accept`), every thread joined and
    every socket closed when exited. All controls are thread-safe and act on requests
    already in flight where that makes sense (`refuse`, `heal`).

    ``clock`` is the time source of `fail(seconds=...)` and `delay(duration=...)`,
    replaceable so that a test can expire a fault without sleeping.
    """

    def __init__(
        self,
        upstream: str,
        *,
        upstream_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_timeout = upstream_timeout
        self._clock = clock
        self._lock = threading.Condition()
        """Guards everything below; also what held (delayed) requests wait on."""
        self._faults: list[Fault] = []
        self._generation = 0
        """Bumped by heal(): requests held by an earlier delay go on at once."""
        self._closing = False
        self._seen: list[Seen] = []
        self._faults_injected = 0
        self._connections_accepted = 0
        self._conns: dict[socket.socket, _Conn] = {}
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._control = threading.Lock()
        """Serialises refuse/accept/close (start and stop of the listener)."""
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self.port = 0
        self._names = itertools.count(1)

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(check=exc is None)

    def start(self) -> None:
        """Listen on a free port (the first time) and serve."""
        with self._control:
            self._listen()

    def close(self, check: bool = True) -> None:
        """Stop listening, drop every connection, release held requests and join every
        thread. With `check`, raise if a connection thread failed unexpectedly (a proxy
        bug, which would otherwise only show as a puzzling client error) or would not
        end."""
        with self._control:
            with self._lock:
                self._closing = True
                self._faults.clear()
                self._lock.notify_all()
            self._stop_listening()
        if check and self._errors:
            raise RuntimeError(f"FaultProxy: {len(self._errors)} error(s)") from self._errors[0]

    @property
    def url(self) -> str:
        """The endpoint to give the client: ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    # -- faults ---------------------------------------------------------------------------

    def fail(
        self,
        status: int = 500,
        count: int | None = None,
        seconds: float | None = None,
        methods: Iterable[str] | None = None,
        path_contains: str | None = None,
        *,
        code: str | None = None,
    ) -> Fault:
        """Answer matching requests with `status` and an S3 error document (its Code from
        `S3_ERROR_CODES`, or `code`) instead of forwarding them: the next `count` of them,
        or for `seconds`, or (both None) until `heal`. The request body is read first."""
        if code is None:
            code = S3_ERROR_CODES[status][0] if status in S3_ERROR_CODES else _phrase(status)
            code = code.replace(" ", "")
        fault = Fault(
            "fail",
            _methods(methods),
            path_contains,
            count,
            self._deadline(seconds),
            status=status,
            code=code,
        )
        return self._arm(fault)

    def delay(
        self,
        seconds: float,
        count: int | None = None,
        duration: float | None = None,
        methods: Iterable[str] | None = None,
        path_contains: str | None = None,
    ) -> Fault:
        """Hold matching requests `seconds` (after reading their body) before forwarding
        them -- or before failing them, if a `fail` matches too. For the next `count`
        requests, or for `duration` seconds, or until `heal`, which also lets the held
        ones go on at once. A held request whose client gave up is still forwarded
        when its time is up, as a slow server would still carry it out; one whose
        connection `refuse` dropped, or that `close` finds held, is not."""
        fault = Fault(
            "delay",
            _methods(methods),
            path_contains,
            count,
            self._deadline(duration),
            seconds=seconds,
        )
        return self._arm(fault)

    def corrupt_next_get(self, path_contains: str, offset: int = 0) -> Fault:
        """Invert one byte -- at `offset` of the body, or its last byte if the body is
        shorter -- of the next successful (2xx, non-empty) GET response whose request
        target contains `path_contains`; a response to a Range GET counts from the
        start of the range."""
        fault = Fault("corrupt", frozenset({"GET"}), path_contains, 1, None, offset=offset)
        return self._arm(fault)

    def heal(self) -> None:
        """Disarm every fault (`fail`, `delay`, `corrupt_next_get`); requests held by a
        delay are forwarded now."""
        with self._lock:
            self._faults.clear()
            self._generation += 1
            self._lock.notify_all()

    def refuse(self) -> None:
        """Close the listening socket (new connections get ECONNREFUSED) and drop every
        open client connection (a pooled one fails on reuse; one waiting for its
        response sees the connection closed). Held requests on them are not forwarded.
        Faults stay armed."""
        with self._control:
            self._stop_listening()

    def accept(self) -> None:
        """Listen again, on the same port, after `refuse`."""
        with self._control:
            if self._closing:
                raise RuntimeError("FaultProxy is closed")
            if self._server is None:
                self._listen()

    # -- counters -------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received, faulted or not, in order; the path
        without its query string (see `seen` for the full target)."""
        with self._lock:
            return [(s.method, s.target.split("?", 1)[0]) for s in self._seen]

    @property
    def seen(self) -> list[Seen]:
        """Every request received: method, full target and the fault it got."""
        with self._lock:
            return list(self._seen)

    @property
    def faults_injected(self) -> int:
        """Requests failed, delayed or corrupted so far (a delayed-then-failed request
        counts twice)."""
        with self._lock:
            return self._faults_injected

    @property
    def connections_accepted(self) -> int:
        """Client connections accepted so far: fewer than requests means keep-alive."""
        with self._lock:
            return self._connections_accepted

    def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        """Block until `count` requests have arrived in all (since `clear_counters`):
        how a test learns, without sleeping, that a request it started on another thread
        has reached the proxy -- and is held, if a delay matched it, or at least will be
        (a `heal` or `refuse` from now on still releases it)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._seen) >= count, timeout):
                raise TimeoutError(f"{len(self._seen)} of {count} requests after {timeout} s")

    def clear_counters(self) -> None:
        """Forget the requests seen and the fault count (between phases of a test)."""
        with self._lock:
            self._seen.clear()
            self._faults_injected = 0
            self._connections_accepted = 0

    # -- internals ------------------------------------------------------------------------

    def _deadline(self, seconds: float | None) -> float | None:
        return None if seconds is None else self._clock() + seconds

    def _arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def _plan(self, method: str, target: str) -> _Plan:
        """Record the request and pick the faults it gets: the oldest live matching fault
        of each kind. Counts are taken here, so concurrent requests never share one."""
        now = self._clock()
        with self._lock:
            delay: Fault | None = None
            fail: Fault | None = None
            corrupt = False
            self._faults = [f for f in self._faults if f._live(now)]
            for fault in self._faults:
                if not fault._matches(method, target):
                    continue
                if fault.kind == "delay" and delay is None:
                    delay = fault
                elif fault.kind == "fail" and fail is None:
                    fail = fault
                elif fault.kind == "corrupt":
                    corrupt = True  # taken only once a body is actually corrupted
            taken = [f for f in (delay, fail) if f is not None]
            for chosen in taken:
                chosen._take()
            self._faults_injected += len(taken)
            label = "+".join(f.kind for f in taken) or None
            seen = Seen(method, target, label)
            self._seen.append(seen)
            self._lock.notify_all()  # wait_requests
            return _Plan(method, target, seen, self._generation, delay, fail, corrupt)

    def _claim_corruption(self, plan: _Plan) -> int | None:
        """Take the corrupt fault for this response and return its offset, unless a
        concurrent GET took it first (None)."""
        with self._lock:
            now = self._clock()
            for fault in self._faults:
                if (
                    fault.kind == "corrupt"
                    and fault._live(now)
                    and fault._matches(plan.method, plan.target)
                ):
                    fault._take()
                    self._faults_injected += 1
                    label = "+".join(filter(None, (plan.seen.fault, "corrupt")))
                    for i in range(len(self._seen) - 1, -1, -1):
                        if self._seen[i] is plan.seen:
                            self._seen[i] = plan.seen._replace(fault=label)
                            break
                    return fault.offset
        return None

    def _hold(self, plan: _Plan, conn: _Conn) -> bool:
        """Wait out a delay; False if the connection was dropped or the proxy is closing
        meanwhile (then the request must not be forwarded)."""
        assert plan.delay is not None
        deadline = time.monotonic() + plan.delay.seconds
        generation = plan.generation
        with self._lock:
            while not (conn.dropped or self._closing or self._generation != generation):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return not (conn.dropped or self._closing)

    def _upstream_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(
            self.upstream_host, self.upstream_port, timeout=self.upstream_timeout
        )

    def _listen(self) -> None:
        server = _Server(self, self.port)
        self.port = server.server_port
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"s3faults-listen-{self.port}",
            daemon=True,
        )
        self._server, self._serve_thread = server, thread
        thread.start()

    def _stop_listening(self) -> None:
        """Stop accepting, close the listener, drop the connections and join their
        threads. Called with `_control` held."""
        server, thread = self._server, self._serve_thread
        self._server = self._serve_thread = None
        if server is not None and thread is not None:
            server.shutdown()  # the accept loop ends within its poll interval
            thread.join()
            server.server_close()
        with self._lock:
            conns = list(self._conns.values())
            threads, self._threads = self._threads, []
            for conn in conns:
                conn.dropped = True
            self._lock.notify_all()  # held requests of dropped connections give up
        for conn in conns:
            _shutdown(conn.sock)
            upstream = conn.upstream
            if upstream is not None and upstream.sock is not None:
                _shutdown(upstream.sock)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self._errors.append(RuntimeError(f"connection threads did not end: {stuck}"))

    def _adopt(self, server: _Server, request: socket.socket, client_address: object) -> None:
        """Register a new connection, then serve it on its own thread (accept thread)."""
        with self._lock:
            self._connections_accepted += 1
            self._conns[request] = _Conn(request)
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(
                target=self._serve_connection,
                args=(server, request, client_address),
                name=f"s3faults-conn-{self.port}-{next(self._names)}",
                daemon=True,  # a leak must not hang the interpreter; close() joins them
            )
            self._threads.append(thread)
        thread.start()

    def _serve_connection(
        self, server: _Server, request: socket.socket, client_address: object
    ) -> None:
        try:
            server.finish_request(request, client_address)
        except Exception:
            self._record_error()
        finally:
            server.shutdown_request(request)
            with self._lock:
                self._conns.pop(request, None)

    def _conn_of(self, request: socket.socket) -> _Conn:
        with self._lock:
            return self._conns[request]

    def _record_error(self) -> None:
        """Keep an unexpected exception of a connection thread for `close` to raise."""
        error = sys.exc_info()[1]
        if error is not None:
            with self._lock:
                self._errors.append(error)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"Status{status}"


def _methods(methods: Iterable[str] | None) -> frozenset[str] | None:
    if isinstance(methods, str):
        methods = [methods]
    return None if methods is None else frozenset(m.upper() for m in methods)


def _shutdown(sock: socket.socket) -> None:
    """Wake whichever thread is blocked on `sock` (shutdown, not close, from another
    thread: the owner closes it, so its descriptor cannot be reused under it)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
