"""The poll loop's economy: adaptive intervals, the result at the end, cached unknown tasks."""

import asyncio
import json
import logging
import random
import time

import httpx
import pytest
import websockets

from relay.poll_loop import PollPolicy, poll_once, with_result
from relay.simulator import Simulator
from relay.upstream import UpstreamClient, make_http_client
from relay.upstream.signing import ApiGatewaySigner, NoSigner

from .clients import watch_sse
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ThreadServer


def test_waiting_tasks_are_polled_slower_the_longer_the_queue() -> None:
    policy = PollPolicy(interval=1.0, waiting_max=5.0, jitter=0.0)
    assert policy.next_interval({"status": "running"}) == 1.0
    assert policy.next_interval({"status": "waiting", "lastQueueRemaining": 1}) == 2.0
    assert policy.next_interval({"status": "waiting", "lastQueueRemaining": 3}) == 4.0
    assert policy.next_interval({"status": "waiting", "lastQueueRemaining": 50}) == 5.0
    assert policy.next_interval({"status": "waiting", "lastQueueRemaining": "x"}) == 2.0


def test_intervals_are_jittered_within_bounds() -> None:
    policy = PollPolicy(interval=1.0, jitter=0.1)
    delays = {policy.next_interval({"status": "running"}) for _ in range(50)}
    assert len(delays) > 1 and all(0.9 <= d <= 1.1 for d in delays)


def test_jitter_is_drawn_from_the_policys_own_seedable_random() -> None:
    draws = [
        [PollPolicy(rng=random.Random(7)).next_interval({"status": "running"}) for _ in range(3)]
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
    before = random.getstate()
    PollPolicy().next_interval({"status": "running"})
    PollPolicy().backoff(3)
    assert random.getstate() == before


async def test_a_relay_following_a_task_draws_nothing_from_the_global_random(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    """Hypothesis warns when server threads use the global random while it draws examples."""
    before = random.getstate()
    task_id = upstream.start_task(queue=0.2, duration=0.6)
    assert (await watch_sse(http, relay.url, task_id)).ended == "succeeded"
    assert random.getstate() == before


def test_backoff_grows_is_capped_and_respects_retry_after() -> None:
    policy = PollPolicy(backoff_base=0.5, backoff_max=4.0)
    assert 0.25 <= policy.backoff(1) <= 0.5
    assert 2.0 <= policy.backoff(4) <= 4.0
    assert policy.backoff(50) <= 4.0
    assert policy.backoff(1, retry_after=7.0) == 7.0


async def test_waiting_tasks_cost_fewer_calls_than_running_ones(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(poll_interval=0.1, waiting_interval_max=0.5)
    task_id = upstream.start_task(queue=3.0, duration=2.0)
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.ended == "succeeded"
    by_status = upstream.simulator.states
    waiting_rate, running_rate = by_status["waiting"] / 3.0, by_status["running"] / 2.0
    assert waiting_rate * 2 < running_rate, dict(by_status)


async def test_succeeded_task_ends_with_its_result(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.state is not None
    assert watcher.state["result"] == {
        "images": [f"{upstream.url}/sim/images/{task_id}.svg"],
        "result": upstream.simulator.tasks[task_id].result()["result"],
    }
    kinds = [kind for kind, _, _ in watcher.events]
    assert kinds[-1] == "end" and kinds.count("end") == 1


async def test_result_fetch_can_be_turned_off(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(fetch_result=False)
    task_id = upstream.start_task()
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.state == upstream.final_state(task_id, with_result=False)


async def test_a_hanging_result_call_does_not_hold_the_end_back(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(request_timeout=0.5)
    upstream.simulator.faults.hang_seconds = 3.0
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    await asyncio.sleep(0.8)  # the task has succeeded upstream

    upstream.simulator.faults.script.extend(["ok", "timeout", "timeout"])
    started = time.monotonic()
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.ended == "succeeded"
    assert watcher.state == upstream.final_state(task_id, with_result=False)
    assert time.monotonic() - started < 1.5


async def test_reconnects_to_an_unknown_task_cost_one_upstream_call(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    watcher = await watch_sse(http, relay.url, "no-such-task")
    assert [e["code"] for e in watcher.errors] == ["task_not_found"]
    for _ in range(49):
        # Known unknown: a 404 rather than a stream, so a plain EventSource stops retrying.
        response = await http.get(f"{relay.url}/v1/tasks/no-such-task/events")
        assert response.status_code == 404
        assert response.json()["code"] == "task_not_found"
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        for _ in range(50):
            await socket.send(json.dumps({"type": "subscribe", "taskId": "no-such-task"}))
            reply = json.loads(await socket.recv())
            assert reply["data"]["code"] == "task_not_found"
    assert upstream.calls("no-such-task") == 1


async def test_a_refused_signature_is_final_and_only_a_refused_timestamp_warns_of_the_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator = Simulator(fail_rate=0, credentials={"key-1": "s3cret"})
    server = ThreadServer(simulator.app).start()
    http = make_http_client(timeout=2, max_connections=2)
    policy = PollPolicy()
    try:
        task_id = simulator.start_task(queue=5).task_id
        wrong = UpstreamClient(http, server.url, ApiGatewaySigner("key-1", "wrong"), 2)
        with caplog.at_level(logging.WARNING, logger="relay.poll"):
            polled = await poll_once(task_id, wrong, policy, 0)
        assert polled.final is not None and polled.final[0] == "unauthorized"
        assert "Invalid Signature" in caplog.text and "clock" not in caplog.text
        assert "s3cret" not in caplog.text and "wrong" not in caplog.text
        caplog.clear()
        stale = ApiGatewaySigner("key-1", "s3cret", clock=lambda: 1_000_000_000.0)
        with caplog.at_level(logging.WARNING, logger="relay.poll"):
            polled = await poll_once(task_id, UpstreamClient(http, server.url, stale, 2), policy, 0)
        assert polled.final is not None and polled.final[0] == "unauthorized"
        assert "clock" in caplog.text
    finally:
        await http.aclose()
        server.stop()


async def test_the_end_is_never_held_back_past_the_request_timeout_by_a_429_pause() -> None:
    simulator = Simulator(fail_rate=0)
    simulator.faults.retry_after = 30.0
    simulator.faults.script.append("throttle")  # the first result call: 429, wait 30 s
    server = ThreadServer(simulator.app).start()
    http = make_http_client(timeout=2, max_connections=2)
    try:
        task_id = simulator.start_task(queue=0, duration=0).task_id
        upstream = UpstreamClient(http, server.url, NoSigner(None), 2)
        state = {"taskId": task_id, "status": "succeeded"}
        started = time.monotonic()
        final = await with_result(upstream, task_id, state, time_limit=1.0)
        assert time.monotonic() - started < 2.0
        assert final == state  # sent without the result rather than late
    finally:
        await http.aclose()
        server.stop()
