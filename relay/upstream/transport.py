"""The HTTP/1.1 transport under the upstream client's httpx client.

httpx stays the API of every upstream call: an `httpx.Request` goes in, an `httpx.Response`
comes out, and faults are httpx's exceptions. What carries the request is
`UpstreamTransport`, an `httpx.AsyncBaseTransport` in place of httpcore's connection pool,
which cost 2 to 4 ms of CPU per call with 32 calls in flight (bench/README.md, "Upstream
transport and CPU per call"): a pool of keep-alive asyncio connections whose answers
httptools (llhttp, the parser uvicorn serves the relay with) reads.

What it guarantees, each phase bounded by the request's httpx timeouts, and the whole call
by its deadline:

- at most `max_connections` connections; a request waits at most `pool` seconds for one
  (`PoolTimeout`);
- connecting takes at most `connect` seconds (`ConnectTimeout`); a refused or failed connect
  (`ConnectError`) is tried again `retries` times, on a new connection, before any byte of
  the request is sent. A request that may have reached the upstream is never sent twice:
  the relay signs each call once, with a nonce the gateway accepts once;
- at most `read` seconds pass between two reads of the answer (`ReadTimeout`);
- a request that carries a `"deadline"` extension (a `time.monotonic()` time, as
  `UpstreamClient` gives each call) is over by then, whatever each phase took: the wait for
  a connection, connecting, the answer's head and its body each get no more than the time
  left, then fail as that phase's timeout (`PoolTimeout`, `ConnectTimeout`, `ReadTimeout`).
  Without it, an upstream or a proxy that trickles its answer a byte at a time would hold
  a call open as long as it liked, since every byte restarts the `read` timer;
- a malformed answer (status line, header, chunked framing), an answer the peer cuts short
  and a reset are `RemoteProtocolError` or `ReadError`: nothing but httpx's exceptions
  leaves the transport;
- a connection goes back to the pool only after its answer was read to the end on a
  keep-alive connection. A call cancelled or failed at any point, or an answer closed
  unread, closes its connection and frees its slot at once, so cancelled calls cannot leak
  the pool.

It serves what the relay sends: HTTP/1.1 requests with their body in memory, over `http` or
`https`, without proxies, HTTP/2, upgrades or HEAD. The whole request is handed to the socket
at once (upstream calls are a few hundred bytes), so the `write` timeout is never waited on.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

# Answer bytes held unread before the connection stops reading from its socket.
HIGH_WATER = 256 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
# An idle connection is not reused past this: below the 5 s after which uvicorn, and many
# servers, close an idle connection, so that a request is not sent into a closing one.
KEEPALIVE_EXPIRY = 4.0

Origin = tuple[str, str, int]
Fault = tuple[type[httpx.TransportError], str]


class _TimedOut(Exception):
    """A wait ran out of time; the caller names the phase."""


def _within(limit: float | None, deadline: float | None) -> float | None:
    """Seconds a phase may wait: its own `limit`, cut to what is left before `deadline`."""
    if deadline is None:
        return limit
    left = max(0.0, deadline - time.monotonic())
    return left if limit is None else min(limit, left)


def _past(deadline: float | None) -> bool:
    """Whether a wait that timed out was cut by the call's deadline (not its phase's limit)."""
    return deadline is not None and time.monotonic() >= deadline - 0.001


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_TimedOut())


class _StrayMessage(Exception):
    """Bytes after the end of the answer: the connection cannot be trusted again."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection, reading one answer at a time into plain fields."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.begin()
        self.busy = False

    def begin(self) -> None:
        """Clear what the previous answer left, for a new request."""
        if self.paused and self.transport is not None:
            self.transport.resume_reading()  # the last answer filled the buffer, unread
        self.busy = True
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.framed = False  # Content-Length or chunked: the end of the body is known
        self.received = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.fault: Fault | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete or self.fault is not None:
            # Bytes nobody asked for: never reuse this connection.
            self.keep_alive = False
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(httpx.RemoteProtocolError, "the upstream switched protocols")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__cause__ or exc.__context__, _StrayMessage):
                self.keep_alive = False
                self.close()
            else:
                self.fail(httpx.RemoteProtocolError, f"malformed HTTP answer: {exc}")
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and not self.complete and self.fault is None:
            if self.headers_done and not self.framed:
                self.complete = True  # a body that ends with the connection
                self.keep_alive = False
            elif exc is not None:
                self.fault = (httpx.ReadError, f"connection to the upstream lost: {exc}")
            elif not self.received:
                self.fault = (
                    httpx.RemoteProtocolError,
                    "the upstream closed the connection without answering",
                )
            else:
                self.fault = (
                    httpx.RemoteProtocolError,
                    "the upstream closed the connection in the middle of its answer",
                )
        self.wake()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _StrayMessage

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length" or lowered == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            return  # an interim answer (100 Continue): its end starts the real one
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of an interim answer
            self.reason, self.headers, self.framed = b"", [], False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True

    # -- used by the transport --------------------------------------------------------------

    def fail(self, kind: type[httpx.TransportError], message: str) -> None:
        if self.fault is None and not self.complete:
            self.fault = (kind, message)
        self.close()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float | None) -> None:
        """Until something happens: more of the answer, its end, a fault, the close."""
        waiter = self.loop.create_future()
        self.waiter = waiter
        timer = self.loop.call_later(seconds, _expire, waiter) if seconds is not None else None
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def take_body(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def raise_fault(self) -> None:
        if self.fault is not None:
            kind, message = self.fault
            raise kind(message)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()


class _AnswerStream(httpx.AsyncByteStream):
    """The body of one answer; gives its connection back once, read to the end or not."""

    def __init__(
        self,
        pool: UpstreamTransport,
        conn: _Connection,
        timeout: float | None,
        deadline: float | None,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._timeout = timeout
        self._deadline = deadline
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        try:
            while True:
                if conn.chunks:
                    yield conn.take_body()
                    continue
                conn.raise_fault()
                if conn.complete:
                    break
                if conn.closed:
                    raise httpx.ReadError("connection to the upstream closed")
                try:
                    await conn.wait(_within(self._timeout, self._deadline))
                except _TimedOut:
                    late = "outlasted the call" if _past(self._deadline) else "stalled"
                    raise httpx.ReadTimeout(f"the upstream's answer {late}") from None
        except BaseException:
            self._release(False)
            raise
        self._release(conn.keep_alive)

    async def aclose(self) -> None:
        # An answer that came whole (the usual small one) leaves its connection reusable,
        # read or not; one still coming would leave bytes in the way: closed.
        self._release(self._conn.keep_alive)

    def _release(self, reusable: bool) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._conn, reusable and self._conn.complete)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 for httpx, parsed by httptools; see the module's docstring."""

    def __init__(
        self,
        max_connections: int = 32,
        retries: int = 1,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.retries = retries
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # connections idle, in use or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open or opening now (idle ones included)."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the upstream transport is closed", request=request)
        url = request.url
        scheme = url.scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        if request.method == "HEAD":
            # llhttp cannot be told that an answer to HEAD has no body.
            raise httpx.UnsupportedProtocol("HEAD is not supported", request=request)
        origin = (scheme, url.host, url.port or DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout") or {}
        deadline: float | None = request.extensions.get("deadline")
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        data = self._encode(request) + body
        conn = await self._acquire(origin, timeouts.get("pool"), timeouts.get("connect"), deadline)
        read_timeout = timeouts.get("read")
        try:
            conn.begin()
            assert conn.transport is not None
            conn.transport.write(data)
            while not conn.headers_done:
                conn.raise_fault()
                if conn.closed:
                    raise httpx.ReadError("connection to the upstream closed")
                try:
                    await conn.wait(_within(read_timeout, deadline))
                except _TimedOut:
                    raise httpx.ReadTimeout("the upstream did not answer in time") from None
        except BaseException:
            self.release(conn, False)
            raise
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_AnswerStream(self, conn, read_timeout, deadline),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
            request=request,
        )

    @staticmethod
    def _encode(request: httpx.Request) -> bytes:
        """The request line and headers, refused if a header would break out of its line."""
        headers = request.headers.raw
        head = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
        if head.count(b"\n") != len(headers) or head.count(b"\r") != len(headers):
            raise httpx.LocalProtocolError("a header holds a line break", request=request)
        method = request.method.encode("ascii")
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, request.url.raw_path, head)

    async def _acquire(
        self,
        origin: Origin,
        pool_timeout: float | None,
        connect_timeout: float | None,
        deadline: float | None,
    ) -> _Connection:
        """An idle connection to `origin`, or a new one once there is room."""
        loop = asyncio.get_running_loop()
        wait = _within(pool_timeout, deadline)
        pool_deadline = None if wait is None else loop.time() + wait
        while True:
            if self._closed:
                raise httpx.ConnectError("the upstream transport is closed")
            idle = self._idle.get(origin)
            if idle:
                now = time.monotonic()
                while idle:
                    conn = idle.pop()
                    if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                        return conn
                    conn.close()
                    self._open -= 1
            if self._open < self.max_connections:
                break
            if self._close_idle_elsewhere(origin):
                continue
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = None if pool_deadline is None else loop.call_at(pool_deadline, _expire, waiter)
            try:
                await waiter
            except _TimedOut:
                raise httpx.PoolTimeout("no upstream connection free in time") from None
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()  # woken, then cancelled: pass the turn on
                raise
            finally:
                if timer is not None:
                    timer.cancel()
        self._open += 1
        try:
            return await self._connect(loop, origin, connect_timeout, deadline)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    def _close_idle_elsewhere(self, origin: Origin) -> bool:
        for other, idle in self._idle.items():
            if other != origin and idle:
                idle.pop(0).close()
                self._open -= 1
                return True
        return False

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        limit: float | None,
        deadline: float | None,
    ) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            context = self._ssl_context
        fault: httpx.TransportError = httpx.ConnectError("no connection attempt")
        for _ in range(self.retries + 1):
            try:
                async with asyncio.timeout(_within(limit, deadline)):
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, origin),
                        host,
                        port,
                        ssl=context,
                        server_hostname=host if context is not None else None,
                    )
                return conn
            except TimeoutError:
                fault = httpx.ConnectTimeout(f"connecting to {host}:{port} timed out")
            except OSError as exc:
                fault = httpx.ConnectError(f"connecting to {host}:{port} failed: {exc}")
        raise fault

    def release(self, conn: _Connection, reusable: bool) -> None:
        """Take back a connection: idle for the next request, or closed."""
        conn.busy = False
        if reusable and not conn.closed and not self._closed and conn.fault is None:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.close()
            self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # to find the transport closed
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
                self._open -= 1
        self._idle.clear()
