"""The `Watchdog`'s sweep and exit watch (relay/watchdog.py), with fake transports and clock.

No sockets: a connection is a real `Subscriber` and a `FakeTransport` that records being
reset; the clock is `relay.watchdog.monotonic`, set by each test. What it does to real
connections (a client that stopped reading, one that vanished, SIGTERM) is tested in
test_slow_clients.py, test_sse.py, test_ws.py and test_app.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from relay import watchdog as watchdog_module
from relay.subscriber import Subscriber
from relay.watchdog import MAX_SWEEP, MIN_SWEEP, SHUTDOWN_POLL, Watchdog

PING = 10.0
SEND_TIMEOUT = 4.0


class FakeTransport:
    """What the watchdog asks of a connection's transport."""

    def __init__(self) -> None:
        self.closing = False
        self.aborted = False

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def get_extra_info(self, name: str) -> None:
        return None  # no socket: nothing to set SO_LINGER on

    def abort(self) -> None:
        self.aborted = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    clock = Clock()
    monkeypatch.setattr(watchdog_module, "monotonic", clock)
    yield clock


def woken(subscriber: Subscriber) -> bool:
    """Whether the subscriber's sender was woken (and clear it, as the sender would)."""
    was = subscriber.waiter() is None
    subscriber.take()
    return was


def connection(dog: Watchdog, transport: str = "sse") -> tuple[Subscriber, FakeTransport]:
    subscriber = Subscriber(transport)
    fake = FakeTransport()
    dog.watch(subscriber, fake)  # type: ignore[arg-type]
    return subscriber, fake


def never_exiting() -> bool:
    return False


@pytest.fixture
def dog() -> Iterator[Watchdog]:
    dog = Watchdog(ping_interval=PING, send_timeout=SEND_TIMEOUT, exiting=never_exiting)
    yield dog
    for subscriber in list(dog._watched):
        dog.forget(subscriber)


def test_a_sweep_comes_every_quarter_of_the_shorter_limit_within_bounds() -> None:
    def sweep_every(ping: float, send: float) -> float:
        return Watchdog(ping_interval=ping, send_timeout=send).sweep_every

    assert sweep_every(4.0, 6.0) == 1.0
    assert sweep_every(6.0, 2.0) == 0.5
    assert sweep_every(60.0, 30.0) == MAX_SWEEP
    assert sweep_every(0.01, 30.0) == MIN_SWEEP


async def test_a_send_in_progress_for_the_send_timeout_is_reset(
    dog: Watchdog, clock: Clock
) -> None:
    subscriber, transport = connection(dog)
    Watchdog.sending(subscriber)
    started = clock.now
    dog.sweep(started + SEND_TIMEOUT - 0.01)
    assert not subscriber.gone and not transport.aborted
    dog.sweep(started + SEND_TIMEOUT)
    assert subscriber.gone and transport.aborted, "dropped, and its connection reset"
    assert woken(subscriber)


async def test_a_send_that_ends_in_time_is_left_alone(dog: Watchdog, clock: Clock) -> None:
    subscriber, transport = connection(dog)
    Watchdog.sending(subscriber)
    clock.now += SEND_TIMEOUT - 1
    Watchdog.sent(subscriber)
    dog.sweep(clock.now + SEND_TIMEOUT)
    assert not subscriber.gone and not transport.aborted
    Watchdog.sending(subscriber)
    Watchdog.idle(subscriber)  # the sender gave up on the send (its client went away)
    dog.sweep(clock.now + SEND_TIMEOUT)
    assert not transport.aborted


async def test_a_stuck_send_with_no_transport_to_reset_has_its_task_cancelled(
    dog: Watchdog, clock: Clock
) -> None:
    subscriber = Subscriber("ws")
    sender = asyncio.ensure_future(asyncio.sleep(3600))
    dog.watch(subscriber, None, sender)  # type: ignore[arg-type]
    Watchdog.sending(subscriber)
    dog.sweep(clock.now + SEND_TIMEOUT)
    assert subscriber.gone
    with pytest.raises(asyncio.CancelledError):
        await sender


async def test_a_closing_transport_is_dropped_not_reset(dog: Watchdog, clock: Clock) -> None:
    subscriber, transport = connection(dog)
    other, _ = connection(dog)
    transport.closing = True  # the client went away
    dog.sweep(clock.now)
    assert subscriber.gone and not transport.aborted
    assert woken(subscriber), "its sender wakes to return"
    assert not other.gone


async def test_a_dropped_subscriber_is_not_looked_at_again(dog: Watchdog, clock: Clock) -> None:
    subscriber, transport = connection(dog)
    subscriber.drop()
    Watchdog.sending(subscriber)
    dog.sweep(clock.now + SEND_TIMEOUT)
    assert not transport.aborted


async def test_an_idle_sse_stream_gets_a_keep_alive_after_the_ping_interval(
    dog: Watchdog, clock: Clock
) -> None:
    sse, _ = connection(dog, "sse")
    ws, _ = connection(dog, "ws")
    woken(sse), woken(ws)
    dog.sweep(clock.now + PING - 0.01)
    assert not Watchdog.keep_alive_due(sse) and not woken(sse)
    dog.sweep(clock.now + PING)
    assert woken(sse) and Watchdog.keep_alive_due(sse)
    assert not Watchdog.keep_alive_due(sse), "asking clears it"
    assert not woken(ws) and not Watchdog.keep_alive_due(ws), "WebSockets ping themselves"


async def test_a_stream_with_traffic_gets_no_keep_alive(dog: Watchdog, clock: Clock) -> None:
    subscriber, _ = connection(dog)
    clock.now += PING - 1
    Watchdog.sending(subscriber)
    Watchdog.sent(subscriber)  # idle time counts from this send
    dog.sweep(clock.now + PING - 0.01)
    assert not Watchdog.keep_alive_due(subscriber)
    Watchdog.sending(subscriber)
    dog.sweep(clock.now + PING)  # a send in progress: no keep-alive beside it
    assert not Watchdog.keep_alive_due(subscriber)


async def test_on_exit_every_connection_is_closed_and_so_is_every_later_one() -> None:
    exiting = False
    asked = 0

    def server_exiting() -> bool:
        nonlocal asked
        asked += 1
        return exiting

    dog = Watchdog(ping_interval=PING, send_timeout=SEND_TIMEOUT, exiting=server_exiting)
    first, second = Subscriber("sse"), Subscriber("ws")
    dog.watch(first, None)
    dog.watch(second, None)
    await asyncio.sleep(SHUTDOWN_POLL * 2.5)
    assert asked >= 2 and not first.closing
    exiting = True
    await asyncio.sleep(SHUTDOWN_POLL * 1.5)
    assert first.closing and second.closing and dog.shutting_down
    assert not first.gone, "closed, so it may still say goodbye"
    late = Subscriber("sse")
    dog.watch(late, None)
    assert late.closing
    for subscriber in (first, second, late):
        dog.forget(subscriber)
    await asyncio.sleep(SHUTDOWN_POLL * 1.5)
    asked_then = asked
    await asyncio.sleep(SHUTDOWN_POLL * 3)
    assert asked == asked_then, "with nothing watched the timer stops"
    assert len(dog) == 0
