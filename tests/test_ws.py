import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from .clients import wait_for, watch_ws
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ProcessServer, ThreadServer


async def recv(socket: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(socket.recv(), 10))  # type: ignore[no-any-return]


async def test_subscription_reconstructs_the_final_state(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task()
    watcher = await watch_ws(relay.ws_url, task_id)
    assert watcher.events[0][0] == "snapshot"
    assert watcher.ended == "succeeded"
    assert watcher.state == upstream.final_state(task_id)


async def test_many_subscriptions_share_one_socket(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    tasks = [upstream.start_task(duration=1.0) for _ in range(3)]
    ended: set[str] = set()
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        for task_id in tasks:
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        while len(ended) < len(tasks):
            frame = await recv(socket)
            assert frame["taskId"] in tasks
            if frame["type"] == "end":
                ended.add(frame["taskId"])
    assert ended == set(tasks)


async def test_garbage_frames_get_bad_request_and_the_socket_keeps_working(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task()
    # A message the relay cannot read is bad_request; a readable subscribe whose task ID
    # is missing or malformed is invalid_task_id, as on the other transports.
    garbage: list[tuple[str | bytes, str]] = [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('{"type": "dance"}', "bad_request"),
        ('{"type": "subscribe"}', "invalid_task_id"),
        ('{"type": "subscribe", "taskId": 12}', "invalid_task_id"),
        (json.dumps({"type": "subscribe", "taskId": task_id, "lastSeq": "x"}), "bad_request"),
        (json.dumps({"type": "subscribe", "taskId": task_id, "lastSeq": -1}), "bad_request"),
        ("[" * 5000 + "]" * 5000, "bad_request"),
        (b"\x00\x01binary", "bad_request"),
    ]
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        for frame, code in garbage:
            await socket.send(frame)
            reply = await recv(socket)
            assert reply["type"] == "error", frame
            assert reply["data"]["code"] == code, (frame, reply)
            assert reply["data"]["retrying"] is False
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        assert (await recv(socket))["type"] == "snapshot"


async def test_error_names_the_task_the_message_named(relay: ThreadServer) -> None:
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        await socket.send(json.dumps({"type": "subscribe", "taskId": "bad id"}))
        reply = await recv(socket)
        assert reply == {
            "type": "error",
            "taskId": "bad id",
            "data": {
                "code": "invalid_task_id",
                "message": reply["data"]["message"],
                "retrying": False,
            },
        }
        await socket.send(json.dumps({"type": "jump", "taskId": "abc"}))
        reply = await recv(socket)
        assert reply["taskId"] == "abc" and reply["data"]["code"] == "bad_request"


async def test_unknown_task_gets_task_not_found(relay: ThreadServer) -> None:
    watcher = await watch_ws(relay.ws_url, "no-such-task")
    assert [e["code"] for e in watcher.errors] == ["task_not_found"]


async def test_unsubscribe_stops_updates_and_closing_drops_every_subscription(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    hub = relay.app.state.relay.hub
    tasks = [upstream.start_task(duration=5) for _ in range(3)]
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        for task_id in tasks:
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        await wait_for(lambda: hub.subscriber_count == 3)
        await socket.send(json.dumps({"type": "unsubscribe", "taskId": tasks[0]}))
        await wait_for(lambda: hub.subscriber_count == 2)
    await wait_for(lambda: hub.subscriber_count == 0)


async def test_resubscribe_with_last_seq_gets_a_patch(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(linger=5.0)
    task_id = upstream.start_task(queue=0.2, duration=3)
    async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        snapshot = await recv(socket)
    await asyncio.sleep(0.5)
    watcher = await watch_ws(relay.ws_url, task_id, snapshot["seq"], snapshot["data"])
    assert watcher.events[0][0] == "patch"
    assert watcher.state == upstream.final_state(task_id)


async def test_cross_site_upgrade_is_refused(relay: ThreadServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
            f"{relay.ws_url}/v1/ws",
            origin="https://evil.example",  # type: ignore[arg-type]
        ):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(
        f"{relay.ws_url}/v1/ws",
        origin=relay.url,  # type: ignore[arg-type]
    ) as socket:
        await socket.send(json.dumps({"type": "unsubscribe", "taskId": "abc"}))


@pytest.mark.parametrize(("flags", "deflate"), [((), False), (("--ws-compression", "1"), True)])
async def test_permessage_deflate_is_off_unless_asked_for(
    flags: tuple[str, ...], deflate: bool
) -> None:
    relay = ProcessServer(["serve", *flags]).start()
    try:
        async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:  # offers deflate
            extensions = socket.response.headers.get("Sec-WebSocket-Extensions") or ""
            assert ("permessage-deflate" in extensions) is deflate
    finally:
        relay.stop()


async def test_a_vanished_client_is_released_at_once(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    hub = relay.app.state.relay.hub
    task_id = upstream.start_task(queue=30, duration=30)
    socket = await websockets.connect(f"{relay.ws_url}/v1/ws")
    await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
    assert (await recv(socket))["type"] == "snapshot"
    await wait_for(lambda: hub.subscriber_count == 1)
    socket.transport.abort()  # no close frame: the client just vanishes
    gone = time.monotonic()
    await wait_for(lambda: hub.subscriber_count == 0, timeout=5, interval=0.01)
    assert time.monotonic() - gone < 1.0


async def test_server_exit_closes_every_socket_with_1012(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    hub = relay.app.state.relay.hub
    task_id = upstream.start_task(queue=30, duration=30)
    sockets = [await websockets.connect(f"{relay.ws_url}/v1/ws") for _ in range(3)]
    for socket in sockets:
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        assert (await recv(socket))["type"] == "snapshot"
    watchdog = relay.app.state.relay.watchdog
    watchdog.exiting = lambda: True  # as when uvicorn's signal handler is told to exit
    for socket in sockets:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 2)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    await wait_for(lambda: hub.subscriber_count == 0)


async def test_a_socket_is_one_task_waiting_and_one_serving(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    def tasks() -> int:
        return len(asyncio.all_tasks())

    async def subscribed() -> Any:
        socket = await websockets.connect(f"{relay.ws_url}/v1/ws")
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        assert (await recv(socket))["type"] == "snapshot"
        return socket

    task_id = upstream.start_task(queue=30, duration=30)
    first = await subscribed()  # and the task's poll loop
    before = relay.call(tasks)
    sockets = [await subscribed() for _ in range(10)]
    assert relay.call(tasks) - before == 2 * 10  # with a reader and a sender, it was 3
    for socket in [first, *sockets]:
        await socket.close()
