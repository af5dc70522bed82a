"""The `Backend` contract (relay/backend.py), held against every cluster backend alike.

Each test runs twice: on the tests' in-memory cluster (tests/memory_cluster.py, which
test_backend.py runs the real poll loop on) and on `RedisBackend` against a real
redis-server. Both must do what `Backend`'s docstrings say, through its public methods
only, so that the in-memory cluster cannot drift from the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from relay.backend import Backend, Change
from relay.patch import apply_patch
from relay.protocol import HISTORY_SIZE

from .clients import wait_for
from .memory_cluster import MemoryStore

LEASE_TTL = 0.5
CLOSE_LIMIT = 5.0


def state(seq: int) -> dict[str, Any]:
    return {"taskId": "t", "status": "running", "progress": seq / 100}


@dataclass
class Node:
    """One node of the cluster under test, and every change delivered to it."""

    backend: Backend
    received: list[Change] = field(default_factory=list)
    closed: bool = False

    def crash(self) -> None:
        """Stop as a killed process stops: no heartbeat, no messages, nothing released."""
        self.closed = True
        crash = getattr(self.backend, "crash", None)
        if crash is not None:
            crash()  # the in-memory cluster's node
        else:
            for task in self.backend._tasks:  # type: ignore[attr-defined]
                task.cancel()  # RedisBackend's ticker and listener

    async def close(self) -> None:
        """`Backend.close`, which must return: a node that stops is waited for."""
        if not self.closed:
            self.closed = True
            try:
                await asyncio.wait_for(self.backend.close(), CLOSE_LIMIT)
            except TimeoutError:
                pytest.fail(f"{self.backend!r}.close() did not return in {CLOSE_LIMIT} s")


NewNode = Callable[[], Backend]


class Cluster:
    """Makes started nodes of one cluster, and closes them all at the end."""

    def __init__(self, new_node: NewNode) -> None:
        self.new_node = new_node
        self.nodes: list[Node] = []

    async def node(self) -> Node:
        node = Node(self.new_node())
        node.backend.start(node.received.append)
        self.nodes.append(node)
        await wait_for(lambda: node.backend.healthy, timeout=5)
        return node

    async def nodes_of(self, count: int) -> list[Node]:
        return [await self.node() for _ in range(count)]

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()


@pytest.fixture(params=["memory", "redis"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    if request.param == "memory":
        store = MemoryStore()
        names = iter(range(1000))
        made = Cluster(lambda: store.node(f"node-{next(names)}", LEASE_TTL))
    else:
        from relay.cluster import RedisBackend
        from relay.metrics import Metrics

        url = request.getfixturevalue("redis_url")
        made = Cluster(lambda: RedisBackend(url, LEASE_TTL, Metrics()))
    yield made
    await made.close()


async def settle() -> None:
    """Long enough for a published change to reach every node that will get it."""
    await asyncio.sleep(0.2)


def seen(change: Change) -> tuple[Any, ...]:
    return (change.task_id, change.seq, change.state, change.patch, change.error, change.final)


def delivered(received: list[Change]) -> list[tuple[Any, ...]]:
    """What a node was given, each patch with the state it leads to: a backend may send a
    change that has a patch as its patch alone, for the receiver to apply."""
    states: dict[tuple[str, int], dict[str, Any]] = {}
    out = []
    for change in received:
        if change.state is None and change.patch is not None and change.seq is not None:
            before = states.get((change.task_id, change.seq - 1))
            assert before is not None, "a patch comes only after the state it applies to"
            change = replace(change, state=apply_patch(before, change.patch))
        if change.state is not None and change.seq is not None:
            states[(change.task_id, change.seq)] = change.state
        out.append(seen(change))
    return out


# -- the lease: one node at a time polls a task -------------------------------------------------


async def test_one_node_at_a_time_holds_a_task(cluster: Cluster) -> None:
    a, b = await cluster.nodes_of(2)
    assert await a.backend.acquire("t")
    assert not await b.backend.acquire("t")
    assert await a.backend.acquire("t"), "acquiring what it holds keeps it"
    assert await a.backend.renew("t")
    assert not await b.backend.acquire("t")


async def test_release_frees_the_task_for_another_node(cluster: Cluster) -> None:
    a, b = await cluster.nodes_of(2)
    assert await a.backend.acquire("t")
    await a.backend.release("t")
    assert await b.backend.acquire("t")
    assert not await a.backend.renew("t"), "released is lost"


async def test_only_the_holder_releases_a_task(cluster: Cluster) -> None:
    a, b, c = await cluster.nodes_of(3)
    assert await a.backend.acquire("t")
    await b.backend.release("t")
    assert not await c.backend.acquire("t")
    assert await a.backend.renew("t")


async def test_renewing_every_check_interval_keeps_a_task(cluster: Cluster) -> None:
    a, b = await cluster.nodes_of(2)
    interval = a.backend.check_interval
    assert 0 < interval < LEASE_TTL
    assert await a.backend.acquire("t")
    for _ in range(round(3 * LEASE_TTL / interval)):
        await asyncio.sleep(interval)
        assert await a.backend.renew("t")
        assert not await b.backend.acquire("t")


async def test_a_live_holder_keeps_its_lease_without_a_call(cluster: Cluster) -> None:
    a, b = await cluster.nodes_of(2)
    assert await a.backend.acquire("t")
    await asyncio.sleep(LEASE_TTL * 3)  # no renew(), no store(): the node lives on
    assert not await b.backend.acquire("t")
    assert await a.backend.store(Change("t", 1, state(1)))


async def test_a_dead_holders_lease_is_taken_over_and_its_store_refused(cluster: Cluster) -> None:
    a, b, reader = await cluster.nodes_of(3)
    assert await a.backend.acquire("t")
    a.crash()
    await asyncio.sleep(LEASE_TTL * 1.3)
    deadline = asyncio.get_running_loop().time() + LEASE_TTL * 2
    while not await b.backend.acquire("t"):
        assert asyncio.get_running_loop().time() < deadline, "a dead holder's lease is free"
        await asyncio.sleep(0.05)
    assert not await a.backend.renew("t")
    assert not await a.backend.store(Change("t", 1, state(1)))
    assert await reader.backend.load("t") is None


async def test_keep_lease_holds_a_task_through_a_call_longer_than_the_lease(
    cluster: Cluster,
) -> None:
    a, b = await cluster.nodes_of(2)
    assert await a.backend.acquire("t")
    async with a.backend.keep_lease("t"):
        await asyncio.sleep(LEASE_TTL * 2.5)  # an upstream call
        assert not await b.backend.acquire("t")
    assert await a.backend.store(Change("t", 1, state(1)))


async def test_close_gives_up_every_lease_and_stops_delivering(cluster: Cluster) -> None:
    a, b = await cluster.nodes_of(2)
    assert await a.backend.acquire("t1") and await a.backend.acquire("t2")
    await a.close()
    assert await b.backend.acquire("t1") and await b.backend.acquire("t2")
    assert await b.backend.store(Change("t1", 1, state(1)))
    await settle()
    assert a.received == []


# -- the store: fenced by the lease, told to every other node -----------------------------------


async def test_only_the_holder_stores_and_is_heard(cluster: Cluster) -> None:
    a, b, reader = await cluster.nodes_of(3)
    assert await a.backend.acquire("t")
    assert not await b.backend.store(Change("t", 1, state(1)))
    await settle()
    assert await reader.backend.load("t") is None
    assert a.received == reader.received == [], "a refused store tells no one"
    assert await a.backend.store(Change("t", 2, state(2)))
    loaded = await reader.backend.load("t")
    assert loaded is not None and (loaded.seq, loaded.state) == (2, state(2))


async def test_each_stored_change_reaches_every_other_node_once(cluster: Cluster) -> None:
    a, b, c = await cluster.nodes_of(3)
    assert await a.backend.acquire("t")
    changes = [
        Change("t", 1, state(1)),
        Change("t", 2, state(2), patch={"progress": 0.02}),
        Change("t", error={"code": "upstream_unavailable", "message": "down; retrying"}),
        Change("t", error={"code": "task_not_found", "message": "gone"}, final=True),
    ]
    for change in changes:
        assert await a.backend.store(change)
    await wait_for(lambda: len(b.received) == len(c.received) == len(changes), timeout=5)
    await settle()
    for node in (b, c):
        assert delivered(node.received) == [seen(c) for c in changes]
    assert a.received == [], "a node is not told its own changes"


async def test_load_gives_the_last_state_with_its_history_oldest_first(
    cluster: Cluster,
) -> None:
    a, reader = await cluster.nodes_of(2)
    assert await reader.backend.load("t") is None, "nothing stored"
    assert await a.backend.acquire("t")
    last = HISTORY_SIZE + 6
    for seq in range(1, last + 1):
        assert await a.backend.store(Change("t", seq, state(seq)))
    loaded = await reader.backend.load("t")
    assert loaded is not None
    assert (loaded.task_id, loaded.seq, loaded.state) == ("t", last, state(last))
    assert (loaded.error, loaded.final, loaded.ended) == (None, False, False)
    expected = [(seq, state(seq)) for seq in range(last - HISTORY_SIZE + 1, last + 1)]
    assert [(seq, old) for seq, old in loaded.history] == expected


async def test_a_final_error_is_stored_beside_the_state_and_a_passing_one_is_not(
    cluster: Cluster,
) -> None:
    a, reader = await cluster.nodes_of(2)
    assert await a.backend.acquire("t")
    assert await a.backend.store(Change("t", 1, state(1)))
    outage = {"code": "upstream_unavailable", "message": "down; retrying"}
    assert await a.backend.store(Change("t", error=outage))
    loaded = await reader.backend.load("t")
    assert loaded is not None and loaded.error is None and not loaded.final
    final = {"code": "unauthorized", "message": "refused"}
    assert await a.backend.store(Change("t", error=final, final=True))
    loaded = await reader.backend.load("t")
    assert loaded is not None
    assert (loaded.error, loaded.final, loaded.ended) == (final, True, True)
    assert (loaded.seq, loaded.state) == (1, state(1))


async def test_a_task_unknown_upstream_is_stored_without_a_state(cluster: Cluster) -> None:
    a, reader = await cluster.nodes_of(2)
    assert await a.backend.acquire("t")
    final = {"code": "task_not_found", "message": "gone"}
    assert await a.backend.store(Change("t", error=final, final=True))
    loaded = await reader.backend.load("t")
    assert loaded is not None
    assert (loaded.seq, loaded.state, loaded.error, loaded.final) == (None, None, final, True)


# -- interest: which nodes want a task ----------------------------------------------------------


async def test_interest_counts_the_nodes_that_want_a_task(cluster: Cluster) -> None:
    a, b = await cluster.nodes_of(2)
    assert await a.backend.interest("t", True) == 1
    assert await b.backend.interest("t", True) == 2
    assert await a.backend.interest("t", False) == 1
    assert await b.backend.interest("t", False) == 0
    assert await a.backend.interest("other", False) == 0


async def test_interest_not_said_again_lapses(cluster: Cluster) -> None:
    a, b = await cluster.nodes_of(2)
    assert await a.backend.interest("t", True) == 1
    assert await b.backend.interest("t", True) == 2
    b.crash()  # b says nothing more, as a dead node would
    await asyncio.sleep(LEASE_TTL * 3.5)
    assert await a.backend.interest("t", True) == 1
