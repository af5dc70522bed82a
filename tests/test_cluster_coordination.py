"""The cluster's per-node coordination on a real redis-server: heartbeat-held leases,
takeover from a node that stopped beating, batched stores, resync after a missed message,
and a node that cannot reach Redis saying so."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis as redis_sync
from redis import exceptions as redis_exceptions

from relay.backend import Change
from relay.cluster import RedisBackend
from relay.cluster.keys import CHANNEL, state_key
from relay.metrics import Metrics
from relay.protocol import dumps

from .clients import sse_events, wait_for
from .conftest import RelayFactory, SimulatedUpstream
from .servers import RedisServer, free_port

LEASE_TTL = 0.6


class Node:
    """A `RedisBackend` with a receive callback that records what it is given."""

    def __init__(self, url: str, refuse_patches: bool = False) -> None:
        self.backend = RedisBackend(url, LEASE_TTL, Metrics())
        self.received: list[Change] = []
        self.refuse_patches = refuse_patches

    def receive(self, change: Change) -> bool:
        self.received.append(change)
        return not (self.refuse_patches and change.state is None and change.patch is not None)

    def start(self) -> Node:
        self.backend.start(self.receive)
        return self

    async def ready(self) -> None:
        await wait_for(lambda: self.backend.healthy, timeout=5)

    def kill(self) -> None:
        """Stop beating and listening, as a killed process does: nothing is released."""
        for task in self.backend._tasks:
            task.cancel()


@pytest.fixture
async def nodes(redis_url: str) -> AsyncIterator[list[Node]]:
    started: list[Node] = []

    def make(**kwargs: Any) -> Node:
        node = Node(redis_url, **kwargs).start()
        started.append(node)
        return node

    yield make  # type: ignore[misc]
    for node in started:
        await node.backend.close()


async def test_a_lease_lives_on_its_holders_heartbeat_without_renewals(nodes: Any) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    assert await a.backend.interest("t1", True) >= 1
    assert await a.backend.acquire("t1")
    await b.backend.interest("t1", True)
    await asyncio.sleep(LEASE_TTL * 4)  # four lease periods, no renew() called at all
    assert not await b.backend.acquire("t1")
    assert await a.backend.store(Change("t1", 1, {"status": "running"}))
    assert await a.backend.renew("t1")


async def test_a_dead_nodes_lease_is_taken_over_and_its_stores_are_fenced(nodes: Any) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    for node in (a, b):
        await node.backend.interest("t2", True)
    owner, other = (a, b) if await a.backend.acquire("t2") else (b, a)
    assert owner.backend.leases == {"t2"}
    assert await owner.backend.store(Change("t2", 5, {"status": "running", "progress": 0.5}))
    assert not await other.backend.acquire("t2")  # held by a live node
    owner.kill()
    started = time.monotonic()

    async def took_over() -> bool:
        return await other.backend.acquire("t2")

    while not await took_over():
        assert time.monotonic() - started < LEASE_TTL * 5, "no takeover"
        await asyncio.sleep(0.05)
    assert other.backend.metrics.lease_takeovers._value.get() == 1
    # The stored state survived the takeover: the new owner continues from it.
    reader = nodes()
    stored = await reader.backend.load("t2")
    assert stored is not None and stored.seq == 5
    # The old owner's late write is refused: the lease is no longer its.
    assert not await owner.backend._writer.write(Change("t2", 6, {"status": "failed"}))


async def test_concurrent_stores_go_out_in_batches_and_arrive_in_order(
    nodes: Any, redis_url: str
) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    tasks = [f"batch{n}" for n in range(50)]
    for task_id in tasks:
        await a.backend.interest(task_id, True)
        await b.backend.interest(task_id, True)
        assert await a.backend.acquire(task_id) or await b.backend.acquire(task_id)
    owner = {t: (a if t in a.backend.leases else b) for t in tasks}
    store = redis_sync.Redis.from_url(redis_url)
    before = store.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)
    for seq in (1, 2, 3):
        results = await asyncio.gather(
            *(
                owner[t].backend.store(Change(t, seq, {"n": seq}, None if seq == 1 else {"n": seq}))
                for t in tasks
            )
        )
        assert all(results)
    publishes = store.info("commandstats")["cmdstat_publish"]["calls"] - before
    assert publishes < 3 * len(tasks) / 2, publishes  # batched: far fewer than one a change
    for node in (a, b):
        theirs = [t for t in tasks if owner[t] is not node]

        def complete(node: Node = node, theirs: list[str] = theirs) -> bool:
            got = {(c.task_id, c.seq) for c in node.received}
            return all((t, s) in got for t in theirs for s in (1, 2, 3))

        await wait_for(complete, timeout=5)
    ring = store.hgetall(state_key(tasks[0]))
    assert ring[b"seq"] == b"3" and len([k for k in ring if k.startswith(b"r")]) == 3


async def test_a_follower_that_missed_a_message_reads_the_stored_state(
    nodes: Any, redis_url: str
) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    await a.backend.interest("t3", True)
    await b.backend.interest("t3", True)
    owner, follower = (a, b) if await a.backend.acquire("t3") else (b, a)
    assert await owner.backend.store(Change("t3", 10, {"status": "running", "progress": 0.1}))
    await wait_for(lambda: any(c.seq == 10 for c in follower.received), timeout=5)
    # Seq 11 is stored but its message never reaches the follower (lost with a broken
    # connection, say): written as the owner's store writes it, without the publish.
    store = redis_sync.Redis.from_url(redis_url)
    state_11 = {"status": "running", "progress": 0.2}
    store.hset(state_key("t3"), mapping={"seq": 11, "r11": dumps([11, state_11])})
    state_12 = {"status": "running", "progress": 0.3}
    assert await owner.backend.store(Change("t3", 12, state_12, {"progress": 0.3}))
    # The patch for 12 does not follow 10: the follower reads what is stored instead.
    await wait_for(lambda: any(c.seq == 12 and c.state is not None for c in follower.received))
    resynced = next(c for c in follower.received if c.seq == 12 and c.state is not None)
    assert resynced.state == state_12
    assert (11, state_11) in resynced.history


async def test_a_patch_the_hub_cannot_apply_is_replaced_by_the_stored_state(nodes: Any) -> None:
    a = nodes()
    b = nodes(refuse_patches=True)
    await asyncio.gather(a.ready(), b.ready())
    await a.backend.interest("t4", True)
    assert await a.backend.acquire("t4")  # the only node watching: it polls
    await b.backend.interest("t4", True)
    assert await a.backend.store(Change("t4", 1, {"progress": 0.1}))
    await wait_for(lambda: any(c.seq == 1 for c in b.received))
    assert await a.backend.store(Change("t4", 2, {"progress": 0.2}, {"progress": 0.2}))
    await wait_for(lambda: any(c.seq == 2 and c.state is not None for c in b.received))
    assert [c.state for c in b.received if c.seq == 2][-1] == {"progress": 0.2}


async def test_a_relay_that_cannot_reach_redis_says_so_in_its_log_and_to_subscribers(
    make_relay: RelayFactory,
    upstream: SimulatedUpstream,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.cluster")
    nowhere = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    relay = make_relay(redis_url=nowhere, lease_ttl=LEASE_TTL)
    task_id = upstream.start_task(queue=5, duration=5)
    started = time.monotonic()
    async for event in sse_events(http, f"{relay.url}/v1/tasks/{task_id}/events"):
        assert event.event == "error", event
        data = event.data if isinstance(event.data, dict) else json.loads(event.data)
        assert data["code"] == "cluster_unavailable" and data["retrying"] is True
        break
    assert time.monotonic() - started < 5
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.cluster"]
    assert any("cannot reach Redis at redis://:***@127.0.0.1" in line for line in lines), lines
    assert not any("hunter2" in line for line in lines)


async def test_subscribers_of_a_node_cut_off_from_redis_are_told_and_then_carry_on(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    server = RedisServer().start()
    try:
        relay = make_relay(redis_url=server.url, lease_ttl=LEASE_TTL)
        task_id = upstream.start_task(queue=0.2, duration=30)
        events = sse_events(http, f"{relay.url}/v1/tasks/{task_id}/events")
        first = await anext(events)
        assert first.event == "snapshot", first
        server.stop()
        started = time.monotonic()
        async for event in events:
            if event.event == "error":
                data = event.data if isinstance(event.data, dict) else json.loads(event.data)
                assert data["code"] == "cluster_unavailable" and data["retrying"] is True
                break
        assert time.monotonic() - started < LEASE_TTL * 6
        # Redis is back (on the same port): the stream carries on with new states.
        server.start()
        async for event in events:
            if event.event in ("patch", "snapshot"):
                break
        await events.aclose()
    finally:
        server.stop()


async def test_a_holder_whose_heartbeat_lapsed_gives_up_a_lease_taken_meanwhile(
    nodes: Any,
) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    await a.backend.interest("t5", True)
    assert await a.backend.acquire("t5")
    await b.backend.interest("t5", True)
    a.backend._tasks[1].cancel()  # A's ticker stalls (Redis paused, a busy loop): no beat
    await asyncio.sleep(LEASE_TTL * 1.5)
    while not await b.backend.acquire("t5"):  # B takes the lease of a node that stopped
        await asyncio.sleep(0.05)
    a.backend._tasks[1] = asyncio.create_task(a.backend._tick_forever())  # A beats again
    await wait_for(lambda: a.backend.healthy, timeout=5)
    # What poll_task asks after its "not healthy" turn, and between two polls:
    assert not await a.backend.acquire("t5"), "two nodes would poll the task"
    assert not await a.backend.renew("t5")
    assert a.backend.leases == set()


async def test_release_frees_a_lease_the_node_kept_through_an_outage(
    nodes: Any,
) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    await a.backend.interest("t6", True)
    assert await a.backend.acquire("t6")
    a.backend._beat_at = -math.inf  # as if Redis had not answered for a lease period
    assert not await a.backend.renew("t6")  # the loop stops polling...
    await a.backend.release("t6")  # ...and, ending, lets the lease go whatever it believed
    await a.backend.interest("t6", False)
    await b.backend.interest("t6", True)
    assert await b.backend.acquire("t6")


async def test_a_stored_sequence_number_never_goes_back(nodes: Any, redis_url: str) -> None:
    a = nodes()
    await a.ready()
    await a.backend.interest("t7", True)
    assert await a.backend.acquire("t7")
    assert await a.backend.store(Change("t7", 105, {"progress": 0.5}))
    assert not await a.backend.store(Change("t7", 42, {"progress": 0.1}))
    store = redis_sync.Redis.from_url(redis_url)
    assert store.hget(state_key("t7"), "seq") == b"105"


async def test_a_change_a_node_cannot_read_leaves_its_listener_running(
    nodes: Any, redis_url: str
) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    for node in (a, b):
        await node.backend.interest("t8", True)
    assert await a.backend.acquire("t8")
    store = redis_sync.Redis.from_url(redis_url)
    newer = {"t": "t8", "e": {"code": "a_code_of_a_newer_version", "message": "?"}}
    store.publish(CHANNEL, dumps({"n": "newer-node", "c": [newer]}))
    assert await a.backend.store(Change("t8", 1, {"progress": 0.1}))
    await wait_for(lambda: any(c.seq == 1 for c in b.received), timeout=5)
    assert b.backend.healthy


async def test_a_follower_forgets_the_holder_of_a_task_it_stopped_watching(nodes: Any) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    tasks = [f"w{n}" for n in range(20)]
    for task_id in tasks:
        await a.backend.interest(task_id, True)
        assert await a.backend.acquire(task_id)
        await b.backend.interest(task_id, True)
        assert not await b.backend.acquire(task_id)
    assert len(b.backend._holders) == len(tasks)
    for task_id in tasks:
        await b.backend.interest(task_id, False)
    assert b.backend._holders == {} and b.backend._known == {}
    assert b.backend._interest._written == {}


async def test_a_release_that_does_not_reach_redis_is_sent_again(
    nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = nodes(), nodes()
    await asyncio.gather(a.ready(), b.ready())
    await a.backend.interest("t9", True)
    assert await a.backend.acquire("t9")
    real = a.backend._redis.pipeline
    armed = True

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal armed
        if armed:
            armed = False
            raise redis_exceptions.ConnectionError("Too many connections")
        return real(*args, **kwargs)

    monkeypatch.setattr(a.backend._redis, "pipeline", failing_once)
    await a.backend.release("t9")  # its one round trip fails
    assert not armed and a.backend._to_release == {"t9"}
    await wait_for(lambda: not a.backend._to_release, timeout=5)  # the ticker sent it
    await a.backend.interest("t9", False)  # as its loop does, ending
    await b.backend.interest("t9", True)
    assert await b.backend.acquire("t9"), "a lease left naming a live node is never taken"
