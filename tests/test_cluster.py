"""Cluster mode: three relay processes on one real redis-server, one poll loop per task."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from .clients import Watcher, wait_for, watch_sse, watch_ws
from .conftest import SimulatedUpstream
from .servers import ProcessServer, free_port

LEASE_TTL = 1.0
SECRET = {"RELAY_ACCESS_KEY_SECRET": "cluster-test-secret"}
POLL = 0.1


class RedisServer:
    """A throwaway redis-server on a free port, keeping nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis: RELAY_TEST_REDIS_URL when given, else a redis-server started here."""
    given = os.environ.get("RELAY_TEST_REDIS_URL")
    if given:
        import redis as redis_sync

        redis_sync.Redis.from_url(given).flushdb()
        yield given
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer().start()
    yield server.url
    server.stop()


def start_nodes(count: int, redis: str, upstream: str, *extra: str) -> list[ProcessServer]:
    args = [
        "serve",
        "--upstream",
        upstream,
        "--redis",
        redis,
        "--poll-interval",
        str(POLL),
        "--lease-ttl",
        str(LEASE_TTL),
        "--linger",
        "0.5",
        *extra,
    ]
    # Each node calls the upstream with its own AccessKey ID, so the simulator can tell
    # which node polled a task.
    return [
        ProcessServer(args, env={"RELAY_ACCESS_KEY_ID": f"node-{n}", **SECRET}).start()
        for n in range(count)
    ]


@pytest.fixture
def nodes_factory() -> Iterator[Any]:
    started: list[ProcessServer] = []

    def start(count: int, redis: str, upstream: str, *extra: str) -> list[ProcessServer]:
        nodes = start_nodes(count, redis, upstream, *extra)
        started.extend(nodes)
        return nodes

    yield start
    for node in started:
        node.stop()


async def metric(http: httpx.AsyncClient, node: ProcessServer, name: str) -> float:
    text = (await http.get(f"{node.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def consecutive(watcher: Watcher) -> bool:
    seqs = [seq for kind, _, seq in watcher.events if kind in ("snapshot", "patch")]
    return all(b == a + 1 for a, b in itertools.pairwise(seqs))


async def test_ninety_subscribers_on_three_nodes_cost_one_loop(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    nodes = nodes_factory(3, redis_url, upstream.url)
    # Side by side, so that both loops run on an equally busy machine.
    alone = upstream.start_task(queue=0.2, duration=2.0)
    crowded = upstream.start_task(queue=0.2, duration=2.0)
    single, *watchers = await asyncio.gather(
        watch_sse(http, nodes[0].url, alone),
        *[watch_sse(http, node.url, crowded) for node in nodes for _ in range(15)],
        *[watch_ws(node.ws_url, crowded) for node in nodes for _ in range(15)],
    )
    assert single.ended == "succeeded"
    final = upstream.final_state(crowded)
    assert len(watchers) == 90
    assert all(w.ended == "succeeded" and w.state == final for w in watchers)
    assert abs(upstream.calls(crowded) - upstream.calls(alone)) <= 1
    # One node polled it: every call came with the same node's AccessKey ID.
    assert upstream.simulator.handovers[crowded] == 0
    assert upstream.simulator.last_caller[crowded].startswith("node-")


async def test_fifty_tasks_are_each_polled_by_one_node(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    nodes = nodes_factory(3, redis_url, upstream.url)
    tasks = [upstream.start_task(queue=0.2, duration=3.0) for _ in range(50)]
    sockets = [await websockets.connect(f"{node.ws_url}/v1/ws") for node in nodes]
    try:
        for n, task_id in enumerate(tasks):
            for ws in (sockets[n % 3], sockets[(n + 1) % 3]):
                await ws.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        peak = 0.0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            held = sum([await metric(http, node, "relay_leases_held") for node in nodes])
            peak = max(peak, held)
            assert held <= len(tasks)
            await asyncio.sleep(0.2)
        assert peak >= len(tasks) * 0.9, peak
    finally:
        for ws in sockets:
            await ws.close()
    # One loop each: no task was polled more than one loop's worth, and no two nodes
    # polled one task by turns (a lease changes hands at most once, never back and forth).
    for task_id in tasks:
        assert upstream.calls(task_id) <= 3.2 / POLL + 3, upstream.calls(task_id)
        assert upstream.simulator.handovers[task_id] <= 1, task_id


async def test_an_upstream_slower_than_the_lease_keeps_one_poller_and_delivers(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    """Each call outlasts the lease: the owner renews it during the call, nobody else polls."""
    upstream.simulator.faults.latency = LEASE_TTL * 1.5
    nodes = nodes_factory(2, redis_url, upstream.url, "--request-timeout", "5")
    task_id = upstream.start_task(queue=0.0, duration=5.0)
    watching = asyncio.gather(*[watch_sse(http, node.url, task_id) for node in nodes])
    watchers = await asyncio.wait_for(watching, 30)
    final = upstream.final_state(task_id)
    assert all(w.ended == "succeeded" and w.state == final for w in watchers)
    assert all(consecutive(w) for w in watchers)
    assert upstream.simulator.handovers[task_id] == 0


async def test_polling_follows_interest_on_any_node(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    a, b = nodes_factory(2, redis_url, upstream.url)
    task_id = upstream.start_task(queue=0, duration=60)
    on_a = await websockets.connect(f"{a.ws_url}/v1/ws")
    await on_a.send(json.dumps({"type": "subscribe", "taskId": task_id}))
    await on_a.recv()
    await wait_for(lambda: upstream.calls(task_id) > 0)
    async with websockets.connect(f"{b.ws_url}/v1/ws") as on_b:
        await on_b.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        await on_b.recv()
        await on_a.close()  # A's subscribers leave; B's remain
        await asyncio.sleep(1.5)
        before = upstream.calls(task_id)
        await asyncio.sleep(1.0)
        assert upstream.calls(task_id) - before >= 5, "polling must go on for B"
    # Everyone left: after the linger (and a lease period) the cluster stops polling.
    await asyncio.sleep(0.5 + LEASE_TTL * 2)
    before = upstream.calls(task_id)
    await asyncio.sleep(1.0)
    assert upstream.calls(task_id) == before
    assert sum([await metric(http, node, "relay_leases_held") for node in (a, b)]) == 0


async def test_killing_the_polling_node_hands_the_task_over_without_a_gap(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    nodes = nodes_factory(3, redis_url, upstream.url)
    task_id = upstream.start_task(queue=0.2, duration=6.0)
    watchers = [asyncio.create_task(watch_ws(node.ws_url, task_id)) for node in nodes]
    owner: ProcessServer | None = None
    async with asyncio.timeout(10):
        while owner is None:
            for node in nodes:
                if await metric(http, node, "relay_leases_held") == 1:
                    owner = node
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    owner.kill()
    killed_at = time.monotonic()
    survivors = [n for n in nodes if n is not owner]
    taken_over_after = None
    async with asyncio.timeout(10):
        while taken_over_after is None:
            for node in survivors:
                if await metric(http, node, "relay_leases_held") == 1:
                    taken_over_after = time.monotonic() - killed_at
            await asyncio.sleep(0.05)
    assert taken_over_after <= LEASE_TTL * 2 + 0.5, taken_over_after
    results = await asyncio.gather(*watchers, return_exceptions=True)
    survived = [r for r, node in zip(results, nodes, strict=True) if node is not owner]
    final = upstream.final_state(task_id)
    for watcher in survived:
        assert isinstance(watcher, Watcher)
        assert watcher.ended == "succeeded" and watcher.state == final
        assert consecutive(watcher), [seq for _, _, seq in watcher.events]
    print(f"takeover after {taken_over_after:.2f} s")


async def test_cluster_recovers_from_a_redis_restart(
    upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer().start()
    try:
        nodes = nodes_factory(2, server.url, upstream.url)
        task_id = upstream.start_task(queue=0.2, duration=5.0)
        watchers = [asyncio.create_task(watch_sse(http, node.url, task_id)) for node in nodes]
        await wait_for(lambda: upstream.calls(task_id) >= 3)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(5)
        async with asyncio.timeout(10):
            while (await http.get(f"{nodes[0].url}/healthz")).json()["status"] != "degraded":
                await asyncio.sleep(0.1)
        server.start()
        async with asyncio.timeout(10):
            while (await http.get(f"{nodes[0].url}/healthz")).json()["status"] != "ok":
                await asyncio.sleep(0.1)
        final = upstream.final_state(task_id)
        for watcher in await asyncio.gather(*watchers):
            assert watcher.ended == "succeeded" and watcher.state == final
    finally:
        server.stop()


async def test_task_state_on_any_node_comes_from_the_store(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    a, b = nodes_factory(2, redis_url, upstream.url)
    task_id = upstream.start_task(queue=0, duration=30)
    async with websockets.connect(f"{a.ws_url}/v1/ws") as on_a:
        await on_a.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        snapshot = json.loads(await on_a.recv())
        calls = upstream.calls(task_id)
        response = await http.get(f"{b.url}/v1/tasks/{task_id}")
        assert response.status_code == 200
        assert int(response.headers["x-relay-seq"]) >= snapshot["seq"]
        assert response.json()["taskId"] == task_id
        # Answered from Redis: node B made no upstream call of its own.
        assert await metric(http, b, 'relay_upstream_calls_total{outcome="ok"}') == 0
        assert upstream.calls(task_id) - calls <= 3


async def test_every_node_answers_204_to_a_resume_at_an_ended_tasks_last_state(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    watched, never = nodes_factory(2, redis_url, upstream.url)
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    watcher = await watch_sse(http, watched.url, task_id)
    assert watcher.ended == "succeeded" and watcher.seq is not None
    last = str(watcher.seq)
    for node in (watched, never):
        single = await http.get(
            f"{node.url}/v1/tasks/{task_id}/events", headers={"Last-Event-ID": last}
        )
        assert single.status_code == 204, (node.url, single.text)
        many = await http.get(
            f"{node.url}/v1/events?taskId={task_id}", headers={"Last-Event-ID": f"{task_id}:{last}"}
        )
        assert many.status_code == 204, (node.url, many.text)
        state = await http.get(f"{node.url}/v1/tasks/{task_id}")
        assert state.headers["X-Relay-Seq"] == last
        assert state.json() == watcher.state
