"""Real SSE and WebSocket clients for tests, and a state rebuilt the way a browser would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
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


async def event_stream_lines(response: httpx.Response) -> AsyncIterator[str]:
    """Lines as SSE splits them: at CR, LF or CRLF only (U+2028 and U+0085 are data)."""
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        # A CR at the end may be the first half of a CRLF split across chunks: keep it.
        held = "\r" if buffer.endswith("\r") else ""
        lines = buffer.removesuffix(held).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        buffer = lines.pop() + held
        for line in lines:
            yield line


async def sse_events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[SSEEvent]:
    """Parse a text/event-stream response into events (comments and retry lines skipped)."""
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
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

    def apply(self, kind: str, data: Any, seq: int | None) -> None:
        self.events.append((kind, data, seq))
        if kind == "snapshot":
            self.state = data
            self.seq = seq
        elif kind == "patch":
            assert self.state is not None, "patch before any snapshot"
            assert seq is not None and self.seq is not None and seq > self.seq
            self.state = apply_patch(self.state, data)
            self.seq = seq
        elif kind == "end":
            self.ended = data["status"]
        elif kind == "error":
            self.errors.append(data)


async def watch_sse(
    client: httpx.AsyncClient, base: str, task_id: str, headers: dict[str, str] | None = None
) -> Watcher:
    watcher = Watcher()
    async for event in sse_events(client, f"{base}/v1/tasks/{task_id}/events", headers):
        watcher.apply(event.event, event.data, int(event.id) if event.id else None)
    return watcher


async def watch_ws(
    ws_base: str, task_id: str, last_seq: int | None = None, state: dict[str, Any] | None = None
) -> Watcher:
    """Subscribe over a WebSocket and follow the task to its end (resuming from `state`)."""
    watcher = Watcher(state=state, seq=last_seq)
    async with websockets.connect(f"{ws_base}/v1/ws") as socket:
        message: dict[str, Any] = {"type": "subscribe", "taskId": task_id}
        if last_seq is not None:
            message["lastSeq"] = last_seq
        await socket.send(json.dumps(message))
        while True:
            frame = json.loads(await socket.recv())
            assert frame["taskId"] == task_id
            watcher.apply(frame["type"], frame["data"], frame.get("seq"))
            if frame["type"] == "end" or (
                frame["type"] == "error" and not frame["data"]["retrying"]
            ):
                return watcher


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Wait until predicate() is true, or fail the test."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
