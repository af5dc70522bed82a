"""A minimal upstream that answers the progress API at once, with a new state on every call.

Task IDs starting with `idle` never change (a queued task); any other task ID is running
and changes on every call, its state carrying `sentAt`, the `time.time()` at which the
answer was made, so load clients can measure the relay's delivery latency. Task IDs are
never unknown. `GET /stats` counts calls per task.

`--raw` serves the same answers from a bare asyncio protocol (httptools' parser, uvloop, no
ASGI) at a few tens of µs of CPU per call, so that one upstream can keep up with thousands of
calls a second beside the relay on two cores (bench/upstream_cpu.py, bench.economy's
many-task rows). Either mode closes a keep-alive connection only when the client does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .common import HOST, hot_state, idle_state

calls: Counter[str] = Counter()


def envelope(data: object) -> bytes:
    body = {
        "status": 10,
        "apiInvokeId": "i_bench",
        "data": data,
        "subErrCode": None,
        "subErrMessage": None,
        "errCode": None,
        "errMessage": None,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def progress(request: Request) -> Response:
    task_id = str(json.loads(await request.body()).get("taskId", ""))
    calls[task_id] += 1
    if task_id.startswith("idle"):
        state = idle_state(task_id)
    else:
        state = hot_state(task_id, calls[task_id], time.time())
    return Response(envelope(state), media_type="application/json")


async def result(request: Request) -> Response:
    return Response(envelope({"images": [], "result": {}}), media_type="application/json")


async def stats(request: Request) -> Response:
    return JSONResponse({"calls": dict(calls), "total": sum(calls.values())})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/scc/comfy_get_progress", progress, methods=["POST"]),
        Route("/scc/comfy_get_result", result, methods=["POST"]),
        Route("/stats", stats),
        Route("/healthz", healthz),
    ]
)


def raw_answer(path: bytes, body: bytes) -> tuple[bytes, bytes]:
    """(status line, body) of the raw server for one request."""
    if path == b"/scc/comfy_get_progress":
        try:
            task_id = str(json.loads(body).get("taskId", ""))
        except ValueError:
            return b"400 Bad Request", b"{}"
        calls[task_id] += 1
        if task_id.startswith("idle"):
            state = idle_state(task_id)
        else:
            state = hot_state(task_id, calls[task_id], time.time())
        return b"200 OK", envelope(state)
    if path == b"/scc/comfy_get_result":
        return b"200 OK", envelope({"images": [], "result": {}})
    if path == b"/stats":
        return b"200 OK", json.dumps({"calls": dict(calls), "total": sum(calls.values())}).encode()
    if path == b"/healthz":
        return b"200 OK", b'{"status":"ok"}'
    return b"404 Not Found", b"{}"


class RawHTTP(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection, bodies by Content-Length."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status, body = raw_answer(self.url.split(b"?", 1)[0], b"".join(self.body))
        self.url, self.body = b"", []
        head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        self.transport.write(head % (status, len(body)) + body)


async def serve_raw(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawHTTP, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--raw", action="store_true", help="a bare asyncio server, no ASGI")
    args = parser.parse_args()
    if args.raw:
        import uvloop

        uvloop.run(serve_raw(args.port))
        return
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
