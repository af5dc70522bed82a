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
from relay.cluster.placement import SETTLE_LEASE_PERIODS, preferred
from relay.hub import Hub, LoopSignal, TaskHub
from relay.poll_loop import PollPolicy, poll_task
from relay.protocol import Event
from relay.simulator import Simulator
from relay.subscriber import Subscriber
from relay.upstream import UpstreamClient, make_http_client
from relay.upstream.signing import NoSigner

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


# -- spreading the leases (relay/cluster/placement.py) --------------------------------------


def test_rendezvous_choice_spreads_tasks_and_a_node_moves_only_its_share() -> None:
    tasks = [f"task-{n}" for n in range(3000)]
    three = {t: preferred(t, ["a", "b", "c"]) for t in tasks}
    shares = {node: sum(1 for c in three.values() if c == node) for node in "abc"}
    assert all(900 <= share <= 1100 for share in shares.values()), shares
    # "c" leaves: only its tasks move, split between the others.
    two = {t: preferred(t, ["a", "b"]) for t in tasks}
    assert all(two[t] == three[t] for t in tasks if three[t] != "c")
    moved = [two[t] for t in tasks if three[t] == "c"]
    assert 0.4 < moved.count("a") / len(moved) < 0.6
    # "d" joins: the only tasks that move are those that go to it.
    four = {t: preferred(t, ["a", "b", "c", "d"]) for t in tasks}
    assert all(four[t] in (three[t], "d") for t in tasks)
    assert 600 <= sum(1 for t in tasks if four[t] == "d") <= 900


class Turns:
    """What each node's poll loops do with the lease between two polls, for many tasks
    at once: record interest, renew a held lease (or hand it over), or try to take it."""

    def __init__(self, store: MemoryStore, tasks: list[str]) -> None:
        self.store = store
        self.tasks = tasks
        self.nodes: list[MemoryBackend] = []
        self.owns: dict[tuple[str, str], bool] = {}

    def join(self, backend: MemoryBackend) -> None:
        self.nodes.append(backend)

    async def run(self, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            for node in self.nodes:
                if node.crashed:
                    continue
                for task_id in self.tasks:
                    key = (node.node_id, task_id)
                    await node.interest(task_id, True)
                    if self.owns.get(key):
                        self.owns[key] = await node.renew(task_id)
                    else:
                        self.owns[key] = await node.acquire(task_id)
            # One poll loop per task: no two running nodes believe they poll it.
            for task_id in self.tasks:
                pollers = [
                    n for n in self.nodes if not n.crashed and self.owns.get((n.node_id, task_id))
                ]
                assert len(pollers) <= 1, (task_id, [n.node_id for n in pollers])
            await asyncio.sleep(self.nodes[0].check_interval / 2)

    def holders(self) -> dict[str, str | None]:
        return {task_id: self.store.holder(task_id) for task_id in self.tasks}


async def test_leases_spread_over_the_nodes_watching_and_move_only_a_nodes_share() -> None:
    lease_ttl = 0.2
    settle = SETTLE_LEASE_PERIODS * lease_ttl
    store = MemoryStore()
    tasks = [f"task-{n}" for n in range(300)]
    turns = Turns(store, tasks)
    first = store.node("node-0", lease_ttl)
    turns.join(first)
    await turns.run(0.1)
    # Alone, node-0 takes every task at once: nobody else watches them.
    assert store.held() == {"node-0": 300}
    for name in ("node-1", "node-2"):
        turns.join(store.node(name, lease_ttl))
    await turns.run(settle / 2)
    assert store.held() == {"node-0": 300}, "a held lease moved before the settle time"
    await turns.run(settle / 2 + 0.5)
    names = ["node-0", "node-1", "node-2"]
    assert turns.holders() == {t: preferred(t, names) for t in tasks}
    assert all(75 <= held <= 125 for held in store.held().values()), store.held()

    # node-1 dies: its share is split between the survivors, whose own tasks stay.
    before = turns.holders()
    turns.nodes[1].crash()
    await turns.run(lease_ttl * 3)
    after = turns.holders()
    assert all(after[t] == before[t] for t in tasks if before[t] != "node-1")
    moved = [after[t] for t in tasks if before[t] == "node-1"]
    assert all(holder in ("node-0", "node-2") for holder in moved)
    assert moved.count("node-0") >= len(moved) / 4 and moved.count("node-2") >= len(moved) / 4

    # node-3 joins: after the settle time it holds its share, and nothing else moved.
    turns.join(store.node("node-3", lease_ttl))
    await turns.run(settle + 0.5)
    final = turns.holders()
    names = ["node-0", "node-2", "node-3"]
    assert final == {t: preferred(t, names) for t in tasks}
    assert all(final[t] in (after[t], "node-3") for t in tasks)


async def test_a_free_lease_is_left_to_the_preferred_watcher_but_a_lone_watcher_takes_it() -> None:
    store = MemoryStore()
    lease_ttl = 0.3
    a, b = store.node("a", lease_ttl), store.node("b", lease_ttl)
    task_id = next(t for t in (f"t{n}" for n in range(100)) if preferred(t, ["a", "b"]) == "b")
    # Only "a" watches: it takes the lease at once, although "b" would be preferred.
    await a.interest(task_id, True)
    assert await a.acquire(task_id)
    await a.release(task_id)
    # Both watch: "a" leaves the free lease to "b", which takes it.
    await b.interest(task_id, True)
    await a.interest(task_id, True)
    assert not await a.acquire(task_id)
    assert await b.acquire(task_id)
    await b.release(task_id)
    # "b" watches but never takes it: after the grace period "a" polls after all.
    assert not await a.acquire(task_id)
    await asyncio.sleep(a.placement.grace + 0.05)
    await b.interest(task_id, True)
    await a.interest(task_id, True)
    assert await a.acquire(task_id)


async def test_a_loop_that_ends_during_an_outage_releases_the_lease_it_held(cluster) -> None:  # type: ignore[no-untyped-def]
    (node,) = cluster(1)
    simulator: Simulator = cluster.simulator
    store: MemoryStore = cluster.store
    task_id = simulator.start_task(queue=5, duration=5).task_id
    follower = Follower(node, task_id)
    await wait_for(lambda: store.holder(task_id) == "node-0")
    node.backend.healthy = False  # type: ignore[misc]  # the node cannot reach the cluster

    def told() -> bool:
        return any(
            e.kind == "error" and e.data["code"] == "cluster_unavailable" for e in follower.events
        )

    await wait_for(told)  # its loop took its "not healthy" turn, believing it holds no lease
    follower._reader.cancel()
    node.hub.unsubscribe(follower.cursor)  # the last subscriber leaves meanwhile...
    await asyncio.sleep(0.3)  # ...and its linger runs out before the cluster is back
    node.backend.healthy = True  # type: ignore[misc]
    await wait_for(lambda: node.hub.loop_count == 0)
    assert store.holder(task_id) is None, "a lease left held that nobody polls"
