"""With RELAY_TOKEN_SECRET set, only a valid token naming the task opens a subscription."""

import asyncio
import json
import time
from typing import Any

import httpx
import jwt
import pytest
import websockets

from relay.cli import main
from relay.config import Settings, load_settings
from relay.sse import parse_stream_id
from relay.tokens import grant, mint

from .clients import Watcher, sse_events
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ProcessServer

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"


def bad_tokens(task_id: str) -> dict[str, str | None]:
    now = time.time()
    return {
        "missing": None,
        "expired": mint(SECRET, [task_id], ttl=60, now=now - 120),
        "forged": mint("another-secret-another-secret-another", [task_id], ttl=60),
        "wrong task": mint(SECRET, ["some-other-task"], ttl=60),
        "no exp": jwt.encode({"tasks": [task_id]}, SECRET, algorithm="HS256"),
        "garbage": "not.a.jwt",
    }


def with_token(url: str, token: str | None) -> str:
    return url if token is None else f"{url}{'&' if '?' in url else '?'}token={token}"


async def recv(socket: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(socket.recv(), 10))  # type: ignore[no-any-return]


async def watch(http: httpx.AsyncClient, url: str) -> Watcher:
    watcher = Watcher()
    async for event in sse_events(http, url):
        watcher.apply(event.event, event.data, int(event.id) if event.id else None)
    return watcher


async def test_sse_stream_without_a_valid_token_gets_401_and_nothing_is_polled(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(token_secret=SECRET)
    task_id = upstream.start_task()
    for name, token in bad_tokens(task_id).items():
        response = await http.get(with_token(f"{relay.url}/v1/tasks/{task_id}/events", token))
        assert response.status_code == 401, name
        body = response.json()
        assert body == {"code": "unauthorized", "message": body["message"], "retrying": False}
        assert token is None or token not in response.text
    assert upstream.calls(task_id) == 0


def test_tokens_from_a_backend_whose_clock_runs_ahead_or_that_names_an_audience_are_accepted() -> (
    None
):
    ahead = time.time() + 20
    claims = {"tasks": ["t1"], "iat": int(ahead), "nbf": int(ahead), "exp": int(ahead + 60)}
    assert grant(SECRET, jwt.encode(claims, SECRET, algorithm="HS256")).refusal("t1") is None
    claims = {"tasks": ["t1"], "aud": "comfy-relay", "exp": int(time.time() + 60)}
    assert grant(SECRET, jwt.encode(claims, SECRET, algorithm="HS256")).refusal("t1") is None
    too_early = {"tasks": ["t1"], "nbf": int(time.time() + 300), "exp": int(time.time() + 600)}
    assert grant(SECRET, jwt.encode(too_early, SECRET, algorithm="HS256")).refusal("t1")


async def test_sse_stream_with_a_token_for_the_task_runs_to_the_end(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(token_secret=SECRET)
    task_id = upstream.start_task()
    token = mint(SECRET, ["another-task", task_id], ttl=60)
    watcher = await watch(http, f"{relay.url}/v1/tasks/{task_id}/events?token={token}")
    assert watcher.ended == "succeeded"
    assert watcher.state == upstream.final_state(task_id)


async def test_multiplexed_stream_refuses_only_the_tasks_the_token_does_not_cover(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(token_secret=SECRET)
    covered, other = upstream.start_task(), upstream.start_task()
    token = mint(SECRET, [covered], ttl=60)
    url = f"{relay.url}/v1/events?taskId={covered}&taskId={other}&token={token}"
    seen: dict[str, Watcher] = {covered: Watcher(), other: Watcher()}
    async for event in sse_events(http, url):
        task_id = event.data["taskId"]
        seen[task_id].apply(event.event, event.data["data"], parse_stream_id(event.id).get(task_id))
    assert [e["code"] for e in seen[other].errors] == ["unauthorized"]
    assert seen[other].state is None
    assert seen[covered].ended == "succeeded"
    assert seen[covered].state == upstream.final_state(covered)
    assert upstream.calls(other) == 0


async def test_multiplexed_stream_refuses_tasks_its_token_does_not_name(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(token_secret=SECRET)
    tasks = [upstream.start_task(), upstream.start_task()]
    url = f"{relay.url}/v1/events?taskId={tasks[0]}&taskId={tasks[1]}"
    response = await http.get(url)
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    # One task allowed: the stream opens, and the other gets its own error event.
    token = mint(SECRET, [tasks[0]], ttl=60)
    events = [event async for event in sse_events(http, f"{url}&token={token}")]
    assert ("error", tasks[1], "unauthorized") in [
        (e.event, e.data["taskId"], e.data["data"].get("code")) for e in events
    ]
    assert events[-1].event == "end" and events[-1].data["taskId"] == tasks[0]
    assert upstream.calls(tasks[1]) == 0


async def test_websocket_subscribe_needs_a_token_naming_the_task(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(token_secret=SECRET)
    task_id = upstream.start_task()
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        for name, token in bad_tokens(task_id).items():
            message: dict[str, Any] = {"type": "subscribe", "taskId": task_id}
            if token is not None:
                message["token"] = token
            await socket.send(json.dumps(message))
            reply = await recv(socket)
            assert reply["type"] == "error" and reply["taskId"] == task_id, name
            assert reply["data"]["code"] == "unauthorized", name
            assert reply["data"]["retrying"] is False
        assert upstream.calls(task_id) == 0
        token = mint(SECRET, [task_id], ttl=60)
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id, "token": token}))
        frames = [await recv(socket)]
        while frames[-1]["type"] != "end":
            frames.append(await recv(socket))
    assert frames[0]["type"] == "snapshot"


async def test_task_state_needs_a_token_too(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(token_secret=SECRET)
    task_id = upstream.start_task()
    refused = await http.get(f"{relay.url}/v1/tasks/{task_id}")
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthorized"
    assert upstream.calls(task_id) == 0
    token = mint(SECRET, [task_id], ttl=60)
    answered = await http.get(f"{relay.url}/v1/tasks/{task_id}?token={token}")
    assert answered.status_code == 200
    assert answered.json()["taskId"] == task_id
    invalid = await http.get(f"{relay.url}/v1/tasks/bad.id")
    assert invalid.status_code == 400


async def test_without_a_secret_no_token_is_needed(
    relay: Any, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=0.3)
    watcher = await watch(http, f"{relay.url}/v1/tasks/{task_id}/events")
    assert watcher.ended == "succeeded"


def test_token_command_prints_a_token_for_the_tasks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_TOKEN_SECRET", SECRET)
    main(["token", "task-a", "task_b", "--ttl", "600"])
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["tasks"] == ["task-a", "task_b"]
    assert abs(claims["exp"] - (time.time() + 600)) < 5


def test_token_command_without_a_secret_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAY_TOKEN_SECRET", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["token", "task-a"])
    assert exited.value.code == 2
    assert "RELAY_TOKEN_SECRET" in capsys.readouterr().err


def test_secret_is_read_from_the_environment_and_kept_out_of_repr() -> None:
    settings = load_settings({}, {"RELAY_TOKEN_SECRET": SECRET})
    assert settings.token_secret == SECRET
    assert SECRET not in repr(settings)
    assert Settings().token_secret is None


def test_a_short_secret_stops_the_relay(capsys: pytest.CaptureFixture[str]) -> None:
    server = ProcessServer(["serve"], env={"RELAY_TOKEN_SECRET": "short"})
    with pytest.raises(RuntimeError, match="RELAY_TOKEN_SECRET must be at least 32 bytes"):
        server.start()


async def test_tokens_and_the_secret_never_reach_the_log(http: httpx.AsyncClient) -> None:
    server = ProcessServer(
        ["serve", "--log-level", "debug"], env={"RELAY_TOKEN_SECRET": SECRET}
    ).start()
    try:
        created = await http.post(f"{server.url}/sim/tasks", json={"queue": 0.1, "duration": 0.5})
        task_id = created.json()["taskId"]
        token = mint(SECRET, [task_id], ttl=60)
        expired = mint(SECRET, [task_id], ttl=60, now=time.time() - 120)
        assert (await http.get(f"{server.url}/v1/tasks/{task_id}?token={token}")).is_success
        bad = await http.get(f"{server.url}/v1/tasks/{task_id}/events?token={expired}")
        assert bad.status_code == 401
        watcher = await watch(http, f"{server.url}/v1/tasks/{task_id}/events?token={token}")
        assert watcher.ended is not None
        async with websockets.connect(f"{server.ws_url}/v1/ws") as socket:
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id, "token": token}))
            assert (await recv(socket))["type"] in ("snapshot", "end")
    finally:
        server.stop()
    log = server.log()
    assert "comfy-relay" in log
    for secret in (SECRET, token, expired, token.split(".")[2]):
        assert secret not in log
