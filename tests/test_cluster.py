"""Cluster mode: three relay processes on one real redis-server, one poll loop per task."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from relay.cluster.keys import state_key
from relay.cluster.placement import SETTLE_LEASE_PERIODS, preferred

from .clients import Watcher, wait_for, watch_sse, watch_ws
from .conftest import SimulatedUpstream
from .servers import ROOT, ProcessServer, RedisServer

LEASE_TTL = 1.0
SECRET = {"RELAY_ACCESS_KEY_SECRET": "cluster-test-secret"}
POLL = 0.1


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


# -- lease placement: the polling spread over the nodes ---------------------------------------


async def read_seqs(ws: Any, seen: dict[str, list[int]]) -> None:
    """Every state's seq a many-task WebSocket delivers, by task."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") in ("snapshot", "patch"):
                seen[message["taskId"]].append(message["seq"])


async def leases(http: httpx.AsyncClient, nodes: list[ProcessServer]) -> list[int]:
    """The leases each node holds, read from all at once: read one after another, a lease
    handed over between two reads would be counted on both."""
    counts = await asyncio.gather(*(metric(http, node, "relay_leases_held") for node in nodes))
    return [int(count) for count in counts]


def lease_holders(store: Any, tasks: list[str]) -> dict[str, str | None]:
    """Each task's lease holder, as Redis has it (a node ID), or None."""
    values = [store.hget(state_key(task_id), "owner") for task_id in tasks]
    return {t: v.decode() if v else None for t, v in zip(tasks, values, strict=True)}


async def test_three_hundred_tasks_watched_on_three_nodes_are_polled_a_third_each(
    redis_url: str, http: httpx.AsyncClient, nodes_factory: Any
) -> None:
    """Every node watches every task; node 0 saw them first and took every lease. After
    the settle time (ten lease periods) each node polls the tasks it is the rendezvous
    choice for; when one is killed the survivors split its tasks and keep their own,
    and every task's stored sequence runs on without a gap or a repeat."""
    import redis as redis_sync

    store = redis_sync.Redis.from_url(redis_url)
    # The simulator in a process of its own: 300 tasks polled by three nodes would slow
    # this test's own event loop, and the upstream with it.
    simulator = ProcessServer(["simulate", "--fail-rate", "0"]).start("/sim/stats")
    interval, lease_ttl = 5.0, 3.0
    extra = ["--poll-interval", str(interval), "--max-ws-subscriptions", "300"]
    nodes = nodes_factory(3, redis_url, simulator.url, *extra, "--lease-ttl", str(lease_ttl))
    body = {"queue": 0, "duration": 300}
    tasks = []
    for _ in range(300):
        tasks.append((await http.post(f"{simulator.url}/sim/tasks", json=body)).json()["taskId"])

    async def calls() -> dict[str, int]:
        counts = (await http.get(f"{simulator.url}/sim/stats")).json()["calls"]
        return {task_id: counts.get(task_id, 0) for task_id in tasks}

    seen: list[dict[str, list[int]]] = [defaultdict(list) for _ in nodes]
    sockets, readers = [], []
    try:
        for n, node in enumerate(nodes):
            ws = await websockets.connect(f"{node.ws_url}/v1/ws", max_size=None)
            sockets.append(ws)
            readers.append(asyncio.create_task(read_seqs(ws, seen[n])))
            for start in range(0, len(tasks), 50):
                for task_id in tasks[start : start + 50]:
                    await ws.send(json.dumps({"type": "subscribe", "taskId": task_id}))
                await asyncio.sleep(0.2)
            async with asyncio.timeout(60):
                while await metric(http, node, "relay_poll_loops") < len(tasks):
                    await asyncio.sleep(0.2)
            if n == 0:
                # Watched on node 0 alone: it polls them all (a few may be between a late
                # renewal and the next check on a busy machine, as below).
                held = await leases(http, nodes)
                assert held[0] >= len(tasks) - 3 and held[1:] == [0, 0], held
        node_ids = [member.decode() for member in store.zrange("relay:nodes", 0, -1)]
        assert len(node_ids) == 3, node_ids
        choice = {task_id: preferred(task_id, node_ids) for task_id in tasks}
        async with asyncio.timeout(SETTLE_LEASE_PERIODS * lease_ttl + 45):
            while True:
                held = await leases(http, nodes)
                assert sum(held) <= len(tasks), held  # one loop per task, in all
                placed = lease_holders(store, tasks)
                chosen = sum(placed[t] == choice[t] for t in tasks)
                if sum(held) == len(tasks) and chosen >= len(tasks) - 3:
                    break  # every task (a few aside, on a busy machine) with its choice
                await asyncio.sleep(0.25)
        assert all(75 <= h <= 125 for h in held), held
        # Stable: nothing moves back and forth once the leases are spread. (On a busy
        # machine a loop may renew late and lose a lease to the next check: a few.)
        holders = lease_holders(store, tasks)
        before = await calls()
        for _ in range(12):
            await asyncio.sleep(interval / 4)
            held = await leases(http, nodes)
            assert sum(held) >= len(tasks) - 3 and all(75 <= h <= 125 for h in held), held
        print(f"leases held per node after the settle time: {held}")
        now = lease_holders(store, tasks)
        assert sum(now[t] != holders[t] for t in tasks) <= 3
        # One loop per task in all: in three intervals, at most one loop's polls.
        polled = [n - before[t] for t, n in (await calls()).items()]
        assert max(polled) <= 4, sorted(polled)[-10:]

        live = {m.decode() for m in store.zrange("relay:nodes", 0, -1)}
        nodes[2].kill()
        survivors = nodes[:2]
        async with asyncio.timeout(20):
            while sum(await leases(http, survivors)) < len(tasks):
                await asyncio.sleep(0.1)
        after = await leases(http, survivors)
        print(f"after node 2 was killed: {after}")
        assert all(a - h >= held[2] / 4 for a, h in zip(after, held[:2], strict=True)), after
        moved_to = lease_holders(store, tasks)
        survivor_ids = {holder for holder in moved_to.values() if holder}
        assert len(survivor_ids) == 2 and survivor_ids < live, (survivor_ids, live)
        # The survivors kept their own tasks; only the dead node's moved.
        kept = [moved_to[t] == now[t] for t in tasks if now[t] in survivor_ids]
        assert kept.count(False) <= 3, kept.count(False)
        await asyncio.sleep(interval * 2)
    finally:
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
        simulator.stop()
    for task_id in tasks:
        ring = store.hgetall(state_key(task_id))
        stored = sorted(
            (json.loads(entry)[0] for name, entry in ring.items() if name.startswith(b"r")),
            reverse=True,
        )
        assert stored, task_id
        assert stored == list(range(stored[0], stored[0] - len(stored), -1)), (task_id, stored)
    for n in (0, 1):
        for task_id in tasks:
            seqs = seen[n][task_id]
            assert seqs and all(b > a for a, b in itertools.pairwise(seqs)), (task_id, seqs)


# -- relay serve --workers N ----------------------------------------------------------------


def worker_pids(parent: ProcessServer) -> list[int]:
    assert parent.process is not None
    pid = parent.process.pid
    with contextlib.suppress(FileNotFoundError):
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections to `port` held by the process `pid` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def start_workers(redis: str, upstream: str, *extra: str) -> ProcessServer:
    args = [
        "serve",
        "--workers",
        "2",
        "--redis",
        redis,
        "--upstream",
        upstream,
        "--signing",
        "none",
    ]
    args += extra
    server = ProcessServer([*args, "--poll-interval", "0.2", "--lease-ttl", str(LEASE_TTL)])
    server.start()
    deadline = time.monotonic() + 15
    while len(worker_pids(server)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return server


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_workers_share_one_port_and_each_closes_its_streams_on_a_signal(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient, signum: int
) -> None:
    relay = start_workers(redis_url, upstream.url)
    try:
        workers = worker_pids(relay)
        assert len(workers) == 2, relay.log()
        task_id = upstream.start_task(queue=30, duration=30)
        streams: list[list[str]] = [[] for _ in range(16)]

        async def read_sse(lines: list[str]) -> None:
            async with http.stream("GET", f"{relay.url}/v1/tasks/{task_id}/events") as response:
                async for line in response.aiter_lines():
                    lines.append(line)

        readers = [asyncio.create_task(read_sse(lines)) for lines in streams]
        sockets = []
        for _ in range(16):
            ws = await websockets.connect(f"{relay.ws_url}/v1/ws")
            await ws.send(json.dumps({"type": "subscribe", "taskId": task_id}))
            await ws.recv()
            sockets.append(ws)
        async with asyncio.timeout(10):
            while not all(any(x.startswith("event: snapshot") for x in s) for s in streams):
                await asyncio.sleep(0.05)
        # The kernel spread the 32 connections over both workers.
        held = [connections_to(pid, relay.port) for pid in workers]
        assert sum(held) == 32 and all(held), held

        started = time.monotonic()
        relay.signal(signum)
        for ws in sockets:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        await asyncio.wait_for(asyncio.gather(*readers), 5)
        assert all(any(x.startswith("retry:") for x in s) for s in streams)
        assert relay.wait(5) in (0, -signum)
        assert time.monotonic() - started < 5
        assert not any(alive(pid) for pid in workers)
        log = relay.log()
        assert log.count("Application shutdown complete") == 2, log
        assert "Traceback" not in log
    finally:
        relay.stop()


async def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(
    redis_url: str, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = start_workers(redis_url, upstream.url)
    try:
        first, second = worker_pids(relay)
        os.kill(first, signal.SIGKILL)
        async with asyncio.timeout(10):
            while True:
                now = worker_pids(relay)
                if len(now) == 2 and first not in now:
                    break
                await asyncio.sleep(0.05)
        assert second in now
        await wait_for(
            lambda: "Application startup complete" in relay.log().rsplit("killed", 1)[-1]
        )
        for _ in range(20):
            async with httpx.AsyncClient() as fresh:  # a new connection each time: any worker
                assert (await fresh.get(f"{relay.url}/healthz")).status_code == 200
        assert "worker 0" in relay.log() or "worker 1" in relay.log()
    finally:
        relay.stop()
    assert relay.wait(5) in (0, -signal.SIGTERM)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--workers", "2"], "--workers 2 needs --redis (RELAY_REDIS_URL)"),
        (["--workers", "two"], "--workers must be a whole number >= 1 or auto, got 'two'"),
    ],
)
def test_workers_without_redis_is_one_line_and_exit_2(args: list[str], error: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--upstream", "http://127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"relay: error: {error}"), lines
