"""relay.client against real relays: whole states, typed errors, tokens, timeouts, and
resuming across a dropped connection and a relay restart."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from itertools import pairwise
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from relay.app import create_app
from relay.client import (
    RelayClient,
    RelayError,
    RelayUnavailable,
    TaskFailed,
    TaskNotFound,
    TaskWatch,
    Unauthorized,
)
from relay.client.client import EventStreamDecoder, ServerEvent
from relay.tokens import mint

from .clients import Watcher, sse_events, wait_for
from .conftest import FAST as FAST_SETTINGS
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ProcessServer, ThreadServer, free_port

SECRET = "s" * 32
FAST = {"backoff_initial": 0.05, "backoff_max": 0.5}


async def follow(watch: TaskWatch) -> list[dict[str, Any]]:
    async with watch:
        return [state async for state in watch]


async def test_watch_yields_the_states_a_browser_rebuilds_then_stops_at_the_end(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=0.3, duration=1.5)
    browser = Watcher()

    async def rebuild() -> list[dict[str, Any]]:
        states: list[dict[str, Any]] = []
        url = f"{relay.url}/v1/tasks/{task_id}/events"
        async for event in sse_events(http, url, strict=True):
            browser.apply(event.event, event.data, int(event.id) if event.id else None)
            if event.event in ("snapshot", "patch"):
                states.append(browser.state or {})
        return states

    async with RelayClient(relay.url) as client:
        watch = client.watch(task_id)
        seen, expected = await asyncio.gather(follow(watch), rebuild())
    # Both joined one poll loop: one sequence of states, give or take the first.
    assert len(seen) >= 5
    assert seen == expected[-len(seen) :] or expected == seen[-len(expected) :]
    assert [state["status"] for state in seen[:1]] == ["waiting"]
    assert {state["status"] for state in seen} == {"waiting", "running", "succeeded"}
    assert all(a != b for a, b in pairwise(seen))
    assert seen[-1] == upstream.final_state(task_id)
    assert watch.ended == "succeeded" and watch.state == seen[-1]
    assert (watch.connections, watch.snapshots) == (1, 1)
    assert watch.seq is not None and watch.seq == browser.seq


async def test_wait_returns_the_final_state_with_its_result(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=0.8)
    async with RelayClient(relay.url) as client:
        final = await client.wait(task_id, timeout=10)
        assert final == upstream.final_state(task_id)
        assert final["result"]["images"] == [f"{upstream.url}/sim/images/{task_id}.svg"]
        # Later, from the ended task the relay still holds.
        assert await client.wait(task_id, timeout=5) == final
        assert await client.state(task_id) == final


async def test_a_failed_task_ends_the_watch_and_wait_raises_task_failed(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=0.8, fail=True)
    async with RelayClient(relay.url) as client:
        watch = client.watch(task_id)
        states = await follow(watch)
        assert watch.ended == "failed"
        assert states[-1] == upstream.final_state(task_id)
        with pytest.raises(TaskFailed) as failed:
            await client.wait(task_id, timeout=10)
    assert failed.value.state == upstream.final_state(task_id)
    assert failed.value.code == "task_failed" and "CUDA out of memory" in failed.value.message
    assert isinstance(failed.value, RelayError)


async def test_an_unknown_task_raises_task_not_found_on_the_stream_and_after(
    relay: ThreadServer,
) -> None:
    # The same words whichever way the client learns it (and as `relay watch` prints them).
    said = "upstream does not know task no-such-task"
    async with RelayClient(relay.url) as client:
        # First as the stream's final error event, then as the relay's 404 for a known unknown.
        for status in (None, 404):
            with pytest.raises(TaskNotFound) as raised:
                await client.wait("no-such-task", timeout=10)
            assert (raised.value.code, raised.value.status) == ("task_not_found", status)
            assert raised.value.task_id == "no-such-task" and not raised.value.retrying
            assert raised.value.message == said
        with pytest.raises(TaskNotFound) as raised:
            await client.state("no-such-task")
        assert raised.value.message == said
        with pytest.raises(TaskNotFound) as raised:
            await client.state("never-seen-task")
        assert raised.value.message == "upstream does not know task never-seen-task"


async def test_an_invalid_task_id_is_a_relay_error_and_never_changes_the_route(
    relay: ThreadServer,
) -> None:
    async with RelayClient(relay.url) as client:
        for task_id in ("a/events", "../healthz", "x" * 129):
            with pytest.raises(RelayError) as raised:
                await client.wait(task_id, timeout=5)
            assert type(raised.value) is RelayError
            assert (raised.value.code, raised.value.status) == ("invalid_task_id", 400)


async def test_wait_raises_timeout_error_and_closes_its_stream(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task(queue=30, duration=30)
    async with RelayClient(relay.url) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.wait(task_id, timeout=0.5)
        assert time.monotonic() - started < 3
        hub = relay.app.state.relay.hub
        deadline = time.monotonic() + 5
        while relay.call(lambda: hub.subscriber_count):
            assert time.monotonic() < deadline, "the stream stayed open"
            await asyncio.sleep(0.05)


async def test_tokens_on_the_client_or_per_call(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(token_secret=SECRET)
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    other = upstream.start_task(queue=0.1, duration=0.5)
    token = mint(SECRET, [task_id], 60)
    async with RelayClient(relay.url) as anonymous:
        with pytest.raises(Unauthorized) as raised:
            await anonymous.wait(task_id, timeout=5)
        assert (raised.value.code, raised.value.status) == ("unauthorized", 401)
        assert (await anonymous.wait(task_id, timeout=10, token=token))["status"] == "succeeded"
    async with RelayClient(relay.url, token=token) as client:
        assert (await client.wait(task_id, timeout=10))["status"] == "succeeded"
        assert (await client.state(task_id))["status"] == "succeeded"
        with pytest.raises(Unauthorized, match="does not cover"):
            await client.wait(other, timeout=5)
        # A call's own token wins over the client's.
        final = await client.wait(other, timeout=10, token=mint(SECRET, [other], 60))
        assert final == upstream.final_state(other)
    assert upstream.calls(other) > 0


async def test_a_given_http_client_is_used_and_left_open(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    async with RelayClient(relay.url + "/", http=http) as client:
        assert client.http is http
        assert (await client.wait(task_id, timeout=10))["status"] == "succeeded"
    assert not http.is_closed
    assert (await http.get(f"{relay.url}/healthz")).status_code == 200


async def test_a_watch_resumes_from_a_given_position(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=1.0)
    async with RelayClient(relay.url) as client:
        first = client.watch(task_id)
        async with first:
            await anext(first)
            await anext(first)
        assert first.ended is None and first.seq is not None and first.state is not None
        resumed = client.watch(task_id, seq=first.seq, state=first.state)
        states = await follow(resumed)
        assert states[-1] == upstream.final_state(task_id)
        assert resumed.snapshots == 0  # patches from where the first watch stopped
        # At the ended task's last state: the relay's 204, and nothing to hand over.
        done = client.watch(task_id, seq=resumed.seq, state=resumed.state)
        assert await follow(done) == []
        assert done.ended == "succeeded" and done.state == states[-1]
        with pytest.raises(ValueError):
            client.watch(task_id, seq=1)


class CuttingProxy:
    """A TCP proxy in front of a relay, whose open connections the test can cut."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[None]] = []
        self.url = ""

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()
        self.cut()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        assert current is not None
        self.handlers.append(current)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


async def test_a_dropped_connection_resumes_with_patches_not_a_second_snapshot(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=3.0)
    cuts = 0
    async with CuttingProxy(relay.port) as proxy, RelayClient(proxy.url, **FAST) as client:
        watch = client.watch(task_id)
        states: list[dict[str, Any]] = []
        async with watch:
            async for state in watch:
                states.append(state)
                # Cut the first and the second connection, each once it brought a state.
                # (States the client had already read may still come after a cut.)
                if cuts < 2 and watch.connections == cuts + 1:
                    proxy.cut()
                    cuts += 1
    assert states[-1] == upstream.final_state(task_id)
    assert cuts >= 1 and watch.connections == cuts + 1
    assert watch.snapshots == 1
    assert all(a != b for a, b in pairwise(states))


async def follow_across(watch: TaskWatch, restart_after: int, restart: Any) -> list[dict[str, Any]]:
    states: list[dict[str, Any]] = []
    async with watch:
        async for state in watch:
            states.append(state)
            if len(states) == restart_after:
                await asyncio.to_thread(restart)
    return states


async def test_resume_across_a_relay_restart(upstream: SimulatedUpstream) -> None:
    """A relay alone forgets everything when it restarts: the client resumes with the
    position it holds, takes the new relay's snapshot in place of its state without
    handing over a state twice, and ends with the final state."""
    args = ["serve", "--upstream", upstream.url, "--signing", "none", "--poll-interval", "0.1"]
    servers = [ProcessServer(args).start()]
    task_id = upstream.start_task(queue=0.1, duration=3.0)

    def restart() -> None:
        servers[0].kill()
        servers.append(ProcessServer(args, port=servers[0].port).start())

    try:
        async with RelayClient(servers[0].url, **FAST) as client:
            watch = client.watch(task_id)
            seq_before: list[int | None] = []
            states = await follow_across(
                watch, 3, lambda: (seq_before.append(watch.seq), restart())
            )
    finally:
        for server in servers:
            server.stop()
    assert len(servers) == 2
    assert states[-1] == upstream.final_state(task_id)
    assert watch.ended == "succeeded" and watch.connections == 2
    assert watch.snapshots == 2  # the new relay did not know the old one's numbers
    assert seq_before[0] is not None and watch.seq is not None and watch.seq > seq_before[0]
    assert all(a != b for a, b in pairwise(states))
    progress = [state["progress"] for state in states]
    assert progress == sorted(progress)


async def test_resume_across_a_cluster_relay_restart_continues_with_patches(
    upstream: SimulatedUpstream, redis_url: str
) -> None:
    """With Redis the history outlives the process: after the restart the client goes on
    with patches from where it was, not a second snapshot."""
    args = ["serve", "--upstream", upstream.url, "--signing", "none", "--redis", redis_url]
    args += ["--poll-interval", "0.1", "--lease-ttl", "1"]
    env = {"RELAY_ACCESS_KEY_ID": "node", "RELAY_ACCESS_KEY_SECRET": "cluster-test-secret"}
    servers = [ProcessServer(args, env=env).start()]
    task_id = upstream.start_task(queue=0.1, duration=4.0)

    def restart() -> None:
        servers[0].kill()
        servers.append(ProcessServer(args, port=servers[0].port, env=env).start())

    try:
        async with RelayClient(servers[0].url, **FAST) as client:
            watch = client.watch(task_id)
            states = await follow_across(watch, 3, restart)
    finally:
        for server in servers:
            server.stop()
    assert states[-1] == upstream.final_state(task_id)
    assert watch.ended == "succeeded"
    assert (watch.connections, watch.snapshots) == (2, 1)
    assert all(a != b for a, b in pairwise(states))


class ScriptedRelay:
    """A stand-in relay with scripted answers, to time the client's waits: a 503 with
    Retry-After, then a stream that sets `retry:` and closes early, then the end."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, dict[str, str]]] = []
        self.app = Starlette(routes=[Route("/v1/tasks/{task_id}/events", self.events)])

    async def events(self, request: Request) -> Response:
        self.requests.append((time.monotonic(), dict(request.headers)))
        if len(self.requests) == 1:
            body = {"code": "overloaded", "message": "full", "retrying": True}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        if len(self.requests) == 2:
            chunks = [
                "retry: 1500\n\n",
                ": ping\n\n",
                'id: 5\nevent: snapshot\ndata: {"status":"running","progress":0.5,\r\n',
                'data: "state":{"step":1}}\r\n\r\n',
                'event: error\ndata: {"code":"upstream_unavailable","message":"down",',
                '"retrying":true}\n\n',
            ]
        else:
            chunks = [
                'id: 6\nevent: patch\ndata: {"status":"succeeded","progress":1,"state":null}\n\n',
                'id: 6\nevent: end\ndata: {"status":"succeeded"}\n\n',
            ]

        async def body_chunks() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk.encode()

        return StreamingResponse(body_chunks(), media_type="text/event-stream")


async def test_the_client_waits_out_retry_after_and_the_streams_retry_hint() -> None:
    scripted = ScriptedRelay()
    server = ThreadServer(scripted.app).start()
    try:
        async with RelayClient(server.url, **FAST) as client:
            watch = client.watch("task-a")
            states = await follow(watch)
    finally:
        server.stop()
    assert states == [
        {"status": "running", "progress": 0.5, "state": {"step": 1}},
        {"status": "succeeded", "progress": 1},
    ]
    assert watch.ended == "succeeded" and watch.problem is None
    (first, _), (second, headers), (third, resumed) = scripted.requests
    # At least what the server asked, and not much more (jitter adds up to a fifth).
    assert 1.0 <= second - first < 3  # Retry-After: 1
    assert 1.5 <= third - second < 4  # retry: 1500
    assert "last-event-id" not in headers and resumed["last-event-id"] == "5"
    assert resumed["accept"] == "text/event-stream"


async def test_give_up_after_raises_relay_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with RelayClient(url, give_up_after=0.5, **FAST) as client:
        started = time.monotonic()
        with pytest.raises(RelayUnavailable) as raised:
            await client.wait("task-a", timeout=10)
    assert time.monotonic() - started < 5
    assert raised.value.code == "relay_unavailable" and url in raised.value.message


async def test_give_up_after_is_kept_to_whatever_the_backoff() -> None:
    """The last attempt is made when give_up_after runs out, not a long backoff later."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    problems: list[dict[str, Any] | None] = []
    async with RelayClient(url, give_up_after=2, backoff_initial=10, backoff_max=30) as client:
        started = time.monotonic()
        with pytest.raises(RelayUnavailable):
            watch = client.watch("task-a", on_problem=lambda w: problems.append(w.problem))
            async for _ in watch:
                pass
    assert 2 <= time.monotonic() - started < 3
    # Told once, at the first attempt, while no stream could be opened.
    assert len(problems) == 1 and problems[0] is not None
    assert problems[0]["code"] == "relay_unavailable" and problems[0]["retrying"] is True
    assert url in problems[0]["message"]


async def test_on_problem_tells_a_retried_problem_and_its_end(upstream: SimulatedUpstream) -> None:
    """The upstream is down, then up: the watch says so before any state, then carries on."""
    port = free_port()
    relay = ThreadServer(
        create_app(replace(FAST_SETTINGS, upstream_url=f"http://127.0.0.1:{port}", backoff_max=0.2))
    ).start()
    seen: list[tuple[str | None, str | None]] = []

    def on_problem(watch: TaskWatch) -> None:
        code = watch.problem["code"] if watch.problem is not None else None
        status = watch.state["status"] if watch.state is not None else None
        seen.append((code, status))

    task_id = upstream.start_task(queue=0.1, duration=0.5)
    try:
        async with RelayClient(relay.url) as client:
            watch = client.watch(task_id, on_problem=on_problem)
            states = aiter(watch)
            waiting = asyncio.ensure_future(anext(states))
            await wait_for(lambda: seen == [("upstream_unavailable", None)])
            assert not waiting.done()
            # The simulator comes up on the port the relay polls.
            late = ThreadServer(upstream.simulator.app, port=port).start()
            try:
                first = await asyncio.wait_for(waiting, 10)
                async for _ in states:
                    pass
            finally:
                late.stop()
    finally:
        relay.stop()
    assert first["taskId"] == task_id
    assert seen == [("upstream_unavailable", None), (None, first["status"])]
    assert watch.ended == "succeeded" and watch.problem is None


def test_the_event_stream_decoder_reads_the_whole_grammar() -> None:
    decoder = EventStreamDecoder()
    stream = (
        '\ufeff: comment\r\nretry: 2500\r\nid: 7\r\nevent: patch\r\ndata: {"a":\r\n'
        "data:1}\r\n\r\nid: bad\0id\nevent: snapshot\ndata: x\n\ndata: no name\n\n"
        "retry: soon\nevent: cut\ndata: never dispatched"
    ).encode()
    events: list[ServerEvent] = []
    for i in range(len(stream)):  # one byte at a time: CRLF and UTF-8 split across chunks
        events += decoder.feed(stream[i : i + 1])
    assert events == [
        ServerEvent("patch", '{"a":\n1}', "7"),
        ServerEvent("snapshot", "x", None),
        ServerEvent("message", "no name", None),
    ]
    assert decoder.retry == 2500
    assert json.loads(events[0].data) == {"a": 1}
