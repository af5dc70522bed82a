"""Each hook of `relay/workarounds.py` still works on the installed libraries.

These reach past the libraries' public interfaces; an upgrade that moves what they rely
on fails here, by name, instead of in a slow-client or shutdown test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from sse_starlette.sse import AppStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from relay.workarounds import (
    Inbox,
    notify_messages,
    release_handshake,
    reset_transport,
    server_exiting,
    server_send,
    transport_of,
)

from .clients import wait_for
from .servers import ROOT, ThreadServer


class Hooks:
    """A small app whose routes use each hook, and what they reported."""

    def __init__(self) -> None:
        self.dropped: list[bool] = []
        self.seen: dict[str, Any] = {}
        self.app = Starlette(
            routes=[
                Route("/drop", self.drop),
                Route("/stream", self.stream),
                WebSocketRoute("/ws", DroppedSocket(self)),
                WebSocketRoute("/messages", Messages(self)),
            ]
        )

    async def drop(self, request: Request) -> Response:
        self.dropped.append(drop_connection(request.receive))
        return Response("never sent")

    async def stream(self, request: Request) -> Response:
        return Stream(self)


def drop_connection(receive: Receive) -> bool:
    """What the watchdog does to a client that stopped reading: find the transport behind
    `receive` and reset it. False when the server hides it."""
    transport = transport_of(receive)
    if transport is None:
        return False
    reset_transport(transport)
    return True


class DroppedSocket:
    """A WebSocket served as a plain ASGI app, as ws.py serves the relay's: accepted, then
    its connection reset."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await WebSocket(scope, receive, send).accept()
        self.hooks.dropped.append(drop_connection(receive))


class Stream(Response):
    """Starts a response through Starlette, then sends the body on the server's own `send`."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = transport_of(receive)
        direct = server_send(receive)
        self.hooks.seen["transport"] = transport
        self.hooks.seen["wrapped"] = direct is not send
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send(start)
        assert direct is not None and transport is not None
        await direct({"type": "http.response.body", "body": b"direct\n", "more_body": True})
        # The client goes away: the transport says so, with no task listening for it.
        await wait_for(transport.is_closing, timeout=5)
        self.hooks.seen["closed"] = True


class Messages:
    """A WebSocket whose one task sleeps on a future the inbox wakes (no reader task)."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        release_handshake(receive)
        protocol = receive.__self__  # type: ignore[attr-defined]
        self.hooks.seen["handshake"] = (protocol.request, protocol.response)
        wakes: list[int] = []
        woken = asyncio.Event()

        def wake() -> None:
            wakes.append(1)
            woken.set()

        waiting = notify_messages(receive, wake)
        assert waiting is not None
        self.hooks.seen["queue"] = protocol.queue
        received: list[Any] = []
        while True:
            await woken.wait()
            woken.clear()
            while waiting():
                message = await receive()  # returns at once
                received.append(message)
                if message["type"] == "websocket.disconnect":
                    self.hooks.seen["received"] = received
                    self.hooks.seen["wakes"] = len(wakes)
                    return
                await send({"type": "websocket.send", "text": "echo " + message["text"]})


@pytest.fixture
def hooks() -> Iterator[tuple[Hooks, ThreadServer]]:
    hooks = Hooks()
    server = ThreadServer(hooks.app).start()
    yield hooks, server
    server.stop()


def test_reset_transport_resets_an_http_connection_served_by_uvicorn(
    hooks: tuple[Hooks, ThreadServer],
) -> None:
    app, server = hooks
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        client.sendall(b"GET /drop HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = client.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert app.dropped == [True]
    assert answer == b"", "the response went out: the connection was not reset"


async def test_reset_transport_resets_a_websocket_served_by_uvicorn(
    hooks: tuple[Hooks, ThreadServer],
) -> None:
    app, server = hooks
    async with websockets.connect(f"{server.ws_url}/ws") as client:
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await asyncio.wait_for(client.recv(), 5)
    assert app.dropped == [True]
    assert closed.value.rcvd is None, "a close frame came: the connection was not reset"


async def test_server_send_and_transport_of_an_http_stream(
    hooks: tuple[Hooks, ThreadServer],
) -> None:
    app, server = hooks
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        while b"direct" not in await asyncio.wait_for(reader.readline(), 5):
            pass
    finally:
        writer.close()
    await wait_for(lambda: app.seen.get("closed"), timeout=5)
    assert app.seen["wrapped"], "Starlette no longer wraps send: server_send buys nothing"


async def test_the_inbox_wakes_the_socket_task_for_each_message_and_the_disconnect(
    hooks: tuple[Hooks, ThreadServer],
) -> None:
    app, server = hooks
    async with websockets.connect(f"{server.ws_url}/messages") as client:
        for text in ("one", "two", "three"):
            await client.send(text)
            assert await asyncio.wait_for(client.recv(), 5) == f"echo {text}"
    await wait_for(lambda: "received" in app.seen, timeout=5)
    assert isinstance(app.seen["queue"], Inbox)
    texts = [m.get("text") for m in app.seen["received"]]
    assert texts == ["one", "two", "three", None]
    assert app.seen["received"][-1]["type"] == "websocket.disconnect"
    assert app.seen["wakes"] >= 4
    assert app.seen["handshake"] == (None, None)


async def test_an_inbox_get_waits_for_the_next_put() -> None:
    inbox = Inbox(lambda: None)
    getting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not getting.done() and inbox.empty()
    inbox.put_nowait({"type": "websocket.receive", "text": "x"})
    assert await asyncio.wait_for(getting, 1) == {"type": "websocket.receive", "text": "x"}
    assert inbox.empty() and not inbox.waiting()


def test_server_exiting_reads_the_flag_of_uvicorns_signal_handler() -> None:
    """In a process of its own: sse-starlette, imported by the tests, replaces the handler."""
    script = textwrap.dedent(
        """
        import json, uvicorn
        from relay.workarounds import server_exiting

        server = uvicorn.Server(uvicorn.Config(app=None))
        seen = [server_exiting()]
        with server.capture_signals():
            seen.append(server_exiting())
            server.should_exit = True  # what uvicorn's handle_exit does on SIGTERM
            seen.append(server_exiting())
        print(json.dumps(seen))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, False, True]


def test_server_exiting_reads_sse_starlettes_flag_where_it_replaced_the_handler() -> None:
    assert not server_exiting()
    AppStatus.should_exit = True  # what sse-starlette's patched handle_exit sets
    assert server_exiting()
