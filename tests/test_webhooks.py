"""Webhooks of watched tasks, received by a real receiver that verifies every signature with the
`standardwebhooks` library (not the relay's own signer): one event at the end, the same
`webhook-id` on every retry, and nothing lost when a relay or a cluster node is killed."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.app import create_app
from relay.config import Settings
from relay.watches.webhooks import Answer, Outgoing, RetryPolicy, Webhooks, signed_headers

from .clients import merge_patch, wait_for, watch_sse
from .conftest import FAST, SimulatedUpstream
from .servers import ProcessServer, ThreadServer

API_KEY = "test-api-key-0123456789"
SECRET = "whsec_" + base64.b64encode(b"webhook-test-secret-32-bytes-ok!").decode()
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FAST_RETRY = RetryPolicy(base=0.05, cap=0.2)


@dataclass
class Received:
    """One request the receiver got: its headers, the verified payload (None if the signature
    failed), when, and the status it was answered."""

    id: str
    timestamp: str
    payload: Any
    at: float
    status: int


class Receiver:
    """A webhook endpoint on a loopback port: verifies with `standardwebhooks`, records every
    request, and answers the statuses of `script` first (then 200)."""

    def __init__(self) -> None:
        self.verifier = Webhook(SECRET)
        self.received: list[Received] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.delay = 0.0  # seconds each answer takes
        self.lock = threading.Lock()
        app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])
        self.server = ThreadServer(app).start()
        self.url = f"{self.server.url}/hook"

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        await asyncio.sleep(self.delay)
        try:
            payload = self.verifier.verify(body, headers)
        except WebhookVerificationError:
            payload = None
        with self.lock:
            status, extra = self.script.pop(0) if self.script else (200, {})
            if payload is None:
                status = 401
            self.received.append(
                Received(
                    headers.get("webhook-id", ""),
                    headers.get("webhook-timestamp", ""),
                    payload,
                    time.monotonic(),
                    status,
                )
            )
        return Response(status_code=status, headers=extra)

    def fail_next(self, *statuses: int, headers: dict[str, str] | None = None) -> None:
        with self.lock:
            self.script.extend((status, headers or {}) for status in statuses)

    def delivered(self) -> list[Received]:
        with self.lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def unique(self) -> dict[str, Any]:
        """The payloads delivered, one per webhook-id."""
        return {r.id: r.payload for r in self.delivered()}

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.stop()


def watch_settings(
    upstream_url: str, receiver_url: str, data_dir: Path, **overrides: Any
) -> Settings:
    return replace(
        FAST,
        upstream_url=upstream_url,
        api_key=API_KEY,
        webhook_url=receiver_url,
        webhook_secret=SECRET,
        data_dir=str(data_dir),
        **overrides,
    )


@pytest.fixture
def webhook_relay(
    upstream: SimulatedUpstream, receiver: Receiver, tmp_path: Path
) -> Iterator[ThreadServer]:
    settings = watch_settings(upstream.url, receiver.url, tmp_path)
    server = ThreadServer(create_app(settings, webhook_retry=FAST_RETRY)).start()
    yield server
    server.stop()


async def metric(http: httpx.AsyncClient, base: str, name: str) -> float:
    text = (await http.get(f"{base}/metrics")).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


async def watch(http: httpx.AsyncClient, base: str, task_id: str) -> dict[str, Any]:
    response = await http.post(f"{base}/v1/tasks/{task_id}/watch", headers=AUTH)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_relays_signature_verifies_with_the_standardwebhooks_library() -> None:
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    body = json.dumps({"type": "task.ended", "data": {"taskId": "t", "note": "é"}})
    headers = signed_headers(key, "msg_1", int(time.time()), body)
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)
    other = "whsec_" + base64.b64encode(b"another-secret-of-thirty-two-byt").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


async def test_a_watched_task_with_no_browser_delivers_one_event_at_its_end(
    webhook_relay: ThreadServer,
    upstream: SimulatedUpstream,
    receiver: Receiver,
    http: httpx.AsyncClient,
) -> None:
    task_id = upstream.start_task(queue=0.2, duration=1.5)
    watched = await watch(http, webhook_relay.url, task_id)
    assert watched["taskId"] == task_id
    assert watched["expiresAt"] - watched["createdAt"] == pytest.approx(21_600, abs=1)
    await wait_for(lambda: receiver.delivered(), timeout=15)
    await asyncio.sleep(0.5)  # nothing else may follow
    assert len(receiver.received) == 1
    event = receiver.received[0]
    assert event.id.startswith("msg_") and event.payload is not None
    assert event.payload["type"] == "task.ended"
    data = event.payload["data"]
    assert data["taskId"] == task_id and data["status"] == "succeeded"
    assert data["state"] == upstream.final_state(task_id)
    assert isinstance(data["seq"], int)
    # The watch is over; so is the loop (no browser ever watched).
    listed = await http.get(f"{webhook_relay.url}/v1/watches", headers=AUTH)
    assert listed.json() == {"watches": []}
    delivered = 'relay_webhook_deliveries_total{outcome="delivered"}'
    assert await metric(http, webhook_relay.url, delivered) == 1
    await wait_for(lambda: upstream.calls(task_id) > 0)
    await asyncio.sleep(1.2)  # the outbox gauges are read once a second
    assert await metric(http, webhook_relay.url, "relay_webhooks_pending") == 0
    assert await metric(http, webhook_relay.url, "relay_poll_loops") == 0
    assert await metric(http, webhook_relay.url, "relay_watches") == 0


async def test_a_receiver_that_fails_three_times_gets_the_same_webhook_id_each_time(
    webhook_relay: ThreadServer,
    upstream: SimulatedUpstream,
    receiver: Receiver,
    http: httpx.AsyncClient,
) -> None:
    receiver.fail_next(500)
    receiver.fail_next(429, headers={"Retry-After": "1"})
    receiver.fail_next(503)
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    await watch(http, webhook_relay.url, task_id)
    await wait_for(lambda: receiver.delivered(), timeout=20)
    await asyncio.sleep(0.5)
    attempts = receiver.received
    assert [a.status for a in attempts] == [500, 429, 503, 200]
    assert len({a.id for a in attempts}) == 1, [a.id for a in attempts]
    assert all(a.payload == attempts[0].payload for a in attempts)
    # Retry-After: 1 was honoured, whatever the backoff said.
    assert attempts[2].at - attempts[1].at >= 0.95
    retried = 'relay_webhook_deliveries_total{outcome="retrying"}'
    assert await metric(http, webhook_relay.url, retried) == 3


async def test_a_4xx_is_final_and_not_retried(
    webhook_relay: ThreadServer,
    upstream: SimulatedUpstream,
    receiver: Receiver,
    http: httpx.AsyncClient,
) -> None:
    receiver.fail_next(400)
    task_id = upstream.start_task(queue=0.1, duration=0.3)
    await watch(http, webhook_relay.url, task_id)
    await wait_for(lambda: receiver.received, timeout=15)
    await asyncio.sleep(1.5)
    assert [a.status for a in receiver.received] == [400]
    rejected = 'relay_webhook_deliveries_total{outcome="rejected"}'
    assert await metric(http, webhook_relay.url, rejected) == 1
    assert await metric(http, webhook_relay.url, "relay_webhooks_pending") == 0


async def test_an_event_that_keeps_failing_is_given_up_after_its_attempts(
    upstream: SimulatedUpstream, receiver: Receiver, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    receiver.fail_next(*[500] * 10)
    settings = watch_settings(upstream.url, receiver.url, tmp_path)
    policy = replace(FAST_RETRY, max_attempts=3)
    relay = ThreadServer(create_app(settings, webhook_retry=policy)).start()
    try:
        task_id = upstream.start_task(queue=0.1, duration=0.3)
        await watch(http, relay.url, task_id)
        await wait_for(lambda: len(receiver.received) == 3, timeout=15)
        await asyncio.sleep(1.5)
        assert len(receiver.received) == 3
        abandoned = 'relay_webhook_deliveries_total{outcome="abandoned"}'
        assert await metric(http, relay.url, abandoned) == 1
        assert await metric(http, relay.url, "relay_webhooks_pending") == 0
    finally:
        relay.stop()


async def test_a_slow_receiver_holds_up_neither_the_loops_nor_the_browsers(
    webhook_relay: ThreadServer,
    upstream: SimulatedUpstream,
    receiver: Receiver,
    http: httpx.AsyncClient,
) -> None:
    receiver.delay = 2.0
    watched = [upstream.start_task(queue=0, duration=0.3) for _ in range(12)]
    for task_id in watched:
        await watch(http, webhook_relay.url, task_id)
    await asyncio.sleep(1.0)
    # Deliveries are in flight (8 at most, 2 s each); a browser's task runs as usual.
    browser_task = upstream.start_task(queue=0.1, duration=1.0)
    started = time.monotonic()
    watcher = await watch_sse(http, webhook_relay.url, browser_task)
    assert watcher.ended == "succeeded" and watcher.state == upstream.final_state(browser_task)
    assert time.monotonic() - started < 3.0
    await asyncio.sleep(0.5)
    metrics = await http.get(f"{webhook_relay.url}/metrics")
    assert metrics.status_code == 200
    await wait_for(lambda: len(receiver.unique()) == len(watched), timeout=20)
    assert len(receiver.received) == len(watched)


class TricklingReceiver:
    """A receiver on a loopback port that answers its first `trickled` requests a byte every
    0.2 s (each byte well within a read timeout), and the others at once."""

    def __init__(self, trickled: int) -> None:
        self.trickled = trickled
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answer = b"HTTP/1.1 204 No Content\r\n\r\n"
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests += 1
                if self.requests > self.trickled:
                    writer.write(answer)
                    continue
                for byte in answer:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.2)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()


class NoOutbox:
    """`Webhooks.attempt` alone touches no outbox."""


async def test_a_trickling_receiver_fails_an_attempt_by_its_timeout_and_frees_the_slot() -> None:
    """An attempt lasts at most its timeout, however slowly the receiver answers; the one
    connection of a one-worker client is freed each time, so the next attempt is sent."""
    event = Outgoing("evt-1", "task-1", '{"type":"task.ended"}', time.time())
    async with TricklingReceiver(trickled=2) as url:
        webhooks = Webhooks(NoOutbox(), url, SECRET, workers=1, timeout=1.0)  # type: ignore[arg-type]
        try:
            for _ in range(2):  # one connection allowed: each needs the slot the last held
                started = time.monotonic()
                answer = await webhooks.attempt(event)
                assert answer == Answer("retry", "the receiver timed out")
                assert 0.95 <= time.monotonic() - started < 1.5
            started = time.monotonic()
            assert (await webhooks.attempt(event)).outcome == "delivered"
            assert time.monotonic() - started < 0.5
        finally:
            await webhooks.close()


async def test_an_unknown_task_ends_its_watch_with_task_not_found(
    webhook_relay: ThreadServer, receiver: Receiver, http: httpx.AsyncClient
) -> None:
    await watch(http, webhook_relay.url, "no-such-task")
    await wait_for(lambda: receiver.delivered(), timeout=15)
    payload = receiver.delivered()[0].payload
    assert payload["type"] == "task.ended"
    assert payload["data"]["status"] == "task_not_found"
    assert payload["data"]["error"]["code"] == "task_not_found"
    assert payload["data"]["seq"] is None and "state" not in payload["data"]


async def test_a_watch_that_outlives_its_ttl_says_so_and_stops(
    upstream: SimulatedUpstream, receiver: Receiver, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = watch_settings(upstream.url, receiver.url, tmp_path, watch_ttl=1.0)
    relay = ThreadServer(create_app(settings, webhook_retry=FAST_RETRY)).start()
    try:
        task_id = upstream.start_task(queue=0, duration=60)
        await watch(http, relay.url, task_id)
        await wait_for(lambda: receiver.delivered(), timeout=10)
        payload = receiver.delivered()[0].payload
        assert payload["type"] == "watch.expired"
        assert payload["data"]["taskId"] == task_id
        assert payload["data"]["state"]["status"] == "running"
        listed = await http.get(f"{relay.url}/v1/watches", headers=AUTH)
        assert listed.json() == {"watches": []}
        await asyncio.sleep(FAST.linger + 0.5)
        calls = upstream.calls(task_id)
        await asyncio.sleep(0.5)
        assert upstream.calls(task_id) == calls, "nobody watches the task: polling stops"
    finally:
        relay.stop()


async def test_every_change_as_merge_patches_with_their_seq(
    upstream: SimulatedUpstream, receiver: Receiver, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = watch_settings(upstream.url, receiver.url, tmp_path, webhook_events="all")
    relay = ThreadServer(create_app(settings, webhook_retry=FAST_RETRY)).start()
    try:
        task_id = upstream.start_task(queue=0.3, duration=1.5)
        await watch(http, relay.url, task_id)
        ended = lambda: any(p["type"] == "task.ended" for p in receiver.unique().values())  # noqa: E731
        await wait_for(ended, timeout=15)
        await asyncio.sleep(0.5)
        events = list(receiver.unique().values())
        changes = sorted(
            (p["data"] for p in events if p["type"] == "task.changed"), key=lambda d: d["seq"]
        )
        assert len(changes) >= 3
        assert "state" in changes[0] and all("patch" in c for c in changes[1:])
        state = changes[0]["state"]
        for change in changes[1:]:
            state = merge_patch(state, change["patch"])
        (end,) = [p["data"] for p in events if p["type"] == "task.ended"]
        assert state == end["state"] == upstream.final_state(task_id)
        assert end["seq"] == changes[-1]["seq"]
        # One webhook-id per change and one for the end, each delivered once.
        assert len(receiver.delivered()) == len(events) == len(changes) + 1
    finally:
        relay.stop()


# -- restarts and kills ---------------------------------------------------------------------------


def serve_args(upstream: str, receiver: str, data_dir: Path) -> list[str]:
    return [
        "serve",
        "--upstream",
        upstream,
        "--signing",
        "none",
        "--poll-interval",
        "0.1",
        "--webhook-url",
        receiver,
        "--data-dir",
        str(data_dir),
    ]


SERVER_ENV = {"RELAY_API_KEY": API_KEY, "RELAY_WEBHOOK_SECRET": SECRET}


async def test_a_relay_killed_while_a_task_is_watched_delivers_after_a_restart(
    upstream: SimulatedUpstream, receiver: Receiver, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    args = serve_args(upstream.url, receiver.url, tmp_path)
    relay = ProcessServer(args, env=SERVER_ENV).start()
    try:
        task_id = upstream.start_task(queue=0.2, duration=4.0)
        await watch(http, relay.url, task_id)
        await wait_for(lambda: upstream.calls(task_id) >= 3)
        relay.kill()
        assert receiver.received == []
        killed, relay = relay, ProcessServer(args, env=SERVER_ENV).start()
        await wait_for(lambda: receiver.delivered(), timeout=20)
        await asyncio.sleep(0.5)
        assert len(receiver.received) == 1
        payload = receiver.received[0].payload
        assert payload["type"] == "task.ended"
        assert payload["data"]["state"] == upstream.final_state(task_id)
        for log in (killed.log(), relay.log()):
            assert API_KEY not in log and SECRET.removeprefix("whsec_") not in log
    finally:
        relay.stop()


async def test_an_undelivered_event_survives_a_kill(
    upstream: SimulatedUpstream, receiver: Receiver, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    receiver.fail_next(*[503] * 100)
    args = serve_args(upstream.url, receiver.url, tmp_path)
    relay = ProcessServer(args, env=SERVER_ENV).start()
    try:
        task_id = upstream.start_task(queue=0.1, duration=0.5)
        await watch(http, relay.url, task_id)
        await wait_for(lambda: receiver.received, timeout=15)
        relay.kill()
        first = receiver.received[0]
        with receiver.lock:
            receiver.script.clear()
        relay = ProcessServer(args, env=SERVER_ENV).start()
        await wait_for(lambda: receiver.delivered(), timeout=20)
        delivered = receiver.delivered()[0]
        assert delivered.id == first.id and delivered.payload == first.payload
        assert delivered.payload["data"]["state"] == upstream.final_state(task_id)
    finally:
        relay.stop()


# -- cluster --------------------------------------------------------------------------------------


def cluster_args(redis_url: str, upstream: str, receiver: str) -> list[str]:
    return [
        "serve",
        "--upstream",
        upstream,
        "--signing",
        "none",
        "--redis",
        redis_url,
        "--poll-interval",
        "0.1",
        "--lease-ttl",
        "1",
        "--linger",
        "0.5",
        "--webhook-url",
        receiver,
    ]


@pytest.mark.cluster
async def test_a_cluster_node_killed_while_it_holds_a_watch_delivers_after_takeover(
    redis_url: str, upstream: SimulatedUpstream, receiver: Receiver, http: httpx.AsyncClient
) -> None:
    args = cluster_args(redis_url, upstream.url, receiver.url)
    nodes = [ProcessServer(args, env=SERVER_ENV).start() for _ in range(2)]
    try:
        holder, other = nodes
        task_id = upstream.start_task(queue=0.2, duration=5.0)
        await watch(http, holder.url, task_id)
        assert await metric(http, holder.url, "relay_watches") == 1
        assert await metric(http, other.url, "relay_watches") == 0
        # The other node lists the watch too: it is the cluster's.
        listed = (await http.get(f"{other.url}/v1/watches", headers=AUTH)).json()
        assert [w["taskId"] for w in listed["watches"]] == [task_id]
        await wait_for(lambda: upstream.calls(task_id) >= 3)
        holder.kill()
        await wait_for(lambda: receiver.delivered(), timeout=25)
        await asyncio.sleep(1.0)
        assert len(receiver.unique()) == 1
        payload = receiver.delivered()[0].payload
        assert payload["type"] == "task.ended"
        assert payload["data"]["state"] == upstream.final_state(task_id)
        # One node polled at a time: the lease changed hands once, at the kill.
        assert upstream.simulator.handovers[task_id] <= 1
        assert (await http.get(f"{other.url}/v1/watches", headers=AUTH)).json()["watches"] == []
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.cluster
async def test_each_event_is_delivered_by_one_node_of_a_cluster(
    redis_url: str, upstream: SimulatedUpstream, receiver: Receiver, http: httpx.AsyncClient
) -> None:
    args = cluster_args(redis_url, upstream.url, receiver.url)
    nodes = [ProcessServer(args, env=SERVER_ENV).start() for _ in range(3)]
    try:
        tasks = [upstream.start_task(queue=0.2, duration=1.0) for _ in range(12)]
        for n, task_id in enumerate(tasks):
            await watch(http, nodes[n % 3].url, task_id)
        # The same watch asked of another node is the same watch.
        again = await watch(http, nodes[1].url, tasks[0])
        assert again["taskId"] == tasks[0]
        await wait_for(lambda: len(receiver.unique()) == len(tasks), timeout=30)
        await asyncio.sleep(1.5)
        assert len(receiver.received) == len(tasks), "each event was sent exactly once"
        ended = {p["data"]["taskId"] for p in receiver.unique().values()}
        assert ended == set(tasks)
    finally:
        for node in nodes:
            node.stop()
