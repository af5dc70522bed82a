"""`GET /v1/events`: one SSE stream for many tasks, and resuming it."""

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import httpx

from relay.config import Settings
from relay.hub import Hub, LoopSignal, TaskHub
from relay.sse import EventStream, multiplexed_frame, parse_stream_id
from relay.watchdog import Watchdog

from .clients import SSEEvent, Watcher, sse_events, wait_for
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ProcessServer, ThreadServer


def stream_url(base: str, task_ids: list[str]) -> str:
    return f"{base}/v1/events?" + "&".join(f"taskId={t}" for t in task_ids)


def follow(watchers: dict[str, Watcher], event: SSEEvent) -> str:
    task_id = event.data["taskId"]
    seqs = parse_stream_id(event.id)
    watchers.setdefault(task_id, Watcher()).apply(
        event.event, event.data["data"], seqs.get(task_id)
    )
    return str(task_id)


async def watch_all(
    http: httpx.AsyncClient, base: str, task_ids: list[str], last_id: str | None = None
) -> tuple[dict[str, Watcher], str | None]:
    watchers: dict[str, Watcher] = {}
    headers = {"Last-Event-ID": last_id} if last_id else None
    last = last_id
    async for event in sse_events(http, stream_url(base, task_ids), headers):
        follow(watchers, event)
        last = event.id or last
    return watchers, last


async def test_one_stream_carries_twenty_tasks_to_their_end(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    tasks = [upstream.start_task(queue=0.2, duration=1.5) for _ in range(20)]
    watchers, last_id = await watch_all(http, relay.url, tasks)
    for task_id in tasks:
        assert watchers[task_id].ended == "succeeded"
        assert watchers[task_id].state == upstream.final_state(task_id)
        # One loop per task: at most one call per poll interval of the task's life, plus slack.
        assert upstream.calls(task_id) <= (0.2 + 1.5) / 0.1 + 4
    assert last_id is not None and set(parse_stream_id(last_id)) == set(tasks)
    assert relay.app.state.relay.hub.loop_count == 0


async def test_resume_sends_one_patch_per_moved_task_and_nothing_for_the_others(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(linger=5.0)
    still = [upstream.start_task(queue=300, duration=5) for _ in range(2)]
    moving = [upstream.start_task(queue=0, duration=10) for _ in range(2)]
    tasks = still + moving
    watchers: dict[str, Watcher] = {}
    last_id = None
    async for event in sse_events(http, stream_url(relay.url, tasks)):
        follow(watchers, event)
        last_id = event.id
        if len(watchers) == len(tasks):
            break
    await asyncio.sleep(0.5)  # the moving tasks change several times meanwhile
    assert last_id is not None
    first_events: dict[str, str] = {}
    async with asyncio.timeout(5):
        async for event in sse_events(
            http, stream_url(relay.url, tasks), {"Last-Event-ID": last_id}
        ):
            task_id = follow(watchers, event)
            first_events.setdefault(task_id, event.event)
            if set(first_events) >= set(moving):
                break
    assert first_events == {task_id: "patch" for task_id in moving}


async def test_bad_id_gets_its_own_error_and_the_others_go_on(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    good = upstream.start_task()
    watchers, _ = await watch_all(http, relay.url, [good, "bad.id", "unknown-task"])
    assert [e["code"] for e in watchers["bad.id"].errors] == ["invalid_task_id"]
    assert [e["code"] for e in watchers["unknown-task"].errors] == ["task_not_found"]
    assert watchers[good].ended == "succeeded"

    # A plain EventSource reconnects when the stream closes: it must be told to stop.
    _, last_id = await watch_all(http, relay.url, [good, "unknown-task"])
    assert last_id is not None
    again = await http.get(
        stream_url(relay.url, [good, "unknown-task"]), headers={"Last-Event-ID": last_id}
    )
    assert again.status_code == 204
    only_bad = await http.get(stream_url(relay.url, ["bad.id", "unknown-task"]))
    assert only_bad.status_code == 400 and only_bad.json()["code"] == "invalid_task_id"
    only_unknown = await http.get(stream_url(relay.url, ["unknown-task"]))
    assert only_unknown.status_code == 404 and only_unknown.json()["code"] == "task_not_found"


async def test_a_new_stream_resumes_from_the_last_event_id_parameter(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    """A page re-opening its stream with another task list resumes the tasks it holds."""
    relay = make_relay(linger=5.0)
    held = upstream.start_task(queue=0, duration=3)
    first = sse_events(http, stream_url(relay.url, [held]))
    snapshot = await anext(first)
    await first.aclose()
    assert snapshot.event == "snapshot"
    added = upstream.start_task(queue=0, duration=3)
    url = stream_url(relay.url, [held, added]) + f"&lastEventId={snapshot.id}"
    seen: dict[str, str] = {}
    async for event in sse_events(http, url):
        seen.setdefault(event.data["taskId"], event.event)
        if len(seen) == 2:
            break
    assert seen == {held: "patch", added: "snapshot"}


async def test_each_frame_of_a_many_task_stream_claims_only_what_was_sent_before_it() -> None:
    async def idle(task: TaskHub, signal: LoopSignal) -> None:
        await signal.sleep(60)

    hub = Hub(idle, linger=1.0, ended_ttl=1.0)
    settings = Settings()
    watchdog = Watchdog(ping_interval=settings.ping_interval, send_timeout=settings.send_timeout)
    relay = SimpleNamespace(hub=hub, settings=settings, rng=random.Random(0), watchdog=watchdog)
    chunks: list[bytes] = []
    left = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message.get("body"):
            chunks.append(message["body"])

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    stream = EventStream(relay, [("a", None), ("b", None)], multiplexed_frame)  # type: ignore[arg-type]
    serving = asyncio.create_task(stream({"type": "http", "method": "GET"}, receive, send))
    try:
        await asyncio.sleep(0.01)  # the stream subscribes and waits
        for task_id in ("a", "b"):
            hub.get(task_id).publish({"status": "running", "progress": 0.1})
        await wait_for(lambda: len(chunks) == 1, timeout=5)
        for task_id in ("a", "b"):
            hub.get(task_id).publish({"status": "running", "progress": 0.2})
        await wait_for(lambda: len(chunks) == 2, timeout=5)
        chunk = chunks[1].decode()
        a, b = hub.get("a").seq, hub.get("b").seq
    finally:
        left.set()  # the client leaves: the stream ends
        await asyncio.wait_for(serving, 5)
        await hub.close()
    assert hub.subscriber_count == 0
    ids = [parse_stream_id(line[4:]) for line in chunk.splitlines() if line.startswith("id: ")]
    # Should the connection break after the first frame, the client holds b's old state.
    assert ids == [{"a": a, "b": b - 1}, {"a": a, "b": b}]


async def test_too_many_ids_is_refused(make_relay: RelayFactory, http: httpx.AsyncClient) -> None:
    relay = make_relay(max_stream_tasks=3)
    response = await http.get(stream_url(relay.url, ["a", "b", "c", "d"]))
    assert response.status_code == 400 and response.json()["code"] == "too_many_tasks"
    no_ids = await http.get(f"{relay.url}/v1/events")
    assert no_ids.status_code == 400


async def test_duplicate_ids_count_once(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(max_stream_tasks=2)
    a, b = upstream.start_task(), upstream.start_task()
    watchers, _ = await watch_all(http, relay.url, [a, b, a, b, a])
    assert set(watchers) == {a, b}
    assert [kind for kind, _, _ in watchers[a].events].count("snapshot") == 1


async def test_reconnect_after_every_task_ended_gets_204(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    tasks = [upstream.start_task() for _ in range(3)]
    _, last_id = await watch_all(http, relay.url, tasks)
    assert last_id is not None
    response = await http.get(stream_url(relay.url, tasks), headers={"Last-Event-ID": last_id})
    assert response.status_code == 204


async def test_resume_after_a_relay_restart_gets_a_snapshot(
    upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    args = ["serve", "--upstream", upstream.url, "--signing", "none", "--poll-interval", "0.1"]
    relay = ProcessServer(args).start()
    task_id = upstream.start_task(queue=0.2, duration=3)
    watcher = Watcher()
    async for event in sse_events(http, f"{relay.url}/v1/tasks/{task_id}/events"):
        watcher.apply(event.event, event.data, int(event.id or 0))
        if event.event == "patch":
            break
    relay.kill()
    relay = ProcessServer(args, port=relay.port).start()
    try:
        resumed = Watcher(state=watcher.state, seq=watcher.seq)
        headers = {"Last-Event-ID": str(watcher.seq)}
        async for event in sse_events(http, f"{relay.url}/v1/tasks/{task_id}/events", headers):
            resumed.apply(event.event, event.data, int(event.id or 0))
        assert resumed.events[0][0] == "snapshot"
        assert watcher.seq is not None and resumed.events[0][2] > watcher.seq  # never repeats
        assert resumed.state == upstream.final_state(task_id)
        assert resumed.ended == "succeeded"
    finally:
        relay.stop()
