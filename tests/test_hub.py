"""One poll loop per task, whatever the number of subscribers, stopped in time."""

import asyncio

import httpx

from relay.hub import Hub, LoopSignal, TaskHub
from relay.subscriber import Subscriber

from .clients import sse_events, visit, wait_for, watch_sse, watch_ws
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ThreadServer


async def test_fifty_sse_and_fifty_ws_subscribers_cost_one_loop(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay()
    # Side by side, so that both loops run on an equally busy machine.
    alone = upstream.start_task(queue=0.3, duration=2)
    crowded = upstream.start_task(queue=0.3, duration=2)
    single, *watchers = await asyncio.gather(
        watch_sse(http, relay.url, alone),
        *[watch_sse(http, relay.url, crowded) for _ in range(50)],
        *[watch_ws(relay.ws_url, crowded) for _ in range(50)],
    )
    final = upstream.final_state(crowded)
    assert all(w.state == final and w.ended == "succeeded" for w in watchers)
    assert single.state == upstream.final_state(alone)
    assert abs(upstream.calls(crowded) - upstream.calls(alone)) <= 1


async def test_every_patch_holds_only_changed_fields(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task()
    watcher = await watch_sse(http, relay.url, task_id)
    state = watcher.events[0][1]
    for kind, data, _ in watcher.events[1:]:
        if kind != "patch":
            continue
        assert data, "an empty patch was pushed"
        for key, value in data.items():
            assert state.get(key) != value, f"unchanged field {key} in {data}"
            if isinstance(value, dict) and isinstance(state.get(key), dict):
                for inner, inner_value in value.items():
                    assert state[key].get(inner) != inner_value
        from relay.patch import apply_patch

        state = apply_patch(state, data)


async def test_late_subscriber_joins_without_an_extra_upstream_call(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(poll_interval=1.0)
    task_id = upstream.start_task(queue=5, duration=5)
    hub = relay.app.state.relay.hub
    first = asyncio.create_task(watch_sse(http, relay.url, task_id))
    await wait_for(lambda: (t := hub.get(task_id)) is not None and t.state is not None)
    calls = upstream.calls(task_id)
    await visit(http, f"{relay.url}/v1/tasks/{task_id}/events")
    assert upstream.calls(task_id) == calls
    first.cancel()


async def test_loop_stops_at_a_terminal_state(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    task_id = upstream.start_task(fail=True)
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.ended == "failed"
    calls = upstream.calls(task_id)
    await asyncio.sleep(0.5)
    assert upstream.calls(task_id) == calls
    assert relay.app.state.relay.hub.loop_count == 0


async def test_loop_stops_after_the_last_subscriber_leaves_and_the_linger(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(linger=0.5)
    hub = relay.app.state.relay.hub
    task_id = upstream.start_task(queue=10, duration=10)
    await visit(http, f"{relay.url}/v1/tasks/{task_id}/events")
    await asyncio.sleep(0.3)
    assert hub.loop_count == 1, "the loop must linger"
    await wait_for(lambda: hub.loop_count == 0, timeout=3)
    calls = upstream.calls(task_id)
    await asyncio.sleep(0.4)
    assert upstream.calls(task_id) == calls
    assert hub.get(task_id) is None


async def test_a_subscriber_within_the_linger_keeps_the_loop(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(linger=1.0)
    hub = relay.app.state.relay.hub
    task_id = upstream.start_task(queue=0.2, duration=2)
    await visit(http, f"{relay.url}/v1/tasks/{task_id}/events")
    await asyncio.sleep(0.3)
    watcher = await watch_sse(http, relay.url, task_id)
    assert watcher.ended == "succeeded"
    assert hub.loop_count == 0


def test_a_boolean_replacing_an_equal_number_is_a_change() -> None:
    task = TaskHub("flags")
    assert task.publish({"status": "running", "flag": 1})
    assert task.publish({"status": "running", "flag": True})
    assert task.state is not None and task.state["flag"] is True
    assert not task.publish({"status": "running", "flag": True})


async def test_a_crashed_poll_loop_ends_its_task_with_a_final_internal_error() -> None:
    async def broken_poll(task: TaskHub, signal: LoopSignal) -> None:
        raise RuntimeError("a bug")

    hub = Hub(broken_poll, linger=0.1, ended_ttl=1.0)
    subscriber = Subscriber("test")
    cursor = hub.subscribe("crashing", subscriber)
    await asyncio.sleep(0.05)
    events = [event for c in await subscriber.changed() for event in c.pending()]
    assert [(e.kind, e.data["code"], e.data["retrying"]) for e in events] == [
        ("error", "internal_error", False)
    ]
    assert cursor.done and hub.loop_count == 0
    await hub.close()


async def test_a_subscriber_that_falls_behind_gets_one_combined_patch_then_a_snapshot() -> None:
    async def idle(task: TaskHub, signal: LoopSignal) -> None:
        await signal.sleep(60)

    hub = Hub(idle, linger=1.0, ended_ttl=1.0)
    subscriber = Subscriber("test")
    cursor = hub.subscribe("slow", subscriber)
    task = cursor.task
    task.publish({"status": "running", "progress": 0.0, "message": "a"})
    assert [e.kind for e in cursor.pending()] == ["snapshot"]
    for step in range(1, 4):
        task.publish({"status": "running", "progress": step / 10, "message": "a"})
    behind = cursor.pending()
    assert [(e.kind, e.seq, e.data) for e in behind] == [("patch", task.seq, {"progress": 0.3})]
    for step in range(100):  # past the remembered history
        task.publish({"status": "running", "progress": step / 100, "message": str(step)})
    assert [(e.kind, e.seq) for e in cursor.pending()] == [("snapshot", task.seq)]
    hub.unsubscribe(cursor)
    await hub.close()


async def test_an_ended_task_is_forgotten_after_its_ttl_even_with_late_subscribers() -> None:
    async def ends_at_once(task: TaskHub, signal: LoopSignal) -> None:
        task.publish({"status": "succeeded", "progress": 1})

    hub = Hub(ends_at_once, linger=0.1, ended_ttl=0.3)
    early = Subscriber("test")
    hub.unsubscribe(hub.subscribe("ended", early))
    await wait_for(lambda: hub.loop_count == 0)
    late = Subscriber("test")
    cursor = hub.subscribe("ended", late)
    assert [e.kind for e in cursor.pending()] == ["snapshot", "end"]
    hub.unsubscribe(cursor)
    await wait_for(lambda: hub.task_count == 0, timeout=2)
    await hub.close()


async def test_late_subscribers_over_every_transport_leave_no_task_behind(
    make_relay: RelayFactory, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    relay = make_relay(ended_ttl=1.0)
    hub = relay.app.state.relay.hub
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    assert (await watch_sse(http, relay.url, task_id)).ended == "succeeded"
    # After the end: a single stream, a many-task stream and a WebSocket look at it.
    assert (await watch_sse(http, relay.url, task_id)).ended == "succeeded"
    async for event in sse_events(http, f"{relay.url}/v1/events?taskId={task_id}"):
        if event.event == "end":
            break
    assert (await watch_ws(relay.ws_url, task_id)).ended == "succeeded"
    calls = upstream.calls(task_id)
    await wait_for(lambda: hub.task_count == 0, timeout=3)
    # Forgotten: the next reader asks the upstream again.
    assert (await http.get(f"{relay.url}/v1/tasks/{task_id}")).status_code == 200
    assert upstream.calls(task_id) == calls + 1
