"""The server-to-server watch API: `POST`/`DELETE /v1/tasks/{taskId}/watch`, `GET /v1/watches`.

Who may call it (the API key, never a browser's token), which IDs it takes, and what a
watch does to the task's poll loop: keeps it polling with no browser, shares it with
browsers, counts against the loop cap, and survives a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.app import create_app
from relay.config import Settings
from relay.tokens import mint

from .clients import visit, wait_for
from .conftest import FAST, SimulatedUpstream
from .servers import ProcessServer, ThreadServer
from .test_webhooks import API_KEY, AUTH, metric

TOKEN_SECRET = "t" * 32


def api_settings(upstream: SimulatedUpstream, data_dir: Path, **overrides: Any) -> Settings:
    """A relay with the server API on and no webhooks: watches only keep their tasks polled."""
    return replace(
        FAST, upstream_url=upstream.url, api_key=API_KEY, data_dir=str(data_dir), **overrides
    )


@pytest.fixture
def api_relay(upstream: SimulatedUpstream, tmp_path: Path) -> Iterator[ThreadServer]:
    server = ThreadServer(create_app(api_settings(upstream, tmp_path))).start()
    yield server
    server.stop()


async def test_a_wrong_or_missing_key_gets_401_and_creates_no_loop(
    upstream: SimulatedUpstream, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = api_settings(upstream, tmp_path, token_secret=TOKEN_SECRET)
    relay = ThreadServer(create_app(settings)).start()
    try:
        task_id = upstream.start_task(queue=0, duration=30)
        browser_token = mint(TOKEN_SECRET, [task_id], 600)
        url = f"{relay.url}/v1/tasks/{task_id}/watch"
        refused = [
            {},
            {"Authorization": "Bearer wrong-key-0123456789"},
            {"Authorization": f"Basic {API_KEY}"},
            {"Authorization": API_KEY},
            {"Authorization": f"Bearer {API_KEY}x"},
            # A browser's subscription token is not the server's key.
            {"Authorization": f"Bearer {browser_token}"},
        ]
        for headers in refused:
            for method in ("POST", "DELETE"):
                response = await http.request(method, url, headers=headers)
                assert response.status_code == 401, (headers, response.text)
                assert response.json()["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        with_token = await http.post(f"{url}?token={browser_token}")
        assert with_token.status_code == 401
        listed = await http.get(f"{relay.url}/v1/watches", headers={"Authorization": "Bearer x"})
        assert listed.status_code == 401
        await asyncio.sleep(0.3)
        assert await metric(http, relay.url, "relay_poll_loops") == 0
        assert upstream.calls(task_id) == 0
    finally:
        relay.stop()


async def test_the_server_api_is_off_without_a_key(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    response = await http.post(f"{relay.url}/v1/tasks/{task_id}/watch", headers=AUTH)
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    assert "RELAY_API_KEY" in response.json()["message"]
    assert (await http.get(f"{relay.url}/v1/watches", headers=AUTH)).status_code == 401
    assert upstream.calls(task_id) == 0


@pytest.mark.parametrize(
    "segment",
    ["bad%20id", "a%2Fb", "x" * 129, "%C3%A9", "a%0Ab", "%2E%2E", "%2E", "a%2Fwatch", "a/b"],
)
async def test_invalid_ids_get_400_invalid_task_id(
    api_relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient, segment: str
) -> None:
    for method in ("POST", "DELETE"):
        response = await http.request(
            method, f"{api_relay.url}/v1/tasks/{segment}/watch", headers=AUTH
        )
        assert response.status_code == 400, (method, segment, response.text)
        assert response.json()["code"] == "invalid_task_id"
    assert sum(upstream.simulator.calls.values()) == 0
    assert (await http.get(f"{api_relay.url}/v1/watches", headers=AUTH)).json() == {"watches": []}


async def test_methods_other_than_the_routes_own_get_405(
    api_relay: ThreadServer, http: httpx.AsyncClient
) -> None:
    watch = await http.get(f"{api_relay.url}/v1/tasks/abc/watch", headers=AUTH)
    assert watch.status_code == 405 and watch.headers["allow"] == "POST, DELETE"
    for path in ("/v1/tasks/abc", "/v1/tasks/abc/events"):
        response = await http.post(f"{api_relay.url}{path}", headers=AUTH)
        assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    # A task called "watch" is a task like any other.
    assert (await http.get(f"{api_relay.url}/v1/tasks/watch")).status_code == 404


async def test_a_watch_keeps_polling_with_no_browser_and_is_idempotent(
    api_relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=0, duration=30)
    url = f"{api_relay.url}/v1/tasks/{task_id}/watch"
    first = await http.post(url, headers=AUTH)
    assert first.status_code == 202
    watch = first.json()
    assert set(watch) == {"taskId", "id", "createdAt", "expiresAt"}
    again = await http.post(url, headers=AUTH)
    assert again.status_code == 202 and again.json() == watch
    listed = await http.get(f"{api_relay.url}/v1/watches", headers=AUTH)
    assert listed.json() == {"watches": [watch]}
    # Well past the linger, with nobody subscribed: the task is still polled, by one loop.
    await asyncio.sleep(FAST.linger + 0.7)
    calls = upstream.calls(task_id)
    await asyncio.sleep(0.5)
    assert upstream.calls(task_id) >= calls + 3
    assert await metric(http, api_relay.url, "relay_poll_loops") == 1
    assert await metric(http, api_relay.url, "relay_watches") == 1
    # A browser shares the watch's loop.
    await visit(http, f"{api_relay.url}/v1/tasks/{task_id}/events")
    assert await metric(http, api_relay.url, "relay_poll_loops") == 1


async def test_delete_cancels_and_polling_stops(
    api_relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=0, duration=30)
    url = f"{api_relay.url}/v1/tasks/{task_id}/watch"
    assert (await http.post(url, headers=AUTH)).status_code == 202
    await wait_for(lambda: upstream.calls(task_id) > 0)
    assert (await http.delete(url, headers=AUTH)).status_code == 204
    assert (await http.delete(url, headers=AUTH)).status_code == 204  # idempotent too
    assert (await http.get(f"{api_relay.url}/v1/watches", headers=AUTH)).json() == {"watches": []}
    await asyncio.sleep(FAST.linger + 0.3)
    calls = upstream.calls(task_id)
    await asyncio.sleep(0.5)
    assert upstream.calls(task_id) == calls
    assert await metric(http, api_relay.url, "relay_poll_loops") == 0


async def test_watches_count_against_the_loop_cap(
    upstream: SimulatedUpstream, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    relay = ThreadServer(create_app(api_settings(upstream, tmp_path, max_loops=1))).start()
    try:
        held, other = (upstream.start_task(queue=0, duration=30) for _ in range(2))
        assert (await http.post(f"{relay.url}/v1/tasks/{held}/watch", headers=AUTH)).is_success
        full = await http.post(f"{relay.url}/v1/tasks/{other}/watch", headers=AUTH)
        assert full.status_code == 503 and full.json()["code"] == "overloaded"
        assert "retry-after" in full.headers
        # Browsers see the cap the watch takes, and the held task is still watchable.
        browser = await http.get(f"{relay.url}/v1/tasks/{other}/events")
        assert browser.status_code == 503
        assert (await http.post(f"{relay.url}/v1/tasks/{held}/watch", headers=AUTH)).is_success
        assert upstream.calls(other) == 0
    finally:
        relay.stop()


async def test_a_watch_ends_with_its_task_without_webhooks(
    api_relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    assert (
        await http.post(f"{api_relay.url}/v1/tasks/{task_id}/watch", headers=AUTH)
    ).status_code == 202

    async def listed() -> list[Any]:
        response = await http.get(f"{api_relay.url}/v1/watches", headers=AUTH)
        watches: list[Any] = response.json()["watches"]
        return watches

    async with asyncio.timeout(10):
        while await listed():
            await asyncio.sleep(0.1)
    state = await http.get(f"{api_relay.url}/v1/tasks/{task_id}")
    assert state.json() == upstream.final_state(task_id)


async def test_watches_survive_a_restart_and_polling_resumes(
    upstream: SimulatedUpstream, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = api_settings(upstream, tmp_path)
    task_id = upstream.start_task(queue=0, duration=60)
    relay = ThreadServer(create_app(settings)).start()
    try:
        watch = (await http.post(f"{relay.url}/v1/tasks/{task_id}/watch", headers=AUTH)).json()
    finally:
        relay.stop()
    calls = upstream.calls(task_id)
    relay = ThreadServer(create_app(settings)).start()
    try:
        listed = await http.get(f"{relay.url}/v1/watches", headers=AUTH)
        assert listed.json() == {"watches": [watch]}
        await wait_for(lambda: upstream.calls(task_id) >= calls + 3)
        assert await metric(http, relay.url, "relay_watches") == 1
    finally:
        relay.stop()


def test_two_relays_cannot_share_a_data_directory(tmp_path: Path) -> None:
    """Both would hold every watch and send every event: the second one stops at start."""
    args = ["serve", "--data-dir", str(tmp_path)]
    first = ProcessServer(args, env={"RELAY_API_KEY": API_KEY}).start()
    second = ProcessServer(args, env={"RELAY_API_KEY": API_KEY})
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            second.start()
        assert f"another relay uses the data directory {tmp_path}" in second.log()
        assert API_KEY not in second.log()
    finally:
        second.stop()
        first.stop()
