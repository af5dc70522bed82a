"""Every place the relay reaches past a library's public interface, in one module.

Each hook names the library version it was checked against; `tests/test_workarounds.py`
exercises each against the installed library, so an upgrade that changes what a hook
relies on fails there, by name, rather than somewhere in a slow-client test.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any, cast

import anyio
from starlette.types import Receive
from starlette.websockets import WebSocket

from .subscriber import Subscriber

CHECKED_AGAINST = {"uvicorn": "0.54.0", "sse-starlette": "3.7.0", "starlette": "1.10.0"}


def drop_connection(receive: Receive) -> bool:
    """Reset the TCP connection behind an ASGI `receive`; False when the server hides it.

    A client that stopped reading leaves bytes in the socket's buffers, and a graceful
    close waits for them to drain, which never happens: the socket would stay open
    for as long as the client does. ASGI has no abort, so this reaches the transport
    of the uvicorn protocol `receive` is a bound method of (uvicorn 0.54: its HTTP
    and WebSocket protocols keep it as `.transport`), and resets the connection
    (SO_LINGER 0), which frees the socket and its buffers at once.
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


def websocket_receive(websocket: WebSocket) -> Receive:
    """The server's `receive` behind a Starlette WebSocket (its private `_receive`)."""
    return websocket._receive


class ShutdownSignal:
    """Stands in for the event sse-starlette sets on server shutdown: it wakes the stream.

    sse-starlette 3.7 takes an `anyio.Event` as `shutdown_event` and only ever calls
    its `set()`; a real event would need a task of its own to watch it, where this
    wakes the subscriber's sender directly.
    """

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    def set(self) -> None:
        self._subscriber.close()


def shutdown_event(subscriber: Subscriber) -> anyio.Event:
    """A `shutdown_event` for sse-starlette that closes `subscriber` when set."""
    return cast(anyio.Event, ShutdownSignal(subscriber))
