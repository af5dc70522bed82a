"""The poll loop's cluster logic, node by node, on an in-memory cluster: no sockets, no Redis.

Each node is a real `Hub` running the real `poll_task` over a `MemoryBackend`; the
upstream is the simulator, reached in-process. The Redis backend itself is tested
against a real redis-server in test_cluster.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from relay.backend import Change, LocalBackend
from relay.hub import Hub, TaskHub
from relay.poll_loop import LoopSignal, PollPolicy, poll_task
from relay.protocol import Event
from relay.signing import NoSigner
from relay.simulator import Simulator
from relay.subscriber import Subscriber
from relay.upstream import UpstreamClient, make_http_client

from .clients import wait_for
from .memory_cluster import MemoryBackend, MemoryStore

POLICY = PollPolicy(interval=0.05, backoff_base=0.05, backoff_max=0.2, jitter=0.0)


class Node:
    """One relay of the cluster: a hub whose loops poll through its own backend."""

    def __init__(
        self, name: str, backend: MemoryBackend | LocalBackend, simulator: Simulator
    ) -> None:
        self.backend = backend
        transport = httpx.ASGITransport(app=simulator.app)
        self.http = make_http_client(5.0, 8, transport=transport)
        upstream = UpstreamClient(self.http, "http://simulator.invalid", NoSigner(name), 8)

        async def poll(task: TaskHub, signal: LoopSignal) -> None:
            await poll_task(task, signal, backend, upstream, POLICY)

        self.hub = Hub(poll, linger=0.1, ended_ttl=5.0)
        backend.start(self.hub.receive)

    async def close(self) -> None:
        await self.hub.close()
        await self.backend.close()
        await self.http.aclose()


class Follower:
    """A subscriber on one node that keeps every event it is sent."""

    def __init__(self, node: Node, task_id: str) -> None:
        self.subscriber = Subscriber("test")
        self.cursor = node.hub.subscribe(task_id, self.subscriber)
        self.events: list[Event] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while not self.cursor.done:
            for cursor in await self.subscriber.changed():
                self.events.extend(cursor.pending())

    async def ended(self, timeout: float = 10) -> str:
        await asyncio.wait_for(self._reader, timeout)
        return str(self.events[-1].data.get("status"))

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events if e.kind in ("snapshot", "patch") and e.seq]


@pytest.fixture
async def cluster() -> AsyncIterator[Callable[[int], list[Node]]]:
    simulator = Simulator(fail_rate=0.0)
    store = MemoryStore()
    nodes: list[Node] = []

    def start(count: int) -> list[Node]:
        for n in range(len(nodes), len(nodes) + count):
            nodes.append(Node(f"node-{n}", store.node(f"node-{n}"), simulator))
        return nodes[-count:]

    start.simulator = simulator  # type: ignore[attr-defined]
    start.store = store  # type: ignore[attr-defined]
    yield start
    for node in nodes:
        await node.close()


async def test_subscribers_on_three_nodes_share_one_loop_in_the_cluster(cluster) -> None:  # type: ignore[no-untyped-def]
    nodes = cluster(3)
    simulator: Simulator = cluster.simulator
    task_id = simulator.start_task(queue=0.1, duration=0.5).task_id
    followers = [Follower(node, task_id) for node in nodes for _ in range(3)]
    assert {await f.ended() for f in followers} == {"succeeded"}
    assert simulator.handovers[task_id] == 0, "more than one node polled the task"
    finals = {f.seqs[-1] for f in followers}
    assert len(finals) == 1, "the nodes numbered the states differently"
    await wait_for(lambda: all(node.hub.loop_count == 0 for node in nodes))


async def test_a_crashed_polling_node_is_taken_over_without_a_gap(cluster) -> None:  # type: ignore[no-untyped-def]
    first, second = cluster(2)
    simulator: Simulator = cluster.simulator
    store: MemoryStore = cluster.store
    task_id = simulator.start_task(queue=0.1, duration=1.5).task_id
    Follower(first, task_id)
    await wait_for(lambda: store.holder(task_id) == "node-0")
    watcher = Follower(second, task_id)
    await asyncio.sleep(0.3)
    first.backend.crash()  # type: ignore[union-attr]
    assert await watcher.ended() == "succeeded"
    assert store.holder(task_id) in (None, "node-1")
    assert simulator.last_caller[task_id] == "node-1"
    assert all(b == a + 1 for a, b in itertools.pairwise(watcher.seqs)), watcher.seqs


async def test_a_node_that_lost_its_lease_stores_nothing() -> None:
    store = MemoryStore()
    backend = store.node("late", lease_ttl=0.05)
    assert await backend.acquire("t")
    await asyncio.sleep(0.1)
    assert await store.node("other").acquire("t")
    assert not await backend.renew("t")
    assert not await backend.store(Change("t", 1, {"status": "running"}))
    assert "t" not in store.stored


async def test_the_owner_polls_on_for_other_nodes_after_its_own_subscribers_leave(cluster) -> None:  # type: ignore[no-untyped-def]
    owner, other = cluster(2)
    simulator: Simulator = cluster.simulator
    store: MemoryStore = cluster.store
    task_id = simulator.start_task(queue=0.1, duration=1.0).task_id
    leaving = Follower(owner, task_id)
    await wait_for(lambda: store.holder(task_id) == "node-0")
    staying = Follower(other, task_id)
    owner.hub.unsubscribe(leaving.cursor)
    assert await staying.ended() == "succeeded"
    assert simulator.handovers[task_id] == 0, "the lease changed hands"


async def test_a_lone_relay_stops_polling_after_the_linger() -> None:
    simulator = Simulator(fail_rate=0.0)
    node = Node("alone", LocalBackend(), simulator)
    try:
        task_id = simulator.start_task(queue=5, duration=5).task_id
        follower = Follower(node, task_id)
        await wait_for(lambda: simulator.calls[task_id] > 0)
        node.hub.unsubscribe(follower.cursor)
        await wait_for(lambda: node.hub.loop_count == 0, timeout=2)
        calls = simulator.calls[task_id]
        await asyncio.sleep(0.2)
        assert simulator.calls[task_id] == calls
    finally:
        await node.close()
