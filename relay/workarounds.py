"""Every place the relay reaches past a library's public interface, in one module.

Each hook names the library version it was checked against; `tests/test_workarounds.py`
exercises each against the installed library, so an upgrade that changes what a hook
relies on fails there, by name, rather than somewhere in a slow-client or shutdown test.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Send


def transport_of(receive: Receive) -> asyncio.BaseTransport | None:
    """The transport of the connection behind an ASGI `receive`; None when the server hides it.

    ASGI gives an application no way to look at its connection. uvicorn 0.54's `receive`
    is a bound method of the object that holds the connection's transport as
    `.transport`: the request cycle for HTTP (httptools and h11), the protocol itself for
    WebSockets. The relay uses it to notice a client that went away without a task
    waiting on `receive`, and to reset a client that stopped reading.
    """
    transport: Any = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "abort", None)):
        return None
    if not callable(getattr(transport, "is_closing", None)):
        return None
    return transport  # type: ignore[no-any-return]


def server_send(receive: Receive) -> Send | None:
    """The server's own `send` for the connection behind `receive`; None when it hides it.

    Starlette's middlewares and routes wrap `send` to learn whether a response has
    started (ServerErrorMiddleware, ExceptionMiddleware, the route's exception handling:
    three coroutines per message). A stream sends its start through them and then
    thousands of body chunks, which none of them looks at; the relay sends those
    straight to the server (uvicorn 0.54: `receive` and `send` are bound methods of the
    same request cycle, or of the WebSocket protocol). A middleware that rewrites bodies
    (GZip) would not see them: the relay has none, and an event stream must not have one.
    """
    send = getattr(getattr(receive, "__self__", None), "send", None)
    return send if callable(send) else None


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Reset a TCP connection (RST): its socket and buffers are freed at once.

    A client that stopped reading leaves bytes in the socket's buffers, and a graceful
    close waits for them to drain, which never happens. ASGI has no abort; the transport
    has, and SO_LINGER 0 makes the close a reset. The server then sees the connection
    lost, which also ends a send waiting for the buffer to drain.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


def server_exiting() -> bool:
    """True once the uvicorn server of this process has begun to shut down.

    uvicorn 0.54 tells its application nothing about a shutdown until every connection
    has closed (or `timeout_graceful_shutdown` has run out): only then does the lifespan
    shutdown run. SSE streams never close by themselves, so the relay must notice the
    exit itself. uvicorn serving on the main thread installs its bound `handle_exit` as
    the SIGTERM and SIGINT handler, which sets `should_exit`; that flag is read here,
    through the handler. sse-starlette, when imported in the process, replaces
    `Server.handle_exit` with its own function, which sets `AppStatus.should_exit`:
    then that flag is read. Off the main thread (a server in a thread, as in tests)
    there is no handler to read, and this is always False: the lifespan's `Hub.close`
    still ends every stream, after uvicorn's graceful timeout.
    """
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    if server is not None:
        return bool(getattr(server, "should_exit", False))
    sse = sys.modules.get("sse_starlette.sse")
    app_status = getattr(sse, "AppStatus", None)
    return bool(getattr(app_status, "should_exit", False))


def release_handshake(receive: Receive) -> None:
    """Let go of an accepted WebSocket's handshake: its request and response, with headers.

    uvicorn 0.54's websockets-sansio protocol keeps the upgrade request and the response
    it answered with (`.request`, `.response`, websockets' objects, about 4 KiB with
    their headers) for the whole life of the socket, and reads them only until the
    `websocket.accept` is sent. After it, the relay drops them. The scope keeps its own
    copy of the request headers.
    """
    protocol = getattr(receive, "__self__", None)
    if getattr(protocol, "handshake_complete", False):
        for name in ("request", "response"):
            if hasattr(protocol, name):
                setattr(protocol, name, None)


def notify_messages(receive: Receive, wake: Callable[[], None]) -> Callable[[], bool] | None:
    """Have the server call `wake` when a message arrives for `receive`; None if it hides how.

    An ASGI application can wait for `receive()` or for something else, not for both
    without a second task. uvicorn 0.54's WebSocket protocols put every incoming event
    (messages and the disconnect) into an `asyncio.Queue`, `.queue`, that `receive`
    reads with `get()` and `empty()`, and fill it with `put_nowait()`. That queue is
    replaced here by an `Inbox`, which does the same and calls `wake` on each put, so
    the socket's one task sleeps on its subscriber and reads only when there is
    something to read. `receive` still does the reading, with uvicorn's pausing and
    resuming of the socket. The inbox also costs 0.2 KiB where the queue cost 3 (four
    deques and an event, for a queue that rarely holds more than one message). Returns
    a test for a message waiting, in which case `receive()` returns without waiting.
    """
    protocol = getattr(receive, "__self__", None)
    queue = getattr(protocol, "queue", None)
    if not isinstance(queue, asyncio.Queue):
        return None
    inbox = Inbox(wake)
    while not queue.empty():
        inbox.put_nowait(queue.get_nowait())
    protocol.queue = inbox  # type: ignore[union-attr]
    return inbox.waiting


class Inbox:
    """What uvicorn's WebSocket protocol asks of its queue (`put_nowait`, `get`, `empty`)."""

    __slots__ = ("_items", "_waiter", "_wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._wake = wake

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        self._wake()

    def empty(self) -> bool:
        return not self._items

    def waiting(self) -> bool:
        return bool(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.pop(0)
