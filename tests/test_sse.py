import asyncio
import time

import httpx

from .clients import Watcher, sse_events, wait_for, watch_sse
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ThreadServer


async def test_stream_starts_with_snapshot_and_ends_with_end(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.events[0][0] == "snapshot"
    assert watcher.events[-1] == ("end", {"status": "succeeded"}, watcher.seq)
    assert [kind for kind, _, _ in watcher.events[1:-1]] == ["patch"] * (len(watcher.events) - 2)
    assert watcher.state == upstream.final_state(task_id)


async def test_sequence_numbers_grow_by_one_from_the_clock(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    started_ms = time.time() * 1000
    watcher = await watch_sse(http, relay.url, task_id)
    seqs = [seq for kind, _, seq in watcher.events if kind != "end"]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert started_ms - 1000 <= seqs[0] <= time.time() * 1000


async def test_response_headers_keep_proxies_from_buffering(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    url = f"{relay.url}/v1/tasks/{task_id}/events"
    async with http.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["content-type"].startswith("text/event-stream")


async def test_idle_stream_gets_keep_alive_comments(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(ping_interval=0.2)
    task_id = upstream.start_task(queue=5, duration=5)
    comments = 0
    async with http.stream("GET", f"{relay.url}/v1/tasks/{task_id}/events") as response:
        async for line in response.aiter_lines():
            comments += line.startswith(":")
            if comments >= 2:
                break
    assert comments >= 2


async def test_invalid_task_id_is_refused_before_any_upstream_call(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    for bad in ["has space", "x" * 129, "semi;colon", "dot.dot", "%C3%A9t%C3%A9"]:
        response = await http.get(f"{relay.url}/v1/tasks/{bad}/events")
        assert response.status_code == 400, bad
        assert response.json()["code"] == "invalid_task_id"
    assert sum(upstream.simulator.calls.values()) == 0


async def test_unknown_task_gets_task_not_found_and_the_stream_closes(
    relay: ThreadServer, http: httpx.AsyncClient
) -> None:
    watcher = await watch_sse(http, relay.url, "no-such-task")
    assert watcher.state is None
    assert [e["code"] for e in watcher.errors] == ["task_not_found"]
    assert watcher.errors[0]["retrying"] is False


async def test_resume_with_last_event_id_gets_one_combined_patch(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(linger=5.0)
    task_id = upstream.start_task(queue=0.2, duration=3)
    first = Watcher()
    url = f"{relay.url}/v1/tasks/{task_id}/events"
    async for event in sse_events(http, url):
        first.apply(event.event, event.data, int(event.id or 0))
        if event.event == "patch":
            break
    held = first.seq
    await asyncio.sleep(0.6)  # several changes happen while the client is away
    resumed = Watcher(state=first.state, seq=held)
    async for event in sse_events(http, url, {"Last-Event-ID": str(held)}):
        resumed.apply(event.event, event.data, int(event.id or 0))
    kind, _, seq = resumed.events[0]
    assert kind == "patch"
    assert seq is not None and held is not None and seq > held + 1
    assert resumed.ended == "succeeded"
    assert resumed.state == upstream.final_state(task_id)


async def test_resume_from_a_forgotten_state_gets_a_snapshot(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=0.2, duration=2)
    url = f"{relay.url}/v1/tasks/{task_id}/events"
    async for event in sse_events(http, url, {"Last-Event-ID": "12345"}):
        assert event.event == "snapshot"
        break


async def test_reconnect_after_the_end_gets_204(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    watcher = await watch_sse(http, relay.url, task_id)
    url = f"{relay.url}/v1/tasks/{task_id}/events"
    response = await http.get(url, headers={"Last-Event-ID": str(watcher.seq)})
    assert response.status_code == 204


async def test_late_subscriber_gets_the_final_state_from_memory(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    first = await watch_sse(http, relay.url, task_id)
    calls = upstream.calls(task_id)
    late = await watch_sse(http, relay.url, task_id)
    assert [kind for kind, _, _ in late.events] == ["snapshot", "end"]
    assert late.state == first.state
    assert upstream.calls(task_id) == calls


async def test_garbage_last_event_id_is_ignored(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    url = f"{relay.url}/v1/tasks/{task_id}/events"
    for garbage in [b"-5", b"abc", b"9" * 400, b"1e9", b"\xb2", b"\xef\xbc\x91"]:
        async for event in sse_events(http, url, {"Last-Event-ID": garbage}):  # type: ignore[dict-item]
            assert event.event == "snapshot"
            break
    await wait_for(lambda: relay.app.state.relay.hub.subscriber_count == 0)
