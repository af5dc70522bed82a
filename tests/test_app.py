"""The JSON endpoints, metrics, static files, and the secret that must never leave the server."""

import asyncio
import json
import signal
import time

import httpx
import pytest
import websockets

from relay.simulator import Simulator

from .clients import sse_events, watch_sse, watch_ws
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ProcessServer, ThreadServer

SECRET = "Sk-very-secret-0123456789abcdef"


async def test_healthz(relay: ThreadServer, http: httpx.AsyncClient) -> None:
    response = await http.get(f"{relay.url}/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_task_state_comes_from_the_running_loop(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    watcher = await watch_sse(http, relay.url, task_id)
    calls = upstream.calls(task_id)
    response = await http.get(f"{relay.url}/v1/tasks/{task_id}")
    assert response.status_code == 200
    assert response.json() == watcher.state
    assert response.headers["x-relay-seq"] == str(watcher.seq)
    assert upstream.calls(task_id) == calls


async def test_task_state_without_a_loop_is_one_call_for_many_requests(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    upstream.simulator.faults.latency = 0.3
    task_id = upstream.start_task(queue=5)
    responses = await asyncio.gather(
        *[http.get(f"{relay.url}/v1/tasks/{task_id}") for _ in range(100)]
    )
    assert {r.status_code for r in responses} == {200}
    assert all(r.json()["status"] == "waiting" for r in responses)
    assert upstream.calls(task_id) == 1


async def test_task_state_errors(relay: ThreadServer, http: httpx.AsyncClient) -> None:
    missing = await http.get(f"{relay.url}/v1/tasks/unknown-task")
    assert missing.status_code == 404 and missing.json()["code"] == "task_not_found"
    invalid = await http.get(f"{relay.url}/v1/tasks/bad%20id")
    assert invalid.status_code == 400 and invalid.json()["code"] == "invalid_task_id"


async def test_metrics_count_loops_subscribers_calls_and_messages(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=5)
    url = f"{relay.url}/v1/tasks/{task_id}/events"
    async with http.stream("GET", url) as response:
        lines = response.aiter_lines()  # held, so the stream stays open while we look
        while not (await anext(lines)).startswith("event: snapshot"):
            pass
        text = (await http.get(f"{relay.url}/metrics")).text
    assert "relay_poll_loops 1.0" in text
    assert 'relay_subscribers{transport="sse"} 1.0' in text, [
        line for line in text.splitlines() if line.startswith("relay_subscribers")
    ]
    assert 'relay_upstream_calls_total{outcome="ok"}' in text
    assert 'relay_messages_pushed_total{transport="sse"} 1.0' in text


async def test_demo_page_and_client_are_served(
    relay: ThreadServer, http: httpx.AsyncClient
) -> None:
    page = await http.get(f"{relay.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    client = await http.get(f"{relay.url}/static/relay-client.js")
    assert client.status_code == 200 and "export" in client.text


async def test_secret_never_leaves_the_server(http: httpx.AsyncClient) -> None:
    simulator = Simulator(fail_rate=0, credentials={"AKID-test": SECRET})
    upstream = ThreadServer(simulator.app).start()
    env = {"RELAY_ACCESS_KEY_ID": "AKID-test", "RELAY_ACCESS_KEY_SECRET": SECRET}
    relay = ProcessServer(
        ["serve", "--upstream", upstream.url, "--poll-interval", "0.1", "--log-level", "debug"],
        env=env,
    ).start()
    seen: list[str] = []
    try:
        task_id = simulator.start_task(queue=0.2, duration=1.0).task_id
        sse = await watch_sse(http, relay.url, task_id)
        ws = await watch_ws(relay.ws_url, task_id)
        assert sse.ended == ws.ended == "succeeded"
        assert simulator.refused == {}
        for path in [
            "/",
            "/static/relay-client.js",
            "/metrics",
            "/healthz",
            f"/v1/tasks/{task_id}",
            "/v1/tasks/unknown",
        ]:
            response = await http.get(relay.url + path)
            seen.append(str(response.headers) + response.text)
        async with http.stream("GET", f"{relay.url}/v1/tasks/{task_id}/events") as response:
            seen.append(str(response.headers) + (await response.aread()).decode())
        seen.append(json.dumps(sse.events) + json.dumps(ws.events))
    finally:
        relay.stop()
        upstream.stop()
    seen.append(relay.log())
    for text in seen:
        assert SECRET not in text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_signal_closes_open_streams_and_exits_promptly(
    upstream: SimulatedUpstream, http: httpx.AsyncClient, signum: int
) -> None:
    relay = ProcessServer(
        ["serve", "--upstream", upstream.url, "--signing", "none", "--poll-interval", "0.2"]
    ).start()
    task_id = upstream.start_task(queue=30, duration=30)
    lines: list[str] = []

    async def read_sse() -> None:
        async with http.stream("GET", f"{relay.url}/v1/tasks/{task_id}/events") as response:
            async for line in response.aiter_lines():
                lines.append(line)

    reader = asyncio.create_task(read_sse())
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        await socket.recv()
        while not any(line.startswith("event: snapshot") for line in lines):
            await asyncio.sleep(0.05)
        started = time.monotonic()
        relay.signal(signum)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    await socket.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        await asyncio.wait_for(reader, 5)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert relay.wait(5) in (0, -signum)
    assert time.monotonic() - started < 5
    assert "Application shutdown complete" in relay.log()
    assert "Traceback" not in relay.log()
    assert any(line.startswith("retry:") for line in lines), lines


async def test_task_state_carries_its_seq_whenever_the_relay_numbered_it(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(ended_ttl=30.0)
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    watcher = await watch_sse(http, relay.url, task_id)
    assert relay.app.state.relay.hub.loop_count == 0
    kept = await http.get(f"{relay.url}/v1/tasks/{task_id}")
    assert kept.headers["X-Relay-Seq"] == str(watcher.seq)
    assert kept.json() == watcher.state

    # A task no loop ever watched is read from the upstream, and has no number yet.
    other = upstream.start_task(queue=5, duration=5)
    answer = await http.get(f"{relay.url}/v1/tasks/{other}")
    assert answer.status_code == 200 and answer.json()["status"] == "waiting"
    assert "X-Relay-Seq" not in answer.headers


@pytest.mark.parametrize("bad", ["bad.id", "x" * 300, "y" * 10_000], ids=["short", "300", "10k"])
async def test_a_bad_task_id_is_echoed_by_one_rule_on_every_transport(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient, bad: str
) -> None:
    """The message quotes the ID cut the same way everywhere; where an error names its task
    (`taskId`, many-task stream and WebSocket), the ID is cut the same way too."""
    echoed = bad if len(bad) <= 256 else bad[:256] + "..."
    single = await http.get(f"{relay.url}/v1/tasks/{bad}/events")
    assert single.status_code == 400 and single.json()["code"] == "invalid_task_id"
    message = single.json()["message"]
    assert len(message) < 200

    good = upstream.start_task(queue=0.1, duration=0.3)
    url = f"{relay.url}/v1/events?taskId={good}&taskId={bad}"
    async for event in sse_events(http, url):
        assert event.event == "error"
        assert event.data == {
            "taskId": echoed,
            "data": {"code": "invalid_task_id", "message": message, "retrying": False},
        }
        break

    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        await socket.send(json.dumps({"type": "subscribe", "taskId": bad}))
        reply = json.loads(await asyncio.wait_for(socket.recv(), 5))
    assert reply == {
        "type": "error",
        "taskId": echoed,
        "data": {"code": "invalid_task_id", "message": message, "retrying": False},
    }
