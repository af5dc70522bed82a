"""Each hook of `relay/workarounds.py` still works on the installed libraries.

These reach past the libraries' public interfaces; an upgrade that moves what they rely
on fails here, by name, instead of in a slow-client or shutdown test.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import websockets
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from relay.subscriber import Subscriber
from relay.workarounds import drop_connection, shutdown_event, websocket_receive

from .clients import wait_for
from .servers import ThreadServer


class Hooks:
    """A small app whose routes use each hook, and what they reported."""

    def __init__(self) -> None:
        self.dropped: list[bool] = []
        self.subscriber = Subscriber("sse")
        self.app = Starlette(
            routes=[
                Route("/drop", self.drop),
                Route("/stream", self.stream),
                WebSocketRoute("/ws", self.websocket),
            ]
        )

    async def drop(self, request: Request) -> Response:
        self.dropped.append(drop_connection(request.receive))
        return Response("never sent")

    async def websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.dropped.append(drop_connection(websocket_receive(websocket)))

    async def stream(self, request: Request) -> Response:
        subscriber = self.subscriber

        async def body() -> object:
            yield {"data": "open"}
            await subscriber.changed()
            yield {"data": "closing" if subscriber.closing else "woken"}

        return EventSourceResponse(body(), shutdown_event=shutdown_event(subscriber))


@pytest.fixture
def hooks() -> object:
    hooks = Hooks()
    server = ThreadServer(hooks.app).start()
    yield hooks, server
    server.stop()


def test_drop_connection_resets_an_http_connection_served_by_uvicorn(hooks: object) -> None:
    app, server = hooks  # type: ignore[misc]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        client.sendall(b"GET /drop HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = client.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert app.dropped == [True]
    assert answer == b"", "the response went out: the connection was not reset"


async def test_drop_connection_resets_a_websocket_served_by_uvicorn(hooks: object) -> None:
    app, server = hooks  # type: ignore[misc]
    async with websockets.connect(f"{server.ws_url}/ws") as client:
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await asyncio.wait_for(client.recv(), 5)
    assert app.dropped == [True]
    assert closed.value.rcvd is None, "a close frame came: the connection was not reset"


async def test_sse_starlette_shutdown_sets_the_signal_that_closes_the_subscriber(
    hooks: object,
) -> None:
    app, server = hooks  # type: ignore[misc]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        while b"data: open" not in await asyncio.wait_for(reader.readline(), 5):
            pass
        AppStatus.should_exit = True  # what sse-starlette's patched uvicorn exit handler sets
        await wait_for(lambda: app.subscriber.closing, timeout=5)
    finally:
        writer.close()
