"""Fan-out without queues: a connection's `Subscriber`, and its `Cursor` in each task it watches.

A change marks each subscriber's cursor dirty and wakes it; when the subscriber's
sender gets to it, the cursor works out what that subscriber still lacks (the
shared, pre-encoded patch, one combined patch, or a snapshot). A slow client
therefore costs one cursor, never a backlog, and never slows the poll loop or
anyone else.

A connection is one task, its sender, woken by the server itself for the client's own
messages too. Everything a connection must do on time is done by the relay's one
`Watchdog` (watchdog.py), which alone writes the timing fields below.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Generic, Protocol, TypeVar

from .protocol import Event


class History(Protocol):
    """What a cursor reads: one task's events (`hub.TaskHub`)."""

    @property
    def task_id(self) -> str: ...

    def catch_up(self, cursor: Cursor[Any]) -> list[Event]: ...


H = TypeVar("H", bound=History)

PUSH_TRANSPORTS = ("sse", "ws")
"""The transports that push to clients, each with its `relay_subscribers` and
`relay_messages_pushed_total` series. A transport's contract: a `Subscriber` named by it
per connection, `Relay.admit` before any cursor, `Relay.watchdog` told of the connection
and of every send, and `Hub.pushed` told of what was sent."""


class Subscriber:
    """One connection's interest in its tasks; its sender sleeps until one has news.

    Besides the dirty cursors, the sender is woken for: `closing` (the server is going
    away: say goodbye and stop), `gone` (the connection was lost or reset: stop at once)
    and `keep_alive` (the stream has been idle for the ping interval). While a send is in
    progress, `sending_since` holds when it started, for the watchdog.
    """

    __slots__ = (
        "_dirty",
        "_waiter",
        "_woken",
        "closing",
        "gone",
        "keep_alive",
        "last_sent",
        "sending_since",
        "transport",
    )

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.closing = False
        self.gone = False
        self.keep_alive = False
        self.sending_since = 0.0
        self.last_sent = time.monotonic()
        self._dirty: dict[Cursor[Any], None] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False

    def mark(self, cursor: Cursor[Any]) -> None:
        self._dirty[cursor] = None
        self.poke()

    def poke(self) -> None:
        """Wake the sender for something of the connection's own (a reply, a keep-alive)."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """Ask the sender to finish (server shutdown): it may still say goodbye."""
        self.closing = True
        self.poke()

    def drop(self) -> None:
        """The connection is lost or being reset: the sender stops without a word."""
        self.gone = True
        self.poke()

    async def changed(self) -> list[Cursor[Any]]:
        """Wait for news, then return the cursors that have some (empty for other wake-ups)."""
        waiter = self.waiter()
        if waiter is not None:
            await waiter
        return self.take()

    def waiter(self) -> asyncio.Future[None] | None:
        """What to await until there is news, or None when there is already.

        With `take`, `changed` in two steps for a sender's loop: no coroutine per wake-up.
        A bare future, not an asyncio.Event: one object per wait and no list of waiters.
        """
        if self._woken:
            return None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def take(self) -> list[Cursor[Any]]:
        """The cursors that have news since the last take, after a wake-up."""
        self._woken = False
        if not self._dirty:
            return []
        dirty = list(self._dirty)
        self._dirty.clear()
        return dirty


class Cursor(Generic[H]):
    """Where one subscriber stands in one task's history."""

    __slots__ = ("done", "notice_gen", "seq", "subscriber", "task")

    def __init__(self, task: H, subscriber: Subscriber, seq: int | None) -> None:
        self.task = task
        self.subscriber = subscriber
        self.seq = seq
        self.notice_gen = 0
        self.done = False

    def pending(self) -> list[Event]:
        """The events this subscriber lacks, oldest first; advances the cursor past them."""
        return self.task.catch_up(self)
