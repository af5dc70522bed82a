"""Server-Sent Events: one stream per task, or one stream for many tasks."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import cast

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .config import Settings
from .hub import Cursor, Hub, Subscriber
from .limits import drop_connection, overloaded_response
from .protocol import (
    ErrorCode,
    Event,
    error_data,
    error_response,
    invalid_task_id_message,
    is_valid_task_id,
    task_id_in_path,
)
from .tokens import grant

logger = logging.getLogger("relay.sse")

MAX_SEQ = (1 << 63) - 1
HEADERS = {"Cache-Control": "no-cache"}


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


class ShutdownSignal:
    """Stands in for the event sse-starlette sets on server shutdown: it wakes the stream."""

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    def set(self) -> None:
        self._subscriber.close()


def retry_hint() -> bytes:
    """Tells a client the server is going away; jittered so reconnects do not all come at once."""
    return f"retry: {random.randint(1000, 4000)}\n\n".encode()


async def stream_events(
    hub: Hub,
    subscriber: Subscriber,
    subscriptions: list[tuple[str, int | None]],
    frame: Callable[[Event, list[Cursor]], bytes],
    prelude: bytes = b"",
) -> AsyncIterator[bytes]:
    """Yield what the subscriber's tasks have to say, one chunk per wake-up, until all ended."""
    cursors = [hub.subscribe(task_id, subscriber, seq) for task_id, seq in subscriptions]
    try:
        if prelude:
            yield prelude
        while cursors and not all(cursor.done for cursor in cursors):
            dirty = await subscriber.changed()
            if subscriber.closing:
                yield retry_hint()
                return
            # Framed cursor by cursor: a many-task stream's id must list only what this
            # client has been sent so far, should the connection break between frames.
            frames = [frame(event, cursors) for cursor in dirty for event in cursor.pending()]
            if frames:
                hub.pushed("sse", len(frames))
                yield b"".join(frames)
    finally:
        for cursor in cursors:
            hub.unsubscribe(cursor)


class RelayEventSource(EventSourceResponse):
    """An event stream that resets the connection of a client that stopped reading."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* SendTimeoutError:
            logger.info("dropping an SSE client that stopped reading")
            if drop_connection(receive):
                # Let the server see the connection go before the response is abandoned,
                # or it logs a response that never completed.
                for _ in range(3):
                    await asyncio.sleep(0)


def event_source(request: Request, body: AsyncIterator[bytes], subscriber: Subscriber) -> Response:
    settings = request.app.state.settings
    return RelayEventSource(
        body,
        headers=HEADERS,
        ping=settings.ping_interval,
        send_timeout=settings.send_timeout,
        shutdown_event=cast(anyio.Event, ShutdownSignal(subscriber)),
        shutdown_grace_period=1.0,
    )


async def task_events(request: Request) -> Response:
    """`GET /v1/tasks/{taskId}/events`"""
    task_id = task_id_in_path(request.scope)
    if not is_valid_task_id(task_id):
        return error_response(400, ErrorCode.INVALID_TASK_ID, invalid_task_id_message(task_id))
    settings: Settings = request.app.state.settings
    refusal = grant(settings.token_secret, request.query_params.get("token")).refusal(task_id)
    if refusal is not None:
        return error_response(401, ErrorCode.UNAUTHORIZED, refusal)
    hub: Hub = request.app.state.hub
    seq = parse_seq(last_event_id(request))
    if delivered(hub, task_id, seq):
        return Response(status_code=204)
    if known_unknown(hub, task_id):
        # Streamed, this error would have EventSource reconnect forever; a 404 ends it.
        return error_response(404, ErrorCode.TASK_NOT_FOUND, f"unknown task {task_id}")
    if new_loops(hub, [task_id]) > settings.max_loops - hub.loop_count:
        return overloaded_response("the relay watches as many tasks as it can; retry later")
    subscriber = Subscriber("sse")
    body = stream_events(hub, subscriber, [(task_id, seq)], lambda event, _: event.sse)
    return event_source(request, body, subscriber)


def last_event_id(request: Request) -> str | None:
    """The client's position: the `Last-Event-ID` header, else the `lastEventId` parameter.

    EventSource sends the header only when it reconnects by itself; a page that opens
    a new stream (with another list of tasks) resumes through the parameter. The header
    wins, since it is never older than the URL.
    """
    return request.headers.get("last-event-id") or request.query_params.get("lastEventId")


def delivered(hub: Hub, task_id: str, seq: int | None) -> bool:
    """True when a client holding state `seq` has all an ended task will ever send."""
    task = hub.get(task_id)
    return task is not None and task.delivered_all(seq)


def known_unknown(hub: Hub, task_id: str) -> bool:
    """True while the relay remembers that the upstream does not know this task."""
    task = hub.get(task_id)
    error = task.final_error if task is not None else None
    return error is not None and error["code"] == ErrorCode.TASK_NOT_FOUND


def new_loops(hub: Hub, task_ids: list[str]) -> int:
    """How many of these tasks would need a poll loop the relay does not run yet."""
    return sum(1 for task_id in task_ids if hub.get(task_id) is None)


def multiplexed_frame(event: Event, cursors: list[Cursor]) -> bytes:
    ids = ",".join(f"{c.task.task_id}:{c.seq}" for c in cursors if c.seq is not None)
    return event.sse_multiplexed + (f"id: {ids}\n\n".encode() if ids else b"\n")


async def many_task_events(request: Request) -> Response:
    """`GET /v1/events?taskId=A&taskId=B`: one stream for many tasks."""
    settings: Settings = request.app.state.settings
    hub: Hub = request.app.state.hub
    task_ids = list(dict.fromkeys(request.query_params.getlist("taskId")))
    if not task_ids:
        return error_response(400, ErrorCode.BAD_REQUEST, "give at least one taskId parameter")
    if len(task_ids) > settings.max_stream_tasks:
        message = f"at most {settings.max_stream_tasks} tasks per stream, got {len(task_ids)}"
        return error_response(400, ErrorCode.TOO_MANY_TASKS, message)
    resume = parse_stream_id(last_event_id(request))
    access = grant(settings.token_secret, request.query_params.get("token"))
    refused: dict[str, dict[str, object]] = {}
    for task_id in task_ids:
        if not is_valid_task_id(task_id):
            refused[task_id] = error_data(
                ErrorCode.INVALID_TASK_ID, invalid_task_id_message(task_id)
            )
        elif (refusal := access.refusal(task_id)) is not None:
            refused[task_id] = error_data(ErrorCode.UNAUTHORIZED, refusal)
    valid = [task_id for task_id in task_ids if task_id not in refused]
    # What a plain EventSource needs to stop reconnecting: 204 when a resuming client has
    # everything, an HTTP error when no task of the list can ever be watched.
    finished = [delivered(hub, t, resume.get(t)) or known_unknown(hub, t) for t in valid]
    if resume and valid and all(finished):
        return Response(status_code=204)
    if all(known_unknown(hub, t) for t in valid):
        return refusal_response(refused, valid)
    if new_loops(hub, valid) > settings.max_loops - hub.loop_count:
        return overloaded_response("the relay watches as many tasks as it can; retry later")
    prelude = b"".join(
        multiplexed_frame(Event("error", task_id, None, data), [])
        for task_id, data in refused.items()
    )
    subscriber = Subscriber("sse")
    subscriptions = [(task_id, resume.get(task_id)) for task_id in valid]
    body = stream_events(hub, subscriber, subscriptions, multiplexed_frame, prelude)
    return event_source(request, body, subscriber)


def refusal_response(refused: dict[str, dict[str, object]], unknown: list[str]) -> Response:
    """The HTTP error for a many-task stream none of whose tasks can be watched."""
    for code, status in ((ErrorCode.INVALID_TASK_ID, 400), (ErrorCode.UNAUTHORIZED, 401)):
        for data in refused.values():
            if data["code"] == code:
                return error_response(status, code, f"no task can be watched: {data['message']}")
    return error_response(404, ErrorCode.TASK_NOT_FOUND, f"unknown tasks: {', '.join(unknown)}")
