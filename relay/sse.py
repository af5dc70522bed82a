"""Server-Sent Events: one stream per task, or one stream for many tasks."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .hub import Hub
from .limits import overloaded_response
from .protocol import (
    ErrorCode,
    Event,
    error_data,
    error_response,
    is_valid_task_id,
    task_id_in_path,
)
from .service import Admitted, Delivered, Refusal, relay_of
from .subscriber import Cursor, Subscriber
from .workarounds import drop_connection, shutdown_event

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


def retry_hint(rng: random.Random) -> bytes:
    """Tells a client the server is going away; jittered so reconnects do not all come at once."""
    return f"retry: {rng.randint(1000, 4000)}\n\n".encode()


async def stream_events(
    hub: Hub,
    subscriber: Subscriber,
    subscriptions: list[tuple[str, int | None]],
    frame: Callable[[Event, list[Cursor]], bytes],
    prelude: bytes = b"",
    rng: random.Random | None = None,
) -> AsyncIterator[bytes]:
    """Yield what the subscriber's tasks have to say, one chunk per wake-up, until all ended."""
    cursors = [hub.subscribe(task_id, subscriber, seq) for task_id, seq in subscriptions]
    try:
        if prelude:
            yield prelude
        while cursors and not all(cursor.done for cursor in cursors):
            dirty = await subscriber.changed()
            if subscriber.closing:
                yield retry_hint(rng or random.Random())
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
    settings = relay_of(request).settings
    return RelayEventSource(
        body,
        headers=HEADERS,
        ping=settings.ping_interval,
        send_timeout=settings.send_timeout,
        shutdown_event=shutdown_event(subscriber),
        shutdown_grace_period=1.0,
    )


def refusal_response(refusal: Refusal) -> Response:
    if refusal.retrying:
        return overloaded_response(refusal.message)
    return error_response(refusal.status, refusal.code, refusal.message)


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
    subscriber = Subscriber("sse")
    body = stream_events(
        relay.hub, subscriber, [(task_id, seq)], lambda event, _: event.sse, rng=relay.rng
    )
    return event_source(request, body, subscriber)


def last_event_id(request: Request) -> str | None:
    """The client's position: the `Last-Event-ID` header, else the `lastEventId` parameter.

    EventSource sends the header only when it reconnects by itself; a page that opens
    a new stream (with another list of tasks) resumes through the parameter. The header
    wins, since it is never older than the URL.
    """
    return request.headers.get("last-event-id") or request.query_params.get("lastEventId")


def multiplexed_frame(event: Event, cursors: list[Cursor]) -> bytes:
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
        multiplexed_frame(Event("error", task_id, None, error_data(r.code, r.message)), [])
        for task_id, r in refused.items()
    )
    subscriber = Subscriber("sse")
    subscriptions = [(t, resume.get(t)) for t in task_ids if t not in refused]
    body = stream_events(
        relay.hub, subscriber, subscriptions, multiplexed_frame, prelude, rng=relay.rng
    )
    return event_source(request, body, subscriber)


def none_watchable(refused: dict[str, Refusal], unknown: list[str]) -> Response:
    """The HTTP error for a many-task stream none of whose tasks can be watched."""
    for code in (ErrorCode.INVALID_TASK_ID, ErrorCode.UNAUTHORIZED):
        for refusal in refused.values():
            if refusal.code == code:
                message = f"no task can be watched: {refusal.message}"
                return error_response(refusal.status, code, message)
    return error_response(404, ErrorCode.TASK_NOT_FOUND, f"unknown tasks: {', '.join(unknown)}")
