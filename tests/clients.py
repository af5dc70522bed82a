"""Real SSE and WebSocket clients for tests, and a state rebuilt the way a browser would."""

from __future__ import annotations

import asyncio
import codecs
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

from relay.patch import apply_patch


@dataclass
class SSEEvent:
    event: str
    data: Any
    id: str | None


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str | bytes) -> Any:
    """Parse as RFC 8259 JSON, as a browser's JSON.parse would: NaN and Infinity are errors."""
    return json.loads(text, parse_constant=reject_constant)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396, written here so that a strict client does not trust relay.patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class LineSplitter:
    """Lines as SSE splits them: at CR, LF or CRLF only (U+2028 and U+0085 are data)."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> list[str]:
        """The lines this text completes."""
        self.buffer += text
        # A CR at the end may be the first half of a CRLF split across chunks: keep it.
        held = "\r" if self.buffer.endswith("\r") else ""
        lines = self.buffer.removesuffix(held).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.buffer = lines.pop() + held
        return lines

    def close(self) -> list[str]:
        """At the end of the stream: a CR kept back ends its line after all."""
        line, self.buffer = self.buffer, ""
        return [line.removesuffix("\r")] if line.endswith("\r") else []


async def event_stream_lines(response: httpx.Response) -> AsyncIterator[str]:
    """Lines as SSE splits them: at CR, LF or CRLF only (U+2028 and U+0085 are data)."""
    splitter = LineSplitter()
    async for chunk in response.aiter_text():
        for line in splitter.feed(chunk):
            yield line


class EventStreamParser:
    """A text/event-stream read from bytes as a browser's EventSource reads it: strict UTF-8,
    lines split by LineSplitter, an event's data lines joined with LF, and its data parsed by
    strict_json (whatever JSON.parse would reject fails the test)."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")()  # strict: the relay sends UTF-8
        self.lines = LineSplitter()
        self.fields: dict[str, str] = {}

    def feed(self, chunk: bytes, final: bool = False) -> list[SSEEvent]:
        """Events completed by this chunk (`final` for the end of the stream)."""
        lines = self.lines.feed(self.decoder.decode(chunk, final))
        if final:
            lines += self.lines.close()
        events: list[SSEEvent] = []
        for line in lines:
            if line == "":
                if "data" in self.fields:
                    data = strict_json(self.fields["data"])
                    events.append(
                        SSEEvent(self.fields.get("event", "message"), data, self.fields.get("id"))
                    )
                self.fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data" and "data" in self.fields:
                    value = self.fields["data"] + "\n" + value
                self.fields[name] = value
        return events


async def sse_events(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    strict: bool = False,
) -> AsyncIterator[SSEEvent]:
    """Parse a text/event-stream response into events (comments and retry lines skipped).

    `strict` reads the stream with EventStreamParser, as a browser would. The default reading
    is looser (httpx's text decoding, json.loads, the last data line of an event wins), which
    is all it takes for the relay's one-line events.
    """
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        if strict:
            parser = EventStreamParser()
            async for chunk in response.aiter_bytes():
                for event in parser.feed(chunk):
                    yield event
            for event in parser.feed(b"", final=True):
                yield event
            return
        fields: dict[str, str] = {}
        async for line in event_stream_lines(response):
            if line == "":
                if "data" in fields:
                    yield SSEEvent(
                        fields.get("event", "message"), json.loads(fields["data"]), fields.get("id")
                    )
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")


@dataclass
class Answer:
    """An HTTP answer: status, content type, JSON body (non-streams), and SSE events read."""

    status: int
    content_type: str
    body: Any = None
    raw: bytes = b""
    events: list[SSEEvent] = field(default_factory=list)


def read_stream(
    client: httpx.Client,
    url: str,
    headers: dict[str, Any] | None = None,
    max_events: int = 1,
    time_limit: float = 5.0,
) -> Answer:
    """GET a URL from synchronous code, whatever it answers; for an SSE stream read up to
    `max_events` events strictly (EventStreamParser) and leave, for a JSON body parse it
    with strict_json."""
    deadline = time.monotonic() + time_limit
    with client.stream("GET", url, headers=headers) as response:
        answer = Answer(response.status_code, response.headers.get("content-type", ""))
        if not answer.content_type.startswith("text/event-stream"):
            answer.raw = response.read()
            if answer.content_type.startswith("application/json"):
                answer.body = strict_json(answer.raw)
            return answer
        parser = EventStreamParser()
        for chunk in response.iter_bytes():
            answer.events.extend(parser.feed(chunk))
            if len(answer.events) >= max_events or time.monotonic() > deadline:
                del answer.events[max_events:]
                break
        else:
            answer.events.extend(parser.feed(b"", final=True))
    return answer


async def visit(client: httpx.AsyncClient, url: str) -> None:
    """Open an SSE stream, read up to its snapshot, and leave."""
    async with client.stream("GET", url) as response:
        async for line in response.aiter_lines():
            if line.startswith("event: snapshot"):
                return


@dataclass
class Watcher:
    """What one subscriber saw, and the state it rebuilt from snapshots and patches."""

    state: dict[str, Any] | None = None
    seq: int | None = None
    events: list[tuple[str, Any, int | None]] = field(default_factory=list)
    ended: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    merge: Callable[[Any, Any], Any] = field(default=apply_patch, repr=False, compare=False)

    def apply(self, kind: str, data: Any, seq: int | None) -> None:
        self.events.append((kind, data, seq))
        if kind == "snapshot":
            self.state = data
            self.seq = seq
        elif kind == "patch":
            assert self.state is not None, "patch before any snapshot"
            assert seq is not None and self.seq is not None and seq > self.seq
            self.state = self.merge(self.state, data)
            self.seq = seq
        elif kind == "end":
            self.ended = data["status"]
        elif kind == "error":
            self.errors.append(data)


async def watch_sse(
    client: httpx.AsyncClient,
    base: str,
    task_id: str,
    headers: dict[str, str] | None = None,
    *,
    strict: bool = False,
) -> Watcher:
    """Follow a task's SSE stream to its end; `strict` reads the stream as sse_events(strict=
    True) does and applies patches with merge_patch instead of relay.patch."""
    watcher = Watcher(merge=merge_patch) if strict else Watcher()
    url = f"{base}/v1/tasks/{task_id}/events"
    async for event in sse_events(client, url, headers, strict=strict):
        watcher.apply(event.event, event.data, int(event.id) if event.id else None)
    return watcher


async def watch_ws(
    ws_base: str,
    task_id: str,
    last_seq: int | None = None,
    state: dict[str, Any] | None = None,
    *,
    strict: bool = False,
    timeout: float | None = None,
) -> Watcher:
    """Subscribe over a WebSocket and follow the task to its end (resuming from `state`).

    `strict` reads as a browser would: no message size limit, frames parsed by strict_json,
    patches applied with merge_patch instead of relay.patch. `timeout` bounds each frame's wait.
    """
    watcher = Watcher(state=state, seq=last_seq, merge=merge_patch if strict else apply_patch)
    options: dict[str, Any] = {"max_size": None} if strict else {}
    async with websockets.connect(f"{ws_base}/v1/ws", **options) as socket:
        message: dict[str, Any] = {"type": "subscribe", "taskId": task_id}
        if last_seq is not None:
            message["lastSeq"] = last_seq
        await socket.send(json.dumps(message))
        while True:
            raw = await asyncio.wait_for(socket.recv(), timeout)
            frame = strict_json(raw) if strict else json.loads(raw)
            assert frame["taskId"] == task_id
            watcher.apply(frame["type"], frame["data"], frame.get("seq"))
            if frame["type"] == "end" or (
                frame["type"] == "error" and not frame["data"]["retrying"]
            ):
                return watcher


async def recv_json(socket: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next WebSocket frame, parsed by strict_json; it must be a JSON object."""
    frame = await asyncio.wait_for(socket.recv(), timeout)
    message = strict_json(frame)
    assert isinstance(message, dict), message
    return message


class ThreadWatcher:
    """A well-behaved WebSocket subscriber on its own thread and loop, recording every frame
    (strict_json) while synchronous test code does other things; used as a context manager."""

    def __init__(self, ws_url: str, task_id: str) -> None:
        self.ws_url = ws_url
        self.task_id = task_id
        self.frames: list[dict[str, Any]] = []
        self.failure: BaseException | None = None
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.watch()), daemon=True)

    def __enter__(self) -> ThreadWatcher:
        self.thread.start()
        assert self.ready.wait(10), "the watcher got no snapshot"
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(10)

    async def watch(self) -> None:
        try:
            async with websockets.connect(f"{self.ws_url}/v1/ws") as socket:
                await socket.send(json.dumps({"type": "subscribe", "taskId": self.task_id}))
                while not self.stopping.is_set():
                    try:
                        frame = await asyncio.wait_for(socket.recv(), 0.2)
                    except TimeoutError:
                        continue
                    self.frames.append(strict_json(frame))
                    self.ready.set()
        except BaseException as exc:  # recorded, and asserted on by the test
            self.failure = exc
            self.ready.set()


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Wait until predicate() is true, or fail the test."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
