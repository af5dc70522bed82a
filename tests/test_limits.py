"""Connections above the relay's own cap are refused clearly; everyone else is unaffected."""

import asyncio
import json

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from .clients import watch_sse
from .conftest import RelayFactory, SimulatedUpstream


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
