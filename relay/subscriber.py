"""Fan-out without queues: a connection's `Subscriber`, and its `Cursor` in each task it watches.

A change marks each subscriber's cursor dirty and wakes it; when the subscriber's
sender gets to it, the cursor works out what that subscriber still lacks (the
shared, pre-encoded patch, one combined patch, or a snapshot). A slow client
therefore costs one cursor, never a backlog, and never slows the poll loop or
anyone else.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hub import TaskHub
    from .protocol import Event


class Subscriber:
    """One connection's interest in its tasks; its sender sleeps until one has news."""

    __slots__ = ("_dirty", "_wake", "closing", "transport")

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.closing = False
        self._dirty: dict[Cursor, None] = {}
        self._wake = asyncio.Event()

    def mark(self, cursor: Cursor) -> None:
        self._dirty[cursor] = None
        self._wake.set()

    def poke(self) -> None:
        """Wake the sender for something of the connection's own (a reply to the client)."""
        self._wake.set()

    def close(self) -> None:
        """Ask the sender to finish (server shutdown, or the connection is being dropped)."""
        self.closing = True
        self._wake.set()

    async def changed(self) -> list[Cursor]:
        """Wait for news, then return the cursors that have some (empty when closing)."""
        await self._wake.wait()
        self._wake.clear()
        dirty = list(self._dirty)
        self._dirty.clear()
        return dirty


class Cursor:
    """Where one subscriber stands in one task's history."""

    __slots__ = ("done", "notice_gen", "seq", "subscriber", "task")

    def __init__(self, task: TaskHub, subscriber: Subscriber, seq: int | None) -> None:
        self.task = task
        self.subscriber = subscriber
        self.seq = seq
        self.notice_gen = 0
        self.done = False

    def pending(self) -> list[Event]:
        """The events this subscriber lacks, oldest first; advances the cursor past them."""
        return self.task.catch_up(self)
