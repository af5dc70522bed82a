"""The `Watchdog`: one timer that keeps time for every connection of a relay.

The transports (sse.py, ws.py) tell it when a connection starts and ends (`watch`,
`forget`) and when a send starts and ends (`sending`, `sent`); it alone writes a
`Subscriber`'s timing fields, and wakes or drops subscribers from its sweeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from .subscriber import Subscriber
from .workarounds import reset_transport, server_exiting

logger = logging.getLogger("relay.watchdog")

monotonic = time.monotonic

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

    # -- what a transport's sender tells it ---------------------------------------------

    @staticmethod
    def sending(subscriber: Subscriber) -> None:
        """A send to the client begins: a sweep resets it once it takes `send_timeout`."""
        subscriber.sending_since = monotonic()

    @staticmethod
    def sent(subscriber: Subscriber) -> None:
        """The send that began with `sending` is done: the stream's idle time counts anew."""
        subscriber.last_sent = subscriber.sending_since or monotonic()
        subscriber.sending_since = 0.0

    @staticmethod
    def idle(subscriber: Subscriber) -> None:
        """The sender waits for news (or has stopped): no send is in progress."""
        subscriber.sending_since = 0.0

    @staticmethod
    def keep_alive_due(subscriber: Subscriber) -> bool:
        """Whether a sweep found the stream idle for the ping interval; asking clears it."""
        due = subscriber.keep_alive
        subscriber.keep_alive = False
        return due

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
