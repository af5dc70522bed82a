"""Connections above the relay's own cap are refused clearly; everyone else is unaffected."""

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from .clients import watch_sse, watch_ws
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ProcessServer


async def recv(socket: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(socket.recv(), 10))  # type: ignore[no-any-return]


async def test_connections_past_the_cap_get_503_and_health_still_answers(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(max_connections=2)
    task_id = upstream.start_task(queue=0.3, duration=1.5)
    url = f"{relay.url}/v1/tasks/{task_id}/events"
    async with (
        http.stream("GET", url) as first,
        websockets.connect(f"{relay.ws_url}/v1/ws") as socket,
    ):
        lines = first.aiter_lines()
        while not (await anext(lines)).startswith("event: snapshot"):
            pass
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        assert json.loads(await socket.recv())["type"] == "snapshot"

        refused = await http.get(url)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert refused.json()["code"] == "overloaded"
        with pytest.raises(InvalidStatus) as upgrade:
            async with websockets.connect(f"{relay.ws_url}/v1/ws"):
                pass
        assert upgrade.value.response.status_code == 503
        assert (await http.get(f"{relay.url}/healthz")).status_code == 200

        # The connections already open are unaffected.
        async for line in lines:
            if line.startswith("event: end"):
                break
    # Room again once the server has seen those two close.
    for _ in range(100):
        if (await http.get(f"{relay.url}/v1/tasks/{task_id}")).status_code != 503:
            break
        await asyncio.sleep(0.05)
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.ended == "succeeded"


async def test_subscriptions_past_the_websocket_cap_get_too_many_tasks(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(max_ws_subscriptions=2)
    tasks = [upstream.start_task(duration=3) for _ in range(3)]
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        for task_id in tasks:
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        frames = [await recv(socket) for _ in range(3)]
        refusals = [f for f in frames if f["type"] == "error"]
        assert [(f["taskId"], f["data"]["code"]) for f in refusals] == [
            (tasks[2], "too_many_tasks")
        ]
        assert upstream.calls(tasks[2]) == 0
        # Room again after an unsubscribe.
        await socket.send(json.dumps({"type": "unsubscribe", "taskId": tasks[0]}))
        await socket.send(json.dumps({"type": "subscribe", "taskId": tasks[2]}))
        while (frame := await recv(socket))["taskId"] != tasks[2]:
            pass
        assert frame["type"] == "snapshot"


async def test_oversized_frame_closes_1009_and_other_clients_carry_on(
    http: httpx.AsyncClient,
) -> None:
    server = ProcessServer(["serve"], env={"RELAY_WS_MAX_SIZE": "1024"}).start()
    try:
        created = await http.post(f"{server.url}/sim/tasks", json={"queue": 0.2, "duration": 3})
        task_id = created.json()["taskId"]
        other = asyncio.create_task(watch_ws(server.ws_url, task_id))
        async with websockets.connect(f"{server.ws_url}/v1/ws") as socket:
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
            assert (await recv(socket))["type"] == "snapshot"
            await socket.send(json.dumps({"type": "subscribe", "taskId": "x" * 2000}))
            with pytest.raises(ConnectionClosedError) as closed:
                while True:
                    await recv(socket)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        async with websockets.connect(f"{server.ws_url}/v1/ws") as socket:
            await socket.send(json.dumps({"type": "subscribe", "taskId": "y" * 900}))
            assert (await recv(socket))["data"]["code"] == "invalid_task_id"
        watcher = await asyncio.wait_for(other, 30)
        assert watcher.ended is not None and not watcher.errors
    finally:
        server.stop()


async def test_subscriptions_that_need_a_loop_past_the_cap_get_overloaded(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(max_loops=1)
    running, refused = upstream.start_task(duration=3), upstream.start_task(duration=3)
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        await socket.send(json.dumps({"type": "subscribe", "taskId": running}))
        assert (await recv(socket))["type"] == "snapshot"

        for url in (
            f"{relay.url}/v1/tasks/{refused}/events",
            f"{relay.url}/v1/events?taskId={running}&taskId={refused}",
        ):
            response = await http.get(url)
            assert response.status_code == 503, url
            assert response.headers["retry-after"] == "5"
            assert response.json() == {
                "code": "overloaded",
                "message": response.json()["message"],
                "retrying": True,
            }
        await socket.send(json.dumps({"type": "subscribe", "taskId": refused}))
        while (frame := await recv(socket))["taskId"] != refused:
            pass
        assert frame["type"] == "error"
        assert frame["data"]["code"] == "overloaded" and frame["data"]["retrying"] is True
        assert upstream.calls(refused) == 0

        # A task that already has a loop takes more subscribers.
        watcher = await watch_sse(http, relay.url, running)
        assert watcher.ended == "succeeded"
