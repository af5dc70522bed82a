"""Browsers on other sites: WebSocket upgrades checked by Origin, CORS only for listed origins."""

import json

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from .conftest import RelayFactory, SimulatedUpstream
from .servers import ThreadServer

ALLOWED = "https://app.example"
OTHER = "https://evil.example"


async def test_cross_site_upgrade_is_refused_with_403(relay: ThreadServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{relay.ws_url}/v1/ws", origin=OTHER):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403


async def test_listed_origin_may_open_a_websocket_and_others_may_not(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(allowed_origins=(ALLOWED,))
    task_id = upstream.start_task()
    async with websockets.connect(f"{relay.ws_url}/v1/ws", origin=ALLOWED) as socket:  # type: ignore[arg-type]
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        assert json.loads(await socket.recv())["type"] == "snapshot"
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{relay.ws_url}/v1/ws", origin=OTHER):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403


async def test_same_origin_upgrade_is_accepted_without_a_list(relay: ThreadServer) -> None:
    async with websockets.connect(f"{relay.ws_url}/v1/ws", origin=relay.url) as socket:  # type: ignore[arg-type]
        await socket.send(json.dumps({"type": "unsubscribe", "taskId": "abc"}))


async def test_cors_headers_on_streams_and_json_for_a_listed_origin_only(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(allowed_origins=(ALLOWED,))
    task_id = upstream.start_task(duration=3)
    urls = [
        f"{relay.url}/v1/tasks/{task_id}/events",
        f"{relay.url}/v1/events?taskId={task_id}",
        f"{relay.url}/v1/tasks/{task_id}",
    ]
    for url in urls:
        for origin, expected in ((ALLOWED, ALLOWED), (OTHER, None)):
            async with http.stream("GET", url, headers={"Origin": origin}) as response:
                assert response.status_code == 200, url
                assert response.headers.get("access-control-allow-origin") == expected, url
    preflight = await http.options(
        urls[0],
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "Last-Event-ID",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED


async def test_no_cors_headers_without_a_list(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    response = await http.get(f"{relay.url}/v1/tasks/{task_id}", headers={"Origin": ALLOWED})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
