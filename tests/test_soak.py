"""A bounded soak: churn over both transports on a faulty upstream, then nothing may be left over.

A relay child process polls a simulator (in a thread) that fails, answers garbage and throttles
now and then. For SOAK_SECONDS, workers open and drop SSE streams (single and multiplexed,
politely and abruptly), subscribe and unsubscribe over WebSockets and cut sockets without a
close frame, in waves of reconnect storms, while followers watch other tasks to their end.
Afterwards, once the ended tasks' TTL has run out, the relay must hold no poll loop, no
subscriber and no task, and its threads, open files and resident memory must be back near
where they started.

The relay's asyncio task count comes from its `relay_asyncio_tasks` gauge. Run with `pytest -s`
to see the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import websockets

from relay.simulator import Faults, Simulator

from .servers import ProcessServer, ThreadServer

SOAK_SECONDS = 35.0  # bounded for CI; raise locally for a longer soak
# Long enough for two reconnect storms: the measured round then starts at the heap's high-water
# mark, so what it adds is what it keeps, not arenas a storm made that CPython holds on to.
WARM_UP_SECONDS = 12.0
CHURN_WORKERS = 40
STORM_EVERY = 5.0  # seconds between reconnect storms
STORM_SIZE = 150  # connections opened at once in a storm
FOLLOW_EVERY = 0.5  # seconds between tasks followed to their end
CYCLE_TIME_LIMIT = 15.0  # seconds one subscribe/unsubscribe cycle may take
MIN_CYCLES = 2000
RSS_GROWTH_LIMIT = 5 * 1024 * 1024  # measured: +1.2 MiB over a 35 s round
FD_SLACK = 6
# Threads the relay may add after warm-up: asyncio's default executor (getaddrinfo) grows to
# min(32, cpus + 4) threads and keeps them.
THREAD_SLACK = min(32, (os.cpu_count() or 1) + 4)


@dataclass
class ProcStats:
    rss: int
    threads: int
    fds: int


def proc_stats(pid: int) -> ProcStats:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    threads = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
    assert rss is not None and threads is not None
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcStats(int(rss.group(1)) * 1024, int(threads.group(1)), fds)


def asyncio_tasks(base: str) -> int:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    match = re.search(r"^relay_asyncio_tasks (\S+)$", text, re.MULTILINE)
    assert match is not None, "relay_asyncio_tasks not in /metrics"
    return int(float(match.group(1)))


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    found: dict[str, float] = {}
    for name in (
        "relay_poll_loops",
        "relay_tasks",
        'relay_subscribers{transport="sse"}',
        'relay_subscribers{transport="ws"}',
    ):
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match is not None, f"{name} not in /metrics"
        found[name] = float(match.group(1))
    return found


@dataclass
class Tally:
    cycles: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    followed: Counter[str] = field(default_factory=Counter)  # end status seen by followers
    wrong_end: list[str] = field(default_factory=list)
    peak_rss: int = 0

    @property
    def total(self) -> int:
        return sum(self.cycles.values())


class Soak:
    def __init__(self, relay: ProcessServer, simulator: Simulator) -> None:
        self.relay = relay
        self.simulator = simulator
        self.port = relay.port
        self.live: list[str] = []  # tasks to churn on (running or ended: both are fair game)
        self.tally = Tally()

    # -- clients ---------------------------------------------------------------------------

    async def sse(
        self, path: str, last_event_id: str | None = None, abrupt: bool = False, events: int = 1
    ) -> None:
        """A raw SSE client: request, read up to `events` events (or a non-200), leave."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            if last_event_id is not None:
                head += f"Last-Event-ID: {last_event_id}\r\n"
            writer.write((head + "Accept: text/event-stream\r\n\r\n").encode())
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            assert status in (200, 204), f"{path}: HTTP {status}"
            if status == 204:
                return
            seen = 0
            while seen < events:
                line = await reader.readline()
                if not line:
                    return
                seen += line.startswith(b"event:")
        finally:
            if abrupt:
                writer.transport.abort()
            else:
                writer.close()
                with suppress(OSError):
                    await writer.wait_closed()

    async def ws(self, task_ids: list[str], abrupt: bool) -> None:
        """Subscribe to tasks, unsubscribe from some, resubscribe one, then close or cut."""
        socket = await websockets.connect(f"ws://127.0.0.1:{self.port}/v1/ws", max_size=None)
        try:
            for task_id in task_ids:
                await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
            frame = json.loads(await socket.recv())
            assert frame["type"] in ("snapshot", "patch", "end", "error"), frame
            for task_id in task_ids[: len(task_ids) // 2]:
                await socket.send(json.dumps({"type": "unsubscribe", "taskId": task_id}))
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_ids[0]}))
            await socket.recv()
        finally:
            if abrupt:
                socket.transport.abort()  # no close frame: the relay must notice on its own
            await socket.close()

    # -- workloads -------------------------------------------------------------------------------

    def pick(self, count: int = 1) -> list[str]:
        return random.sample(self.live[-60:], min(count, len(self.live[-60:])))

    async def cycle(self) -> None:
        kind = random.choice(
            ["sse", "sse-abrupt", "sse-resume", "sse-many", "ws", "ws-abrupt", "ws-many"]
        )
        tasks = self.pick(random.randint(2, 6) if kind.endswith("many") else 1)
        if kind.startswith("sse-many"):
            query = "&".join(f"taskId={t}" for t in tasks)
            body = self.sse(f"/v1/events?{query}", abrupt=random.random() < 0.5)
        elif kind.startswith("sse"):
            resume = str(random.choice([1, time.time_ns() // 1_000_000, 10**20]))
            body = self.sse(
                f"/v1/tasks/{tasks[0]}/events",
                last_event_id=resume if kind == "sse-resume" else None,
                abrupt=kind == "sse-abrupt",
                events=random.randint(1, 3),
            )
        else:
            body = self.ws(tasks, abrupt=kind == "ws-abrupt" or random.random() < 0.3)
        try:
            await asyncio.wait_for(body, CYCLE_TIME_LIMIT)
        except (AssertionError, OSError, TimeoutError, websockets.ConnectionClosed) as exc:
            self.tally.failures[f"{kind}: {type(exc).__name__}: {str(exc)[:80]}"] += 1
        else:
            self.tally.cycles[kind] += 1

    async def churn(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.cycle()

    async def storms(self, deadline: float) -> None:
        while time.monotonic() + STORM_EVERY < deadline:
            await asyncio.sleep(STORM_EVERY)
            await asyncio.gather(*(self.cycle() for _ in range(STORM_SIZE)))

    async def start_tasks(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            task = self.simulator.start_task(
                queue=random.uniform(0, 1), duration=random.uniform(0.5, 3)
            )
            self.live.append(task.task_id)
            await asyncio.sleep(0.1)

    async def follow(self, task_id: str, transport: str) -> None:
        """Watch one task to its end; the end must be the simulator's final status."""
        expected = self.simulator.tasks[task_id]
        final = expected.state(expected.created + expected.queue_seconds + expected.run_seconds + 1)
        ended: str | None = None
        if transport == "ws":
            async with websockets.connect(f"ws://127.0.0.1:{self.port}/v1/ws") as socket:
                await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
                while ended is None:
                    frame = json.loads(await socket.recv())
                    if frame["type"] == "end":
                        ended = frame["data"]["status"]
                    elif frame["type"] == "error" and not frame["data"]["retrying"]:
                        ended = "error: " + frame["data"]["code"]
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                writer.write(f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                kind = b""
                while ended is None:
                    line = await reader.readline()
                    assert line, "the stream closed before the end"
                    if line.startswith(b"event: "):
                        kind = line.removeprefix(b"event: ").strip()
                    elif line.startswith(b"data: ") and kind == b"end":
                        ended = json.loads(line.removeprefix(b"data: "))["status"]
                    elif line.startswith(b"data: ") and kind == b"error":
                        data = json.loads(line.removeprefix(b"data: "))
                        if not data["retrying"]:
                            ended = "error: " + data["code"]
            finally:
                writer.close()
                with suppress(OSError):
                    await writer.wait_closed()
        self.tally.followed[ended] += 1
        if ended != final["status"]:
            self.tally.wrong_end.append(f"{task_id} over {transport}: {ended} != {final['status']}")

    async def followers(self, deadline: float) -> None:
        running: list[asyncio.Task[None]] = []
        while time.monotonic() < deadline:
            task = self.simulator.start_task(queue=0.2, duration=random.uniform(1, 2.5))
            self.live.append(task.task_id)
            follow = self.follow(task.task_id, random.choice(["sse", "ws"]))
            running.append(asyncio.create_task(asyncio.wait_for(follow, 30)))
            await asyncio.sleep(FOLLOW_EVERY)
        for outcome in await asyncio.gather(*running, return_exceptions=True):
            if isinstance(outcome, BaseException):
                self.tally.wrong_end.append(f"follower failed: {outcome!r}")

    async def sample_rss(self, deadline: float) -> None:
        assert self.relay.process is not None
        while time.monotonic() < deadline:
            self.tally.peak_rss = max(self.tally.peak_rss, proc_stats(self.relay.process.pid).rss)
            await asyncio.sleep(0.5)

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for _ in range(5):
            self.live.append(self.simulator.start_task(queue=0, duration=3).task_id)
        await asyncio.gather(
            self.start_tasks(deadline),
            self.followers(deadline),
            self.storms(deadline),
            self.sample_rss(deadline),
            *(self.churn(deadline) for _ in range(CHURN_WORKERS)),
        )


@dataclass
class FaultyUpstream:
    simulator: Simulator
    url: str


@pytest.fixture
def faulty_upstream() -> Iterator[FaultyUpstream]:
    faults = Faults(error_rate=0.05, malformed_rate=0.03, throttle_rate=0.01, retry_after=0.1)
    simulator = Simulator(fail_rate=0.2, faults=faults)
    server = ThreadServer(simulator.app).start()
    yield FaultyUpstream(simulator, server.url)
    server.stop()


async def wait_idle(base: str, time_limit: float) -> dict[str, float]:
    deadline = time.monotonic() + time_limit
    while True:
        found = metrics(base)
        if all(value == 0 for value in found.values()) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def test_churn_and_reconnect_storms_leave_no_loops_subscribers_or_leaks(
    faulty_upstream: FaultyUpstream,
) -> None:
    faulty_simulator = faulty_upstream.simulator
    relay = ProcessServer(
        [
            "serve",
            "--upstream",
            faulty_upstream.url,
            "--signing",
            "none",
            "--poll-interval",
            "0.2",
            "--linger",
            "0.3",
            "--backoff-max",
            "1",
            "--request-timeout",
            "2",
            "--ended-ttl",
            "5",
            "--log-level",
            "warning",
        ]
    ).start()
    try:
        assert relay.process is not None
        pid = relay.process.pid
        soak = Soak(relay, faulty_simulator)
        await soak.run(WARM_UP_SECONDS)  # imports, pools, executor threads, peak arenas
        warm_cycles = soak.tally.total
        soak.tally = Tally()
        idle = await wait_idle(relay.url, 15)
        assert all(value == 0 for value in idle.values()), idle
        await asyncio.sleep(6)  # the upstream pool's keep-alive connections expire (5 s)
        before = proc_stats(pid)
        tasks_before = asyncio_tasks(relay.url)

        started = time.monotonic()
        await soak.run(SOAK_SECONDS)
        soaked = time.monotonic() - started
        idle = await wait_idle(relay.url, 20)
        await asyncio.sleep(6)
        after = proc_stats(pid)
        tasks_after = asyncio_tasks(relay.url)
        tally = soak.tally

        print(
            f"\nsoak: {soaked:.1f} s, {tally.total} cycles after {warm_cycles} warm-up cycles "
            f"({dict(tally.cycles)}), failures {sum(tally.failures.values())} "
            f"{dict(tally.failures.most_common(5))}, followed to the end {dict(tally.followed)}"
            f"\nupstream calls {sum(faulty_simulator.calls.values())}, "
            f"metrics after: {idle}"
            f"\nRSS baseline {before.rss / 2**20:.1f} MiB, peak {tally.peak_rss / 2**20:.1f} MiB, "
            f"final {after.rss / 2**20:.1f} MiB (growth {(after.rss - before.rss) / 2**20:+.1f} "
            f"MiB); fds {before.fds} -> {after.fds}; threads {before.threads} -> {after.threads}; "
            f"asyncio tasks {tasks_before} -> {tasks_after}"
        )
        assert relay.process.poll() is None, relay.log()[-2000:]
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{relay.url}/healthz")).json() == {"status": "ok"}
        assert tally.total >= MIN_CYCLES, tally.cycles
        assert not tally.failures, tally.failures.most_common(10)
        assert not tally.wrong_end, tally.wrong_end[:10]
        assert sum(tally.followed.values()) >= SOAK_SECONDS / FOLLOW_EVERY * 0.8, tally.followed
        assert idle == {
            "relay_poll_loops": 0,
            "relay_tasks": 0,
            'relay_subscribers{transport="sse"}': 0,
            'relay_subscribers{transport="ws"}': 0,
        }
        assert tasks_after <= tasks_before, (tasks_before, tasks_after)
        assert after.fds <= before.fds + FD_SLACK, (before, after)
        assert after.threads <= before.threads + THREAD_SLACK, (before, after)
        assert after.rss - before.rss < RSS_GROWTH_LIMIT, (before, after)
        assert "Traceback" not in relay.log(), relay.log()[-3000:]
    finally:
        relay.stop()
