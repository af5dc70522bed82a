"""The upstream client against the simulator: envelopes, faults, retries, signatures."""

import time
from collections.abc import AsyncIterator

import httpx
import pytest

from relay.simulator import Simulator
from relay.upstream import (
    TaskNotFound,
    Unauthorized,
    UpstreamClient,
    UpstreamUnavailable,
    make_http_client,
    read_envelope,
)
from relay.upstream.signing import ApiGatewaySigner, NoSigner

from .clients import visit, watch_sse, watch_ws
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ThreadServer


@pytest.fixture
async def client(upstream: SimulatedUpstream) -> AsyncIterator[UpstreamClient]:
    http = make_http_client(timeout=0.5, max_connections=2)
    yield UpstreamClient(http, upstream.url, NoSigner(), concurrency=2)
    await http.aclose()


async def test_progress_returns_the_data_without_nulls(
    client: UpstreamClient, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task(queue=5)
    state = await client.progress(task_id)
    assert state["taskId"] == task_id and state["status"] == "waiting"
    assert None not in state.values()


async def test_unknown_task_raises_task_not_found(client: UpstreamClient) -> None:
    with pytest.raises(TaskNotFound):
        await client.progress("nope")


@pytest.mark.parametrize("fault", ["error", "throttle", "timeout", "malformed"])
async def test_each_fault_is_upstream_unavailable(
    client: UpstreamClient, upstream: SimulatedUpstream, fault: str
) -> None:
    upstream.simulator.faults.hang_seconds = 1.0
    upstream.simulator.faults.script.append(fault)
    with pytest.raises(UpstreamUnavailable) as raised:
        await client.progress(upstream.start_task())
    started = time.monotonic()
    assert (await client.progress(upstream.start_task(queue=5)))["status"] == "waiting"
    if fault == "throttle":
        assert raised.value.retry_after == 1.0
        assert time.monotonic() - started >= 0.9, "a 429 must hold every call back"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        {"status": 10},
        {"status": 10, "data": "running"},
        {"status": 20, "errCode": "Throttled", "data": None},
        {"status": "10", "data": {}},
    ],
)
def test_bodies_that_are_not_the_api_are_unavailable(body: object) -> None:
    with pytest.raises(UpstreamUnavailable):
        read_envelope(body, "t")


async def test_signed_calls_are_accepted_and_bad_ones_refused() -> None:
    simulator = Simulator(fail_rate=0, credentials={"key-1": "s3cret"})
    server = ThreadServer(simulator.app).start()
    http = make_http_client(timeout=2, max_connections=2)
    try:
        task_id = simulator.start_task(queue=5).task_id
        good = UpstreamClient(http, server.url, ApiGatewaySigner("key-1", "s3cret"), 2)
        assert (await good.progress(task_id))["status"] == "waiting"
        assert (await good.progress(task_id))["status"] == "waiting"  # fresh nonce each call
        bad = UpstreamClient(http, server.url, ApiGatewaySigner("key-1", "wrong"), 2)
        with pytest.raises(Unauthorized, match="Invalid Signature"):
            await bad.progress(task_id)
        stale = ApiGatewaySigner("key-1", "s3cret", clock=lambda: 1_000_000_000.0)
        with pytest.raises(Unauthorized, match="Timestamp"):
            await UpstreamClient(http, server.url, stale, 2).progress(task_id)
        with pytest.raises(Unauthorized):
            await UpstreamClient(http, server.url, NoSigner("key-1"), 2).progress(task_id)
    finally:
        await http.aclose()
        server.stop()


async def test_failing_upstream_is_reported_and_the_final_state_still_arrives(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(request_timeout=0.3)
    upstream.simulator.faults.hang_seconds = 1.0
    upstream.simulator.faults.script.extend(
        ["error", "timeout", "malformed", "throttle", "error", "error"]
    )
    upstream.simulator.faults.retry_after = 0.2
    task_id = upstream.start_task(queue=0.2, duration=1.5)
    sse = await watch_sse(http, relay.url, task_id)
    ws = await watch_ws(relay.ws_url, task_id)
    assert sse.errors and all(e["code"] == "upstream_unavailable" for e in sse.errors)
    assert all(e["retrying"] is True for e in sse.errors)
    assert sse.ended == "succeeded" and sse.state == upstream.final_state(task_id)
    assert ws.ended == "succeeded" and ws.state == upstream.final_state(task_id)


async def test_flapping_upstream_never_loses_the_final_state(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(request_timeout=0.3)
    upstream.simulator.faults.error_rate = 0.3
    upstream.simulator.faults.malformed_rate = 0.2
    tasks = [upstream.start_task(queue=0.2, duration=1.0) for _ in range(5)]
    for task_id in tasks:
        watcher = await watch_sse(http, relay.url, task_id)
        assert watcher.ended == "succeeded" and watcher.state is not None
        # The result is best effort (two tries); the final progress state is not.
        result = watcher.state.pop("result", None)
        assert watcher.state == upstream.final_state(task_id, with_result=False)
        assert result in (None, upstream.final_state(task_id)["result"])


async def test_refused_credentials_end_subscriptions_with_unauthorized(
    http: httpx.AsyncClient, make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    upstream.simulator.credentials = {"key-1": "right"}
    relay = make_relay(access_key_id="key-1", access_key_secret="wrong")
    task_id = upstream.start_task()
    watcher = await watch_sse(http, relay.url, task_id)
    assert [e["code"] for e in watcher.errors] == ["unauthorized"]
    assert watcher.errors[0]["retrying"] is False


async def test_pool_of_two_survives_a_hundred_subscribe_rounds(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay: ThreadServer = make_relay(upstream_concurrency=2, linger=0.0)
    upstream.simulator.faults.latency = 0.01
    for _ in range(100):
        task_id = upstream.start_task(queue=5)
        await visit(http, f"{relay.url}/v1/tasks/{task_id}/events")
    upstream.simulator.faults.latency = 0
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.ended == "succeeded"
