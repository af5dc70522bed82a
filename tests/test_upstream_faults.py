"""The upstream transport against a raw TCP server that answers exactly the bytes it is told to.

Every fault a real upstream or the network can produce (a garbled status line, a garbled
header, broken chunked encoding, an answer cut short, a reset, a close without an answer, a
refused connection, silence, an answer trickled a byte at a time) must be an ordinary
upstream fault: `UpstreamUnavailable`, retried by the poll loop, `upstream_unavailable` to
subscribers and a 503 to plain HTTP, the task's state kept, and no call may outlast the
request timeout. Also here: connection reuse, the retried connect, the body bound,
`Retry-After`, and calls cancelled by the thousand without a connection slot lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from relay.app import create_app
from relay.upstream import UpstreamClient, UpstreamHTTP, UpstreamUnavailable, make_http_client
from relay.upstream.signing import ApiGatewaySigner, NoSigner
from relay.upstream.transport import UpstreamTransport

from .clients import sse_events, watch_sse
from .conftest import FAST
from .servers import ThreadServer, free_port

PROGRESS = "/scc/comfy_get_progress"
RESULT = "/scc/comfy_get_result"

# What each scripted answer writes (after reading the whole request); None: see RawUpstream.
GARBLED_STATUS = b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}"
GARBLED_HEADER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nthis is no header\r\n\r\n{}"
BROKEN_CHUNKED = (
    b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"st\r\nnot-a-size\r\n\r\n'
)
TRUNCATED = b'HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n{"status":10,"data":'
FRAMING_FAULTS = ["garbled_status", "garbled_header", "broken_chunked", "truncated"]
CONNECTION_FAULTS = ["reset", "close"]
ALL_FAULTS = FRAMING_FAULTS + CONNECTION_FAULTS


def running(task_id: str, step: int = 1) -> dict[str, Any]:
    return {"taskId": task_id, "status": "running", "progress": step / 10, "step": step}


class RawUpstream:
    """The progress API over bare asyncio streams, each answer as scripted.

    `script[path]` holds the modes of the next answers on that path, in order; once it is
    empty, answers are `ok`. `states[taskId]` is what `ok` answers for progress.
    """

    def __init__(self) -> None:
        self.script: dict[str, deque[str]] = {PROGRESS: deque(), RESULT: deque()}
        self.states: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self.delay = 0.0
        self.trickle_seconds = 1.0  # between two bytes of a trickled answer
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def calls(self, path: str) -> int:
        return sum(1 for target, _, _ in self.requests if target == path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((target, headers, body))
                queue = self.script.get(target)
                mode = queue.popleft() if queue else "ok"
                if self.delay:
                    await asyncio.sleep(self.delay)
                if not await self._answer(mode, target, body, writer):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _answer(
        self, mode: str, target: str, body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Write one answer; False when the connection must end after it."""
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if mode == "close":
            writer.close()
            return False
        if mode == "hang":
            await asyncio.sleep(3600)
        fixed = {
            "garbled_status": GARBLED_STATUS,
            "garbled_header": GARBLED_HEADER,
            "broken_chunked": BROKEN_CHUNKED,
            "truncated": TRUNCATED,
        }.get(mode)
        if fixed is not None:
            writer.write(fixed)
            await writer.drain()
            writer.close()
            return False
        task_id = json.loads(body)["taskId"]
        if target == RESULT:
            data: Any = {"images": [f"{task_id}.png"]}
        else:
            data = self.states.get(task_id, running(task_id))
        payload = json.dumps({"status": 10, "data": data, "subErrCode": None}).encode()
        status, extra = "200 OK", b""
        if mode == "throttle":
            status, extra, payload = "429 Too Many Requests", b"Retry-After: 0.3\r\n", b"{}"
        elif mode == "unavailable":
            status, extra, payload = "503 Service Unavailable", b"Retry-After: 2\r\n", b"{}"
        elif mode == "big":
            payload = b'{"status":10,"data":{"x":"' + b"a" * (1 << 20) + b'"}}'
        elif mode == "large":  # under the bound, over what a connection buffers unread
            payload = json.dumps({"status": 10, "data": {**data, "x": "a" * 600_000}}).encode()
        elif mode == "close_after":
            extra = b"Connection: close\r\n"
        elif mode == "continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif mode == "stray":
            extra = b"X-Stray: yes\r\n"
        if mode.startswith("trickle"):
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
            return await self._trickle(head, payload, writer, whole_head=mode == "trickle_body")
        if mode == "chunked":
            half = len(payload) // 2
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (payload[:half], payload[half:]):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            writer.write(b"0\r\n\r\n")
        elif mode == "slow_body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
            writer.write(payload[:5])
            await writer.drain()
            await asyncio.sleep(3600)
        else:
            head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n" % status.encode()
            writer.write(head + extra + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            if mode == "stray":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        return mode != "close_after"

    async def _trickle(
        self, head: bytes, payload: bytes, writer: asyncio.StreamWriter, whole_head: bool
    ) -> bool:
        """A good answer, one byte every `trickle_seconds` (after the head, if `whole_head`),
        as a slow upstream or a proxy in the way can send it: no read ever waits long."""
        answer = head + payload
        sent = len(head) if whole_head else 0
        writer.write(answer[:sent])
        try:
            for byte in answer[sent:]:
                await writer.drain()
                await asyncio.sleep(self.trickle_seconds)
                if writer.transport.is_closing():
                    return False
                writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return False
        return True


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    server = await RawUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[UpstreamHTTP]:
    client = make_http_client(timeout=1.0, max_connections=4)
    yield client
    await client.aclose()


def transport_of(http: UpstreamHTTP) -> UpstreamTransport:
    assert isinstance(http.transport, UpstreamTransport)
    return http.transport


def client(http: UpstreamHTTP, raw: RawUpstream, concurrency: int = 4) -> UpstreamClient:
    return UpstreamClient(http, raw.url, ApiGatewaySigner("key", "secret"), concurrency)


# -- each fault is an ordinary upstream fault --------------------------------------------------


@pytest.mark.parametrize("fault", ALL_FAULTS)
@pytest.mark.parametrize("path", [PROGRESS, RESULT])
async def test_each_fault_is_upstream_unavailable_and_the_pool_serves_on(
    http: UpstreamHTTP, raw: RawUpstream, fault: str, path: str
) -> None:
    upstream = client(http, raw)
    raw.script[path].append(fault)
    call = upstream.progress if path == PROGRESS else upstream.result
    with pytest.raises(UpstreamUnavailable) as raised:
        await call("t1")
    message = str(raised.value)
    assert "timed out" not in message
    assert message.startswith("upstream connection failed: ")
    kind = "ReadError" if fault == "reset" else "RemoteProtocolError"
    assert kind in message, message
    # Never sent twice: the request may have reached the upstream (one nonce, one call).
    assert raw.calls(path) == 1
    assert (await upstream.progress("t2"))["taskId"] == "t2"
    assert transport_of(http).connections == 1


async def test_a_refused_connection_is_unavailable_not_a_timeout(http: UpstreamHTTP) -> None:
    upstream = UpstreamClient(http, f"http://127.0.0.1:{free_port()}", NoSigner(), 4)
    with pytest.raises(UpstreamUnavailable) as raised:
        await upstream.progress("t1")
    assert "ConnectError" in str(raised.value) and "timed out" not in str(raised.value)
    assert transport_of(http).connections == 0


async def test_a_failed_connect_is_tried_once_more(
    http: UpstreamHTTP, raw: RawUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    connect = loop.create_connection
    attempts: list[int] = []

    async def refuse_first(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionRefusedError(111, "Connection refused")
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", refuse_first)
    assert (await client(http, raw).progress("t1"))["status"] == "running"
    assert len(attempts) == 2

    async def refuse_all(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    attempts.clear()
    monkeypatch.setattr(loop, "create_connection", refuse_all)
    with pytest.raises(UpstreamUnavailable, match="ConnectError"):
        await UpstreamClient(make_http_client(1.0, 4), raw.url, NoSigner(), 4).progress("t2")
    assert len(attempts) == 2  # retries=1: one more try, not more


async def test_silence_is_a_timeout_and_frees_its_connection(
    http: UpstreamHTTP, raw: RawUpstream
) -> None:
    upstream = client(http, raw)
    raw.script[PROGRESS].append("hang")
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="timed out"):
        await upstream.progress("t1")
    assert time.monotonic() - started < 3
    assert transport_of(http).connections == 0
    assert (await upstream.progress("t2"))["taskId"] == "t2"


@pytest.mark.parametrize("mode", ["trickle_head", "trickle_body"])
async def test_an_answer_trickled_a_byte_a_second_fails_by_the_request_timeout(
    raw: RawUpstream, mode: str
) -> None:
    """--request-timeout holds for the whole call: every byte comes well within the read
    timeout, yet the call fails when the timeout has run out since it began."""
    http = make_http_client(timeout=2.0, max_connections=1)  # one slot: a leak would show
    transport = transport_of(http)
    upstream = UpstreamClient(http, raw.url, NoSigner(), concurrency=1)
    try:
        raw.script[PROGRESS].append(mode)
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await upstream.progress("t1")
        took = time.monotonic() - started
        assert 1.9 <= took < 2.5, took
        assert transport.connections == 0, "the trickling connection was closed"
        assert (await upstream.progress("t2"))["taskId"] == "t2"
        assert raw.connections == 2, "a new connection, not the trickling one"
        assert transport.connections == transport.idle_connections == 1
    finally:
        await http.aclose()


async def test_a_trickled_result_ends_by_its_deadline(raw: RawUpstream) -> None:
    """A result fetch gets the time left before the poll's deadline, however it is spent."""
    http = make_http_client(timeout=5.0, max_connections=2)
    upstream = UpstreamClient(http, raw.url, NoSigner(), concurrency=2)
    try:
        raw.script[RESULT].append("trickle_body")
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await upstream.result("t1", deadline=started + 1.5)
        assert 1.4 <= time.monotonic() - started < 2.0
        # A relative image URL is resolved against the upstream (it serves the image).
        assert (await upstream.result("t1"))["images"] == [f"{raw.url}/t1.png"]
    finally:
        await http.aclose()


async def test_a_full_pool_times_out_waiting(raw: RawUpstream) -> None:
    http = UpstreamHTTP(UpstreamTransport(max_connections=1), timeout=1.0)
    try:
        upstream = UpstreamClient(http, raw.url, NoSigner(), concurrency=2)
        raw.script[PROGRESS].append("hang")
        first = asyncio.ensure_future(upstream.progress("t1"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            # The one connection is held by t1: a PoolTimeout at the deadline.
            await upstream.result("t2", deadline=time.monotonic() + 0.3)
        assert time.monotonic() - started < 0.9
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await first
        assert (await upstream.progress("t3"))["taskId"] == "t3"
    finally:
        await http.aclose()


# -- what a good answer may look like ----------------------------------------------------------


async def test_keep_alive_connections_are_reused_and_a_close_is_honoured(
    http: UpstreamHTTP, raw: RawUpstream
) -> None:
    upstream = client(http, raw)
    for i in range(5):
        assert (await upstream.progress(f"t{i}"))["taskId"] == f"t{i}"
    assert raw.connections == 1
    raw.script[PROGRESS].extend(["close_after", "close_after"])
    for i in range(3):
        await upstream.progress(f"c{i}")
    assert raw.connections == 3
    assert transport_of(http).connections == 1


@pytest.mark.parametrize("mode", ["chunked", "continue", "stray"])
async def test_chunked_interim_and_stray_answers(
    http: UpstreamHTTP, raw: RawUpstream, mode: str
) -> None:
    upstream = client(http, raw)
    raw.script[PROGRESS].append(mode)
    assert (await upstream.progress("t1"))["taskId"] == "t1"
    assert (await upstream.progress("t2"))["taskId"] == "t2"
    # Bytes after the answer: that connection is not trusted again.
    assert raw.connections == (2 if mode == "stray" else 1)


async def test_a_body_over_1_mib_is_refused(http: UpstreamHTTP, raw: RawUpstream) -> None:
    upstream = client(http, raw)
    raw.script[PROGRESS].append("big")
    with pytest.raises(UpstreamUnavailable, match="larger than 1048576 bytes"):
        await upstream.progress("t1")
    assert (await upstream.progress("t2"))["taskId"] == "t2"
    assert transport_of(http).connections == 1


async def test_a_large_answer_is_read_whole_and_its_connection_reused(
    http: UpstreamHTTP, raw: RawUpstream
) -> None:
    upstream = client(http, raw)
    raw.script[PROGRESS].append("large")
    assert len((await upstream.progress("t1"))["x"]) == 600_000
    assert (await upstream.progress("t2"))["taskId"] == "t2"
    assert raw.connections == 1


async def test_an_answer_closed_unread_leaves_its_connection_usable(raw: RawUpstream) -> None:
    async with httpx.AsyncClient(transport=UpstreamTransport(2), timeout=2) as plain:
        for i in range(3):
            body = json.dumps({"taskId": f"t{i}"}).encode()
            async with plain.stream("POST", raw.url + PROGRESS, content=body) as response:
                assert response.status_code == 200
        assert raw.connections == 1
        with pytest.raises(httpx.UnsupportedProtocol):
            await plain.head(raw.url + PROGRESS)


async def test_retry_after_of_429_pauses_every_call_and_of_503_is_kept(
    http: UpstreamHTTP, raw: RawUpstream
) -> None:
    upstream = client(http, raw)
    raw.script[PROGRESS].extend(["throttle", "unavailable"])
    with pytest.raises(UpstreamUnavailable) as throttled:
        await upstream.progress("t1")
    assert throttled.value.retry_after == 0.3
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as unavailable:
        await upstream.progress("t1")
    assert time.monotonic() - started >= 0.25, "a 429 holds every call back"
    assert unavailable.value.retry_after == 2.0


async def test_every_call_is_signed_anew(http: UpstreamHTTP, raw: RawUpstream) -> None:
    upstream = client(http, raw)
    raw.script[PROGRESS].append("reset")
    with pytest.raises(UpstreamUnavailable):
        await upstream.progress("t1")
    await upstream.progress("t1")
    await upstream.result("t1")
    nonces = [headers["x-ca-nonce"] for _, headers, _ in raw.requests]
    signatures = [headers["x-ca-signature"] for _, headers, _ in raw.requests]
    assert len(set(nonces)) == len(set(signatures)) == len(raw.requests) == 3
    assert all(body == b'{"taskId":"t1"}' for _, _, body in raw.requests)


async def test_a_header_with_a_line_break_is_never_sent(raw: RawUpstream) -> None:
    transport = UpstreamTransport(max_connections=1)
    request = httpx.Request("POST", raw.url + PROGRESS, headers={"x-a": "1\r\nx-b: 2"})
    try:
        with pytest.raises(httpx.LocalProtocolError):
            await transport.handle_async_request(request)
        assert raw.requests == []
    finally:
        await transport.aclose()


# -- cancellation ------------------------------------------------------------------------------


async def test_thousands_of_calls_cancelled_in_flight_leak_no_connection(
    raw: RawUpstream,
) -> None:
    """Calls cancelled while they wait for a slot, connect, wait for the answer or read it."""
    http = make_http_client(timeout=5.0, max_connections=8)
    transport = transport_of(http)
    upstream = UpstreamClient(http, raw.url, NoSigner(), concurrency=8)
    rng = random.Random(7)
    try:
        for round_no in range(3):
            raw.delay = 0.005
            raw.script[PROGRESS].extend(rng.choice(["ok", "slow_body", "hang"]) for _ in range(50))
            sent = len(raw.requests)
            calls = [asyncio.ensure_future(upstream.progress(f"t{i}")) for i in range(1000)]
            for call in calls:
                if rng.random() < 0.05:
                    await asyncio.sleep(0.001)
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            assert len(raw.requests) > sent, "some calls were on the wire when cancelled"
            assert sum(call.cancelled() for call in calls) > 900
            assert transport.connections == transport.idle_connections <= 8, round_no
        raw.delay = 0.0
        raw.script[PROGRESS].clear()
        answers = await asyncio.gather(*(upstream.progress(f"after{i}") for i in range(40)))
        assert [a["taskId"] for a in answers] == [f"after{i}" for i in range(40)]
        assert transport.connections <= 8
    finally:
        await http.aclose()


async def test_requests_cancelled_in_the_pool_queue_leave_it_serving(raw: RawUpstream) -> None:
    """Straight to the transport, past the client's slots: 2,000 requests queue for 4
    connections held by answers that never come, and are all cancelled."""
    transport = UpstreamTransport(max_connections=4)
    raw.script[PROGRESS].extend(["hang"] * 4)
    timeouts = {"timeout": httpx.Timeout(30.0).as_dict()}

    async def send(i: int) -> httpx.Response:
        body = json.dumps({"taskId": f"q{i}"}).encode()
        request = httpx.Request("POST", raw.url + PROGRESS, content=body, extensions=timeouts)
        response = await transport.handle_async_request(request)
        await response.aread()
        await response.aclose()
        return response

    try:
        pending = [asyncio.ensure_future(send(i)) for i in range(2000)]
        await asyncio.sleep(0.3)
        assert transport.connections == 4
        for call in pending:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        assert transport.connections == 0
        answers = await asyncio.gather(*(send(i) for i in range(10)))
        assert all(a.status_code == 200 for a in answers)
        assert transport.connections == transport.idle_connections <= 4
    finally:
        await transport.aclose()


# -- through the whole relay -------------------------------------------------------------------


@pytest.fixture
def make_raw_relay(raw: RawUpstream) -> Iterator[Any]:
    servers: list[ThreadServer] = []

    def start(**overrides: Any) -> ThreadServer:
        settings = replace(FAST, upstream_url=raw.url, request_timeout=1.0, **overrides)
        server = ThreadServer(create_app(settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


async def test_faults_while_watching_keep_the_state_and_say_upstream_unavailable(
    raw: RawUpstream, make_raw_relay: Any
) -> None:
    relay = make_raw_relay()
    task_id = "watched"
    raw.states[task_id] = running(task_id, 1)
    raw.script[PROGRESS].extend(["ok", *ALL_FAULTS])

    async def finish_later() -> None:
        while raw.script[PROGRESS]:
            await asyncio.sleep(0.05)
        raw.states[task_id] = {"taskId": task_id, "status": "succeeded", "progress": 1}

    finisher = asyncio.ensure_future(finish_later())
    async with httpx.AsyncClient(timeout=30) as browser:
        watcher = await watch_sse(browser, relay.url, task_id)
    await finisher
    assert watcher.errors, "the outage was reported"
    assert all(e["code"] == "upstream_unavailable" and e["retrying"] for e in watcher.errors)
    assert watcher.ended == "succeeded"
    assert watcher.state == {
        "taskId": task_id,
        "status": "succeeded",
        "progress": 1,
        "result": {"images": [f"{raw.url}/{task_id}.png"]},
    }
    assert watcher.events[0][0] == "snapshot" and watcher.events[0][1] == running(task_id, 1)


async def test_a_trickling_upstream_is_reported_unavailable_by_the_request_timeout(
    raw: RawUpstream, make_raw_relay: Any
) -> None:
    """The poll loop sees a trickled answer as any other timeout: `upstream_unavailable`,
    retrying, one request timeout (1 s here) after the poll began; the next poll serves."""
    relay = make_raw_relay()
    task_id = "trickled"
    raw.trickle_seconds = 0.25  # well within the 1 s read timeout
    raw.script[PROGRESS].append("trickle_head")
    seen: list[tuple[str, Any, float]] = []
    async with httpx.AsyncClient(timeout=30) as browser:
        started = time.monotonic()
        url = f"{relay.url}/v1/tasks/{task_id}/events"
        async for event in sse_events(browser, url):
            seen.append((event.event, event.data, time.monotonic() - started))
            if event.event == "snapshot":
                break
    (kind, error, at), (then, state, _) = seen
    assert kind == "error" and error["code"] == "upstream_unavailable" and error["retrying"]
    assert "timed out" in error["message"]
    assert 0.9 <= at < 1.6, at
    assert then == "snapshot" and state == running(task_id)
    assert raw.calls(PROGRESS) == 2


async def test_a_garbled_result_still_ends_the_task_succeeded(
    raw: RawUpstream, make_raw_relay: Any
) -> None:
    relay = make_raw_relay()
    task_id = "done"
    raw.states[task_id] = {"taskId": task_id, "status": "succeeded", "progress": 1}
    raw.script[RESULT].extend(["garbled_status", "broken_chunked"])
    async with httpx.AsyncClient(timeout=30) as browser:
        watcher = await watch_sse(browser, relay.url, task_id)
    assert watcher.errors == []
    assert watcher.ended == "succeeded"
    assert watcher.state == raw.states[task_id]  # without a result: both tries failed
    assert raw.calls(RESULT) == 2


@pytest.mark.parametrize("fault", [*ALL_FAULTS, "refused"])
async def test_plain_http_state_answers_503_on_any_fault(
    raw: RawUpstream, make_raw_relay: Any, fault: str
) -> None:
    if fault == "refused":
        relay = ThreadServer(
            create_app(replace(FAST, upstream_url=f"http://127.0.0.1:{free_port()}"))
        ).start()
    else:
        relay = make_raw_relay()
        raw.script[PROGRESS].append(fault)
    try:
        async with httpx.AsyncClient(timeout=30) as browser:
            answer = await browser.get(f"{relay.url}/v1/tasks/{fault}")
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"] if "error" in answer.json() else answer.json()
        assert error["code"] == "upstream_unavailable"
        assert "timed out" not in error["message"]
    finally:
        if fault == "refused":
            relay.stop()
