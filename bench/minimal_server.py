"""The stack's own limit: Starlette + sse-starlette and a Starlette WebSocket, no relay logic.

Every `--interval` seconds one new frame is encoded once (the same patch the relay would
send for the fixed upstream's hot task, with a fresh `sentAt`) and every connected client
is woken to send those pre-encoded bytes. A client gets a snapshot frame when it connects.
A client still sending when the next frame comes skips to the newest (as the relay
coalesces). `--interval 0` never pushes: idle clients, for memory.

With `--per-task`, every task ID gets its own broadcast, made when its first client comes
(by the SSE path, or by a WebSocket's first message, `{"type":"subscribe","taskId":...}`),
with its own ticker: the same `--interval`, first push at a random point within it, so
many tasks push at random phases, as the relay's poll loops do. Without it every path
and WebSocket shares one broadcast whose frames name the task `hot`. Routes:
`GET /v1/tasks/{task}/events` (SSE, with the relay's ping and send timeout),
`WS /v1/ws` (a reader task and a sender, as the relay had before its one-task socket), `GET /healthz`, and
`GET /raw/v1/tasks/{task}/events`: the same stream as a bare ASGI app without
sse-starlette (no pings), to show what sse-starlette itself costs.

It runs under `uvicorn.run` with the relay's own settings (uvloop, httptools,
websockets-sansio, 64 KiB max WebSocket message, no permessage-deflate, its GC thresholds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from relay.cli import GC_THRESHOLDS

from .common import HOST, hot_patch, hot_state

TASK_ID = "hot"
MAX_TASKS = 20_000  # --per-task: broadcasts (and tickers) at most, as the relay caps loops
RAW_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
PING_INTERVAL = 15.0
SEND_TIMEOUT = 10.0


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sse_frame(kind: str, seq: int, data: str) -> bytes:
    return f"id: {seq}\nevent: {kind}\ndata: {data}\n\n".encode()


def ws_frame(kind: str, task_id: str, seq: int, data: str) -> str:
    return f'{{"type":"{kind}","taskId":"{task_id}","seq":{seq},"data":{data}}}'


class Broadcast:
    """The newest frame and a generation number; waiters wake when the generation moves."""

    def __init__(self, task_id: str = TASK_ID) -> None:
        self.task_id = task_id
        self.generation = 0
        self.seq = 1_000_000
        state = dumps(hot_state(task_id, 0, time.time()))
        self.snapshot_sse = sse_frame("snapshot", self.seq, state)
        self.snapshot_ws = ws_frame("snapshot", task_id, self.seq, state)
        self.frame_sse = self.snapshot_sse
        self.frame_ws = self.snapshot_ws
        self._changed = asyncio.Event()

    def publish(self) -> None:
        self.seq += 1
        self.generation += 1
        data = dumps(hot_patch(self.generation, time.time()))
        self.frame_sse = sse_frame("patch", self.seq, data)
        self.frame_ws = ws_frame("patch", self.task_id, self.seq, data)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def newer_than(self, generation: int) -> int:
        while self.generation == generation:
            await self._changed.wait()
        return self.generation


def create_app(interval: float, per_task: bool = False) -> ASGIApp:
    broadcast: Broadcast | None = None
    broadcasts: dict[str, Broadcast] = {}
    tickers: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal broadcast
        if not per_task:
            broadcast = Broadcast()
            if interval > 0:
                tickers.add(asyncio.create_task(tick(broadcast, interval)))
        try:
            yield
        finally:
            for ticker in tickers:
                ticker.cancel()

    async def tick(b: Broadcast, first: float) -> None:
        """Publish `first` seconds from now, then every `interval` seconds."""
        next_at = time.monotonic() + first - interval
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            b.publish()

    def broadcast_for(task_id: str) -> Broadcast | None:
        """The shared broadcast, or with --per-task the task's own (None: too many tasks)."""
        if not per_task:
            return broadcast
        b = broadcasts.get(task_id)
        if b is None:
            if len(broadcasts) >= MAX_TASKS:
                return None
            b = broadcasts[task_id] = Broadcast(task_id)
            if interval > 0:
                tickers.add(asyncio.create_task(tick(b, random.uniform(0.0, interval))))
        return b

    async def events(request: Request) -> Response:
        b = broadcast_for(request.path_params["task_id"])
        if b is None:
            return JSONResponse({"error": "too many tasks"}, status_code=503)

        async def body() -> AsyncIterator[bytes]:
            seen = b.generation
            yield b.snapshot_sse
            while True:
                seen = await b.newer_than(seen)
                yield b.frame_sse

        return EventSourceResponse(
            body(),
            headers={"Cache-Control": "no-cache"},
            ping=PING_INTERVAL,
            send_timeout=SEND_TIMEOUT,
        )

    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        b = broadcast
        if per_task:
            try:
                first = await ws.receive_text()
                b = broadcast_for(str(json.loads(first).get("taskId", "")))
            except (WebSocketDisconnect, RuntimeError, ValueError, AttributeError):
                return
        if b is None:
            await ws.close(1013)
            return

        async def reader() -> None:
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass

        reading = asyncio.create_task(reader())
        try:
            seen = b.generation
            await ws.send_text(b.snapshot_ws)
            while not reading.done():
                seen = await b.newer_than(seen)
                async with asyncio.timeout(SEND_TIMEOUT):
                    await ws.send_text(b.frame_ws)
        except (WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
            pass  # the client left, or stopped reading
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def raw_events(scope: Scope, receive: Receive, send: Send) -> None:
        """SSE as a bare ASGI app: no sse-starlette, one watcher task for the disconnect."""
        parts = scope["path"].split("/")  # /raw/v1/tasks/{task}/events
        b = broadcast_for(parts[4] if len(parts) > 4 else "")
        if b is None:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        streaming = asyncio.current_task()
        assert streaming is not None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            streaming.cancel()

        await send({"type": "http.response.start", "status": 200, "headers": RAW_HEADERS})
        watcher = asyncio.create_task(watch())
        try:
            seen = b.generation
            await send({"type": "http.response.body", "body": b.snapshot_sse, "more_body": True})
            while True:
                seen = await b.newer_than(seen)
                async with asyncio.timeout(SEND_TIMEOUT):
                    await send(
                        {"type": "http.response.body", "body": b.frame_sse, "more_body": True}
                    )
        except (asyncio.CancelledError, OSError, TimeoutError):
            pass
        finally:
            watcher.cancel()

    routes: list[Route | WebSocketRoute] = [
        Route("/v1/tasks/{task_id}/events", events),
        WebSocketRoute("/v1/ws", websocket),
        Route("/healthz", healthz),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/raw/"):
            await raw_events(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds; 0: never push")
    parser.add_argument(
        "--per-task",
        action="store_true",
        help="a broadcast per task ID, each pushing at a random phase",
    )
    args = parser.parse_args()
    gc.set_threshold(*GC_THRESHOLDS)  # as `relay serve` does: the stack at its best
    uvicorn.run(
        create_app(args.interval, args.per_task),
        host=HOST,
        port=args.port,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",
        ws_max_size=64 * 1024,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=3,
        server_header=False,
    )


if __name__ == "__main__":
    main()
