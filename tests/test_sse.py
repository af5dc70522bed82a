import asyncio
import socket
import struct
import time

import httpx
import pytest

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


async def test_head_gets_the_headers_and_no_stream(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(queue=5, duration=5)
    response = await asyncio.wait_for(http.head(f"{relay.url}/v1/tasks/{task_id}/events"), 5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""
    hub = relay.app.state.relay.hub
    assert hub.subscriber_count == 0 and hub.loop_count == 0
    assert upstream.calls(task_id) == 0


async def open_stream(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 stream, read up to its first event."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    while b"event: snapshot" not in await asyncio.wait_for(reader.readline(), 5):
        pass
    return reader, writer


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_vanished_client_is_released_within_the_ping_interval(
    make_relay: RelayFactory, upstream: SimulatedUpstream, how: str
) -> None:
    relay = make_relay(ping_interval=1.0)
    hub = relay.app.state.relay.hub
    task_id = upstream.start_task(queue=30, duration=30)  # waiting: nothing to send for a while
    streams = [await open_stream(relay.port, f"/v1/tasks/{task_id}/events") for _ in range(3)]
    await wait_for(lambda: hub.subscriber_count == 3)
    _, writer = streams.pop()
    if how == "reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    gone = time.monotonic()
    await wait_for(lambda: hub.subscriber_count == 2, timeout=5, interval=0.01)
    assert time.monotonic() - gone < 1.0, "not released within the ping interval"
    for _, other in streams:
        other.close()
    await wait_for(lambda: hub.subscriber_count == 0, timeout=5)


async def test_server_exit_sends_a_retry_hint_and_ends_every_stream_at_once(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    hub = relay.app.state.relay.hub
    task_id = upstream.start_task(queue=30, duration=30)
    streams = [await open_stream(relay.port, f"/v1/tasks/{task_id}/events") for _ in range(2)]
    many = await open_stream(relay.port, f"/v1/events?taskId={task_id}&taskId=other")
    watchdog = relay.app.state.relay.watchdog
    # What the watchdog reads from uvicorn's signal handler when SIGTERM comes; a server in a
    # thread has no handler (tests/test_app.py sends the real signal to a relay process).
    watchdog.exiting = lambda: True
    started = time.monotonic()
    for reader, _ in [*streams, many]:
        # To the last chunk of the response (the connection itself may stay open).
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 2)
        assert b"retry: " in rest, rest
    assert time.monotonic() - started < 1.0
    await wait_for(lambda: hub.subscriber_count == 0)
    for _, writer in [*streams, many]:
        writer.close()


async def test_a_stream_is_one_task_waiting_and_one_sending(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    def tasks() -> int:
        return len(asyncio.all_tasks())

    task_id = upstream.start_task(queue=30, duration=30)
    first = await open_stream(relay.port, f"/v1/tasks/{task_id}/events")
    before = relay.call(tasks)
    streams = [await open_stream(relay.port, f"/v1/tasks/{task_id}/events") for _ in range(10)]
    assert relay.call(tasks) - before == 2 * 10  # sse-starlette's was 5 a stream
    for _, writer in [first, *streams]:
        writer.close()
