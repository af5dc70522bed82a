"""The connection cap: refuse clearly at our own limit, before the process runs out of sockets."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .responses import overloaded_response


class ConnectionLimit:
    """ASGI middleware: at most `limit` open `/v1/` requests and WebSockets at once.

    Past the limit a client gets `503` with `Retry-After` (a WebSocket upgrade too,
    through the ASGI denial response). Health checks and metrics are never counted,
    so they keep answering when the relay is full.
    """

    def __init__(
        self, app: ASGIApp, limit: int, counted: Callable[[int], None] | None = None
    ) -> None:
        """`counted` hears each change of the open count (+1, -1): the metrics' gauge."""
        self.app = app
        self.limit = limit
        self.open = 0
        self.counted = counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.open >= self.limit:
            await self.refuse(scope, receive, send)
            return
        self.open += 1
        if self.counted is not None:
            self.counted(1)
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
            if self.counted is not None:
                self.counted(-1)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the relay holds its maximum of {self.limit} connections; retry later"
        response = overloaded_response(message)
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
            "extensions", {}
        ):
            await send({"type": "websocket.close", "code": 1013})
            return
        await response(scope, receive, send)
