"""Fan-out without queues: a connection's `Subscriber`, its `Cursor` in each task it watches,
and the `Watchdog` that keeps time for every connection of a relay.

A change marks each subscriber's cursor dirty and wakes it; when the subscriber's
sender gets to it, the cursor works out what that subscriber still lacks (the
shared, pre-encoded patch, one combined patch, or a snapshot). A slow client
therefore costs one cursor, never a backlog, and never slows the poll loop or
anyone else.

A connection is one task, its sender (a WebSocket adds a reader for the client's own
messages). Everything a connection must do on time is done by one `Watchdog` timer for
all of them: keep-alive comments on idle SSE streams, resetting a client whose send is
stuck, noticing a client that went away, and closing every stream when the server
begins to exit. No connection holds a timer, a cancel scope or a task of its own for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from .workarounds import reset_transport, server_exiting

if TYPE_CHECKING:
    from .hub import TaskHub
    from .protocol import Event

logger = logging.getLogger("relay.subscriber")

monotonic = time.monotonic


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
        self.last_sent = monotonic()
        self._dirty: dict[Cursor, None] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False

    def mark(self, cursor: Cursor) -> None:
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

    async def changed(self) -> list[Cursor]:
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

    def take(self) -> list[Cursor]:
        """The cursors that have news since the last take, after a wake-up."""
        self._woken = False
        if not self._dirty:
            return []
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


# A watched connection: its transport when the server shows it (to notice a lost
# client, and to reset a stuck one), and the task serving it (cancelled to stop a stuck
# send when there is no transport to reset).
Watched = tuple[asyncio.BaseTransport | None, "asyncio.Task[object] | None"]

SHUTDOWN_POLL = 0.1  # seconds between looks at the server's exit flag (uvicorn's own pace)
MAX_SWEEP = 2.0  # seconds between sweeps of every connection, at most
MIN_SWEEP = 0.05


class Watchdog:
    """One timer for every connection of a relay, instead of timers and tasks per connection.

    Every `SHUTDOWN_POLL` seconds it asks whether the server has begun to exit, and if
    so closes every subscriber (SSE streams send their `retry:` hint and end; WebSockets
    close with 1012). Every sweep (a quarter of the shorter of the ping interval and the
    send timeout, at most `MAX_SWEEP` seconds) it looks at each connection once:
    - a connection whose transport is closing: the client went away, `Subscriber.drop`;
    - a send in progress for `send_timeout` or more: the client stopped reading, its
      connection is reset (`workarounds.reset_transport`);
    - an SSE stream with nothing sent for `ping_interval`: woken with `keep_alive` set.
    Each is noticed within one sweep of its time. The cost is a pass over the
    connections per sweep (3 to 5 ms for 10,000, every 2 s with the default settings),
    instead of a timer per send and a task per connection.
    """

    def __init__(
        self,
        *,
        ping_interval: float,
        send_timeout: float,
        exiting: Callable[[], bool] = server_exiting,
    ) -> None:
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.sweep_every = min(max(min(ping_interval, send_timeout) / 4, MIN_SWEEP), MAX_SWEEP)
        self.exiting = exiting
        self._watched: dict[Subscriber, Watched] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._next_sweep = 0.0
        self.shutting_down = False
        self.resets: Counter[str] = Counter()  # stuck clients reset, by transport (metrics)

    def __len__(self) -> int:
        return len(self._watched)

    def watch(
        self,
        subscriber: Subscriber,
        transport: asyncio.BaseTransport | None,
        task: asyncio.Task[object] | None = None,
    ) -> None:
        subscriber.last_sent = monotonic()
        self._watched[subscriber] = (transport, task)
        if self.shutting_down:
            subscriber.close()
        if self._timer is None:
            self._next_sweep = monotonic() + self.sweep_every
            self._schedule()

    def forget(self, subscriber: Subscriber) -> None:
        self._watched.pop(subscriber, None)

    def _schedule(self) -> None:
        delay = min(SHUTDOWN_POLL, self.sweep_every)
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._watched:
            return  # started again by the next watch()
        if not self.shutting_down and self.exiting():
            self.shutting_down = True
            logger.info("server exiting: closing %d connections", len(self._watched))
            for subscriber in self._watched:
                subscriber.close()
        now = monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_every
            self.sweep(now)
        self._schedule()

    def sweep(self, now: float) -> None:
        """Look at every connection once (see the class's description)."""
        ping_interval = self.ping_interval
        send_timeout = self.send_timeout
        for subscriber, (transport, task) in list(self._watched.items()):
            if subscriber.gone:
                continue
            if transport is not None and transport.is_closing():
                subscriber.drop()
                continue
            since = subscriber.sending_since
            if since:
                if now - since >= send_timeout:
                    self.stuck(subscriber, transport, task)
            elif subscriber.transport == "sse" and now - subscriber.last_sent >= ping_interval:
                subscriber.keep_alive = True
                subscriber.poke()

    def stuck(
        self,
        subscriber: Subscriber,
        transport: asyncio.BaseTransport | None,
        task: asyncio.Task[object] | None,
    ) -> None:
        """A client that stopped reading: reset its connection, which ends the send."""
        logger.info("dropping a %s client that stopped reading", subscriber.transport)
        self.resets[subscriber.transport] += 1
        subscriber.drop()
        if transport is not None:
            reset_transport(transport)
        elif task is not None:
            task.cancel()


_watchdogs: weakref.WeakKeyDictionary[object, Watchdog] = weakref.WeakKeyDictionary()


def watchdog_of(owner: object, *, ping_interval: float, send_timeout: float) -> Watchdog:
    """The watchdog of `owner` (a relay's hub), made on first use."""
    watchdog = _watchdogs.get(owner)
    if watchdog is None:
        watchdog = Watchdog(ping_interval=ping_interval, send_timeout=send_timeout)
        _watchdogs[owner] = watchdog
    return watchdog
