"""The global upstream budget: a rate shared fairly by every loop, and pauses after a 429."""

import asyncio
import json
import time

import websockets

from relay.upstream.budget import RateBudget

from .clients import wait_for
from .conftest import RelayFactory, SimulatedUpstream


async def test_budget_spaces_calls_and_serves_first_come_first() -> None:
    budget = RateBudget(50)
    order: list[int] = []

    async def call(n: int) -> None:
        await budget.acquire()
        order.append(n)

    started = time.monotonic()
    for n in range(10):
        asyncio.get_running_loop().call_soon(lambda n=n: asyncio.ensure_future(call(n)))
    await wait_for(lambda: len(order) == 10)
    assert order == list(range(10))
    assert time.monotonic() - started >= 9 / 50 * 0.9


async def test_pause_holds_every_call_back() -> None:
    budget = RateBudget(None)
    budget.pause(0.3)
    started = time.monotonic()
    await budget.acquire()
    assert time.monotonic() - started >= 0.28
    started = time.monotonic()
    await budget.acquire()
    assert time.monotonic() - started < 0.05


async def test_two_hundred_tasks_share_twenty_calls_a_second_fairly(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(poll_interval=0.1, upstream_rate=20.0, linger=0.0)
    tasks = [upstream.start_task(queue=0, duration=120) for _ in range(200)]
    async with (
        websockets.connect(f"{relay.ws_url}/v1/ws") as first,
        websockets.connect(f"{relay.ws_url}/v1/ws") as second,
    ):
        started = time.monotonic()
        for n, task_id in enumerate(tasks):
            socket = first if n % 2 else second
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        await wait_for(lambda: all(upstream.calls(t) for t in tasks), timeout=20)
        elapsed = time.monotonic() - started
        counts = [upstream.calls(t) for t in tasks]
        # Fair: no task was polled a second time while another still waited for its first.
        assert max(counts) <= 2, sorted(counts)[-5:]
        await asyncio.sleep(2.0)
        total = sum(upstream.calls(t) for t in tasks)
        elapsed = time.monotonic() - started
    assert total / elapsed <= 20 * 1.1, (total, elapsed)
    assert total / elapsed >= 20 * 0.7, (total, elapsed)


async def test_a_429_storm_slows_the_relay_and_it_recovers(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(poll_interval=0.1)
    upstream.simulator.faults.retry_after = 0.5
    upstream.simulator.faults.throttle_rate = 1.0
    tasks = [upstream.start_task(queue=0.5, duration=2.0) for _ in range(5)]
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        for task_id in tasks:
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        await asyncio.sleep(1.5)
        # Unthrottled, five loops at 0.1 s would have made about 75 calls by now.
        storm_calls = sum(upstream.calls(t) for t in tasks)
        assert storm_calls <= 20, storm_calls
        upstream.simulator.faults.throttle_rate = 0.0
        ended: set[str] = set()
        async with asyncio.timeout(15):
            while len(ended) < len(tasks):
                frame = json.loads(await socket.recv())
                if frame["type"] == "end":
                    ended.add(frame["taskId"])
    assert ended == set(tasks)
