"""A client that stops reading is dropped after RELAY_SEND_TIMEOUT; nobody else notices."""

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .clients import Watcher, sse_events
from .servers import ProcessServer, ThreadServer

RUN_SECONDS = 8.0
BLOB_BYTES = 150_000  # about 200 KB of base64 per state, a new one every poll
SEND_TIMEOUT = 1.0
STUCK_CLIENTS = 4
TCP_ESTABLISHED = 1


class FatUpstream:
    """An upstream whose running tasks change every poll, each state a large one."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        app = Starlette(routes=[Route("/scc/comfy_get_progress", self.progress, methods=["POST"])])
        self.server = ThreadServer(app).start()

    def start_task(self, task_id: str) -> None:
        self.started[task_id] = time.monotonic()

    @staticmethod
    def final_state(task_id: str) -> dict[str, Any]:
        return {"taskId": task_id, "status": "succeeded", "progress": 1}

    async def progress(self, request: Request) -> JSONResponse:
        task_id = (await request.json())["taskId"]
        elapsed = time.monotonic() - self.started[task_id]
        if elapsed >= RUN_SECONDS:
            data = self.final_state(task_id)
        else:
            blob = base64.b64encode(os.urandom(BLOB_BYTES)).decode()
            data = {
                "taskId": task_id,
                "status": "running",
                "progress": elapsed / RUN_SECONDS,
                "blob": blob,
            }
        return JSONResponse({"status": 10, "data": data})


@pytest.fixture
def fat() -> Iterator[FatUpstream]:
    upstream = FatUpstream()
    yield upstream
    upstream.server.stop()


@pytest.fixture
def relay(fat: FatUpstream) -> Iterator[ProcessServer]:
    env = {
        "RELAY_POLL_INTERVAL": "0.05",
        "RELAY_SEND_TIMEOUT": str(SEND_TIMEOUT),
        "RELAY_FETCH_RESULT": "0",
    }
    server = ProcessServer(
        ["serve", "--upstream", fat.server.url, "--signing", "none"], env=env
    ).start()
    yield server
    server.stop()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def stuck_client(port: int, request: bytes, then: bytes = b"") -> socket.socket:
    """Send a request from a socket with a small receive buffer, then never read again.

    With `then`, read the response head first (a WebSocket upgrade's 101), then send it.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    if then:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        await loop.sock_sendall(sock, then)
    return sock


WS_UPGRADE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def ws_subscribe_frame(task_id: str) -> bytes:
    payload = json.dumps({"type": "subscribe", "taskId": task_id}).encode()
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # masked with zeros


def sse_request(task_id: str) -> bytes:
    return f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def follow_ws(ws_base: str, task_id: str) -> Watcher:
    watcher = Watcher()
    async with websockets.connect(f"{ws_base}/v1/ws", max_size=None) as sock:
        await sock.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        while watcher.ended is None:
            frame = json.loads(await asyncio.wait_for(sock.recv(), 10))
            watcher.apply(frame["type"], frame["data"], frame.get("seq"))
    return watcher


async def follow_sse(base: str, task_id: str) -> Watcher:
    watcher = Watcher()
    async with httpx.AsyncClient(timeout=10) as client:
        async for event in sse_events(client, f"{base}/v1/tasks/{task_id}/events"):
            watcher.apply(event.event, event.data, int(event.id) if event.id else None)
    return watcher


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_client_that_stops_reading_is_dropped_and_others_get_every_update(
    transport: str, fat: FatUpstream, relay: ProcessServer
) -> None:
    assert relay.process is not None
    pid = relay.process.pid
    task_id = f"fat-{transport}"
    baseline = rss_bytes(pid)
    fat.start_task(task_id)
    started = time.monotonic()
    stuck = [
        await (
            stuck_client(relay.port, WS_UPGRADE, ws_subscribe_frame(task_id))
            if transport == "ws"
            else stuck_client(relay.port, sse_request(task_id))
        )
        for _ in range(STUCK_CLIENTS)
    ]
    readers = [
        asyncio.create_task(follow_ws(relay.ws_url, task_id)),
        asyncio.create_task(follow_sse(relay.url, task_id)),
    ]
    dropped: dict[int, float] = {}
    peak = baseline
    while not all(reader.done() for reader in readers):
        await asyncio.sleep(0.05)
        peak = max(peak, rss_bytes(pid))
        for index, sock in enumerate(stuck):
            if index not in dropped and tcp_state(sock) != TCP_ESTABLISHED:
                dropped[index] = time.monotonic() - started

    for reader in readers:
        watcher = reader.result()
        assert watcher.ended == "succeeded"
        assert watcher.state == fat.final_state(task_id)
        seqs = [seq for kind, _, seq in watcher.events if kind in ("snapshot", "patch")]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "an update was skipped"
        assert len(seqs) > 20
    # Filling the kernel's socket buffers takes about a second at this rate; then the
    # relay's send blocks, and SEND_TIMEOUT later the client is reset.
    assert sorted(dropped) == list(range(STUCK_CLIENTS)), dropped
    assert max(dropped.values()) < 2 + SEND_TIMEOUT + 1.5, dropped
    assert peak - baseline < 100 * 1024 * 1024, (baseline, peak)
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(relay.url + "/metrics")).text
    assert f'relay_slow_clients_reset_total{{transport="{transport}"}} {STUCK_CLIENTS}.0' in metrics
    for sock in stuck:
        sock.close()
