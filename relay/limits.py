"""The connection cap: refuse clearly at our own limit, before the process runs out of sockets."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import ErrorCode, error_data

RETRY_AFTER_SECONDS = 5


class ConnectionLimit:
    """ASGI middleware: at most `limit` open `/v1/` requests and WebSockets at once.

    Past the limit a client gets `503` with `Retry-After` (a WebSocket upgrade too,
    through the ASGI denial response). Health checks and metrics are never counted,
    so they keep answering when the relay is full.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.open >= self.limit:
            await self.refuse(scope, receive, send)
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the relay holds its maximum of {self.limit} connections; retry later"
        response = overloaded_response(message)
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
            "extensions", {}
        ):
            await send({"type": "websocket.close", "code": 1013})
            return
        await response(scope, receive, send)


def overloaded_response(message: str) -> JSONResponse:
    """`503` with `Retry-After`: the relay is full, the client should come back later."""
    return JSONResponse(
        error_data(ErrorCode.OVERLOADED, message, retrying=True),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def drop_connection(receive: Receive) -> bool:
    """Reset the TCP connection behind an ASGI `receive`; False when the server hides it.

    A client that stopped reading leaves bytes in the socket's buffers, and a graceful
    close waits for them to drain, which never happens: the socket would stay open
    for as long as the client does. The ASGI interface has no abort, so this reaches
    the transport of the uvicorn protocol `receive` belongs to, and resets the
    connection (SO_LINGER 0), which frees the socket and its buffers at once.
    """
    transport: Any = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "abort", None)):
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return True
