"""Server-Sent Events: one stream per task, or one stream for many tasks."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .hub import TaskCursor
from .protocol import (
    MAX_SEQ,
    ErrorCode,
    Event,
    echoed_task_id,
    error_data,
    is_valid_task_id,
    task_id_in_path,
)
from .responses import error_response, refusal_response
from .service import Admitted, Delivered, Refusal, Relay, relay_of
from .subscriber import Subscriber
from .workarounds import server_send, transport_of

logger = logging.getLogger("relay.sse")


def parse_seq(value: str | None) -> int | None:
    """A sequence number from a client, or None for anything that is not one."""
    if value is None or not value.isascii() or not value.strip().isdigit():
        return None
    if len(value.strip()) > len(str(MAX_SEQ)):
        return None  # also keeps int() away from its digit limit
    seq = int(value.strip())
    return seq if seq <= MAX_SEQ else None


def parse_stream_id(value: str | None) -> dict[str, int]:
    """`taskId:seq` pairs from a many-task stream's Last-Event-ID; malformed pairs are ignored."""
    resume: dict[str, int] = {}
    for pair in (value or "").split(","):
        task_id, _, raw = pair.strip().rpartition(":")
        seq = parse_seq(raw)
        if seq is not None and is_valid_task_id(task_id):
            resume[task_id] = seq
    return resume


def retry_hint(rng: random.Random) -> bytes:
    """Tells a client the server is going away; jittered so reconnects do not all come at once."""
    return f"retry: {rng.randint(1000, 4000)}\n\n".encode()


STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),  # nginx must not buffer the stream
]
KEEP_ALIVE = b": ping\n\n"

Frame = Callable[[Event, list[TaskCursor]], bytes]


class EventStream(Response):
    """An endless `text/event-stream` response: the request's task waits, one task sends.

    No task group, no ping task, no disconnect listener, no timer or cancel scope per
    send: the subscriber's wake-up is the only thing the stream waits for. The relay's
    `Watchdog` wakes it for a keep-alive comment when it has been idle for the ping
    interval, drops it when its client has gone, resets its connection when a send has
    been stuck for the send timeout, and closes it when the server begins to exit (the
    stream then sends a jittered `retry:` hint and ends). `HEAD` gets the headers and
    an empty body, and subscribes to nothing.
    """

    def __init__(
        self,
        relay: Relay,
        subscriptions: list[tuple[str, int | None]],
        frame: Frame | None = None,
        prelude: bytes = b"",
    ) -> None:
        """`frame` puts an event on the wire; None for a single-task stream's `Event.sse`."""
        self.status_code = 200
        self.background = None
        self.raw_headers = list(STREAM_HEADERS)
        self.relay = relay
        self.subscriptions = subscriptions
        self.frame = frame
        self.prelude = prelude
        self.subscriber = Subscriber("sse")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        if scope.get("method") == "HEAD":
            await send(start)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        relay = self.relay
        hub = relay.hub
        subscriber = self.subscriber
        watchdog = relay.watchdog
        transport = transport_of(receive)
        # Without a transport to look at, one task listens for the client going away.
        listener = (
            None if transport is not None else asyncio.create_task(listen(receive, subscriber))
        )
        cursors = [hub.subscribe(task_id, subscriber, seq) for task_id, seq in self.subscriptions]
        try:
            await send(start)
            # The body goes straight to the server once the response has started, from a
            # task of its own: a task's every wake-up resumes each frame of its stack, and
            # this one's is uvicorn's and Starlette's, 14 frames deep (1.5 µs a message).
            streaming = asyncio.create_task(self.stream(server_send(receive) or send, cursors))
            watchdog.watch(subscriber, transport, streaming)
            await streaming
        finally:
            watchdog.forget(subscriber)
            for cursor in cursors:
                hub.unsubscribe(cursor)
            if listener is not None:
                listener.cancel()

    async def stream(self, send: Send, cursors: list[TaskCursor]) -> None:
        """Send what the cursors have until all ended, then end the response.

        Returns early, without a word, when the client is gone; after a jittered
        `retry:` hint when the server is going away.
        """
        hub = self.relay.hub
        watchdog = self.relay.watchdog
        subscriber = self.subscriber
        frame = self.frame
        open_cursors = sum(not cursor.done for cursor in cursors)
        chunk = self.prelude
        try:
            while True:
                if chunk:
                    watchdog.sending(subscriber)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    watchdog.sent(subscriber)
                if not open_cursors:
                    break
                waiter = subscriber.waiter()
                if waiter is not None:
                    await waiter
                dirty = subscriber.take()
                if subscriber.gone:
                    return
                if subscriber.closing:
                    watchdog.sending(subscriber)
                    hint = retry_hint(self.relay.rng)
                    await send({"type": "http.response.body", "body": hint, "more_body": True})
                    break
                # Framed cursor by cursor: a many-task stream's id must list only what this
                # client has been sent so far, should the connection break between frames.
                frames = []
                for cursor in dirty:
                    if cursor.done:
                        continue
                    for event in cursor.task.catch_up(cursor):
                        frames.append(event.sse if frame is None else frame(event, cursors))
                    if cursor.done:
                        open_cursors -= 1
                keep_alive = watchdog.keep_alive_due(subscriber)  # data resets it too
                if frames:
                    hub.pushed("sse", len(frames))
                    chunk = frames[0] if len(frames) == 1 else b"".join(frames)
                elif keep_alive:
                    chunk = KEEP_ALIVE
                else:
                    chunk = b""
            if not subscriber.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # ASGI 2.4: the client went away during a send
        finally:
            watchdog.idle(subscriber)


async def listen(receive: Receive, subscriber: Subscriber) -> None:
    """Drop the subscriber when its client disconnects (for servers that hide the transport)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.drop()


async def task_events(request: Request) -> Response:
    """`GET /v1/tasks/{taskId}/events`"""
    relay = relay_of(request)
    task_id = task_id_in_path(request.scope)
    seq = parse_seq(last_event_id(request))
    admission = await relay.admit(task_id, request.query_params.get("token"), seq)
    if isinstance(admission, Delivered):
        return Response(status_code=204)
    if isinstance(admission, Refusal):
        return refusal_response(admission)
    return EventStream(relay, [(task_id, seq)])


def last_event_id(request: Request) -> str | None:
    """The client's position: the `Last-Event-ID` header, else the `lastEventId` parameter.

    EventSource sends the header only when it reconnects by itself; a page that opens
    a new stream (with another list of tasks) resumes through the parameter. The header
    wins, since it is never older than the URL.
    """
    return request.headers.get("last-event-id") or request.query_params.get("lastEventId")


def multiplexed_frame(event: Event, cursors: list[TaskCursor]) -> bytes:
    ids = ",".join(f"{c.task.task_id}:{c.seq}" for c in cursors if c.seq is not None)
    return event.sse_multiplexed + (f"id: {ids}\n\n".encode() if ids else b"\n")


async def many_task_events(request: Request) -> Response:
    """`GET /v1/events?taskId=A&taskId=B`: one stream for many tasks."""
    relay = relay_of(request)
    settings = relay.settings
    task_ids = list(dict.fromkeys(request.query_params.getlist("taskId")))
    if not task_ids:
        return error_response(400, ErrorCode.BAD_REQUEST, "give at least one taskId parameter")
    if len(task_ids) > settings.max_stream_tasks:
        message = f"at most {settings.max_stream_tasks} tasks per stream, got {len(task_ids)}"
        return error_response(400, ErrorCode.TOO_MANY_TASKS, message)
    resume = parse_stream_id(last_event_id(request))
    token = request.query_params.get("token")
    refused: dict[str, Refusal] = {}  # invalid, or not covered by the token
    unknown: list[str] = []
    finished: list[bool] = []  # per watchable task: nothing more to send
    new_loops = 0
    for task_id in task_ids:
        admission = await relay.admit(task_id, token, resume.get(task_id), reserved=new_loops)
        if isinstance(admission, Refusal):
            if admission.retrying:
                return refusal_response(admission)
            if admission.code != ErrorCode.TASK_NOT_FOUND:
                refused[task_id] = admission
                continue
            unknown.append(task_id)
        # Unknown and delivered tasks stay on the stream: their error or end goes out
        # as usual, and the stream's id keeps their place for the next reconnect.
        finished.append(not isinstance(admission, Admitted))
        new_loops += relay.hub.get(task_id) is None
    # What a plain EventSource needs to stop reconnecting: 204 when a resuming client has
    # everything, an HTTP error when no task of the list can ever be watched.
    if resume and finished and all(finished):
        return Response(status_code=204)
    if len(unknown) == len(finished):
        return none_watchable(refused, unknown)
    prelude = b"".join(
        multiplexed_frame(
            Event("error", echoed_task_id(task_id), None, error_data(r.code, r.message)), []
        )
        for task_id, r in refused.items()
    )
    subscriptions = [(t, resume.get(t)) for t in task_ids if t not in refused]
    return EventStream(relay, subscriptions, multiplexed_frame, prelude)


def none_watchable(refused: dict[str, Refusal], unknown: list[str]) -> Response:
    """The HTTP error for a many-task stream none of whose tasks can be watched."""
    for code in (ErrorCode.INVALID_TASK_ID, ErrorCode.UNAUTHORIZED):
        for refusal in refused.values():
            if refusal.code == code:
                message = f"no task can be watched: {refusal.message}"
                return error_response(refusal.status, code, message)
    return error_response(404, ErrorCode.TASK_NOT_FOUND, f"unknown tasks: {', '.join(unknown)}")
