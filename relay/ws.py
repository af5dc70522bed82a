"""WebSocket `/v1/ws`: one socket, many task subscriptions, JSON text frames."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from .hub import TaskCursor
from .origins import origin_allowed
from .protocol import (
    MAX_SEQ,
    ErrorCode,
    Event,
    dumps,
    echoed_task_id,
    error_data,
    invalid_task_id_message,
    is_valid_task_id,
)
from .service import Delivered, Refusal, Relay, relay_of
from .subscriber import Subscriber
from .workarounds import notify_messages, release_handshake, server_send, transport_of

logger = logging.getLogger("relay.ws")

MAX_PENDING_REPLIES = 64
NO_MESSAGES: list[Message] = []  # never filled


class ClientError(Exception):
    """A client message the relay cannot act on; the socket stays open."""

    def __init__(
        self, code: ErrorCode, message: str, task_id: str | None = None, *, retrying: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.task_id = task_id
        self.retrying = retrying

    def reply(self) -> str:
        message: dict[str, Any] = {"type": "error"}
        if self.task_id is not None:
            message["taskId"] = self.task_id
        message["data"] = error_data(self.code, str(self), retrying=self.retrying)
        return dumps(message)


class ClientMessage(NamedTuple):
    kind: str
    task_id: str
    last_seq: int | None
    token: object = None


def parse_message(text: str) -> ClientMessage:
    """Read a client message, or raise ClientError."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ClientError(ErrorCode.BAD_REQUEST, "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ClientError(ErrorCode.BAD_REQUEST, "message must be a JSON object")
    task_id = message.get("taskId")
    named = echoed_task_id(task_id) if isinstance(task_id, str) else None
    kind = message.get("type")
    if kind not in ("subscribe", "unsubscribe"):
        raise ClientError(
            ErrorCode.BAD_REQUEST, f"type must be 'subscribe' or 'unsubscribe', got {kind!r}", named
        )
    if not is_valid_task_id(task_id):
        raise ClientError(ErrorCode.INVALID_TASK_ID, invalid_task_id_message(task_id), named)
    last_seq = message.get("lastSeq")
    if last_seq is not None and (
        not isinstance(last_seq, int) or isinstance(last_seq, bool) or not 0 <= last_seq <= MAX_SEQ
    ):
        raise ClientError(ErrorCode.BAD_REQUEST, "lastSeq must be a whole number >= 0", named)
    return ClientMessage(str(kind), str(task_id), last_seq, message.get("token"))


class Connection:
    """One accepted socket, served by one task that wakes only when it has something to do.

    The task sleeps until its subscriber is woken: by a change in a task it watches, by
    a message from the client (the server calls back when one arrives, see
    `workarounds.notify_messages`), or by the watchdog. It then reads what the client
    sent, which returns at once, and sends each frame as it is made: no reader task, no
    list of frames per wake-up, no timer per send. The relay's `Watchdog` resets the
    connection of a client whose send has been stuck for `send_timeout`, which ends the
    send, and closes the subscriber when the server begins to exit. Where the server
    hides its message queue, a second task reads and hands the messages over.
    """

    __slots__ = ("cursors", "hub", "inbox", "receive", "relay", "replies", "send", "subscriber")

    def __init__(self, relay: Relay, receive: Receive, send: Send) -> None:
        self.relay = relay
        self.hub = relay.hub
        self.receive = receive
        self.send = send
        self.subscriber = Subscriber("ws")
        self.cursors: dict[str, TaskCursor] = {}
        self.replies: list[str] | None = None  # made for the first reply: most sockets have none
        self.inbox: list[Message] | None = None  # with a reader task only

    def close(self) -> None:
        """Let go of every subscription (the socket is done)."""
        for cursor in self.cursors.values():
            self.hub.unsubscribe(cursor)
        self.cursors.clear()

    async def read_into_inbox(self) -> None:
        """For servers that hide their queue: read the client's messages and wake the sender."""
        inbox = self.inbox = []
        while True:
            message = await self.receive()
            inbox.append(message)
            self.subscriber.poke()
            if message["type"] == "websocket.disconnect":
                return

    async def serve(self, waiting: Callable[[], bool] | None) -> None:
        """Serve the socket until the client leaves, the server closes, or a send is stuck."""
        subscriber = self.subscriber
        watchdog = self.relay.watchdog
        cursors = self.cursors
        receive = self.receive
        send = self.send
        while True:
            waiter = subscriber.waiter()
            if waiter is not None:
                await waiter
            dirty = subscriber.take()
            inbox = self.inbox if self.inbox is not None else NO_MESSAGES
            while waiting() if waiting is not None else inbox:
                # A message is waiting: receive() returns it at once.
                if not await self.take(await receive() if waiting is not None else inbox.pop(0)):
                    return
            if subscriber.gone or subscriber.closing:
                return
            sent = 0
            if self.replies:
                replies, self.replies = self.replies, None
                for reply in replies:
                    watchdog.sending(subscriber)
                    await send({"type": "websocket.send", "text": reply})
                sent += len(replies)
            for cursor in dirty:
                task_id = cursor.task.task_id
                if cursors.get(task_id) is not cursor:
                    continue  # unsubscribed since it was marked
                for event in cursor.task.catch_up(cursor):
                    watchdog.sending(subscriber)
                    await send({"type": "websocket.send", "text": event.ws})
                    sent += 1
                if cursor.done and cursors.get(task_id) is cursor:
                    del cursors[task_id]
                    self.hub.unsubscribe(cursor)
            watchdog.idle(subscriber)
            if sent:
                self.hub.pushed("ws", sent)

    async def take(self, message: Message) -> bool:
        """Act on one message from the client (False: it left); replies go out next."""
        if message["type"] == "websocket.disconnect":
            return False
        text = message.get("text")
        if text is None:
            self.reply(ClientError(ErrorCode.BAD_REQUEST, "send JSON text frames").reply())
            return True
        try:
            await self.handle(parse_message(text))
        except ClientError as error:
            self.reply(error.reply())
        return True

    async def handle(self, message: ClientMessage) -> None:
        task_id = message.task_id
        old = self.cursors.pop(task_id, None)
        if old is not None:
            self.hub.unsubscribe(old)
        if message.kind == "unsubscribe":
            return
        if (refusal := self.relay.refuse(task_id, message.token)) is not None:
            raise ClientError(refusal.code, refusal.message, task_id)
        limit = self.relay.settings.max_ws_subscriptions
        if len(self.cursors) >= limit:
            message_text = f"at most {limit} subscriptions per socket"
            raise ClientError(ErrorCode.TOO_MANY_TASKS, message_text, task_id)
        admission = await self.relay.admit(task_id, message.token, message.last_seq)
        if isinstance(admission, Delivered):
            # The client holds the ended task's last state: confirm the end, nothing more.
            end = {"status": admission.status}
            self.reply(Event("end", task_id, admission.seq, end).ws)
        elif isinstance(admission, Refusal):
            raise ClientError(
                admission.code, admission.message, task_id, retrying=admission.retrying
            )
        else:
            self.cursors[task_id] = self.hub.subscribe(task_id, self.subscriber, message.last_seq)

    def reply(self, text: str) -> None:
        if self.replies is None:
            self.replies = []
        elif len(self.replies) >= MAX_PENDING_REPLIES:
            del self.replies[0]
        self.replies.append(text)
        self.subscriber.poke()


class WebSocketEndpoint:
    """`WS /v1/ws`, as a plain ASGI app.

    Not a `func(websocket)` endpoint: Starlette wraps those in `websocket_session` and
    its exception handling, three more frames and two closures held by every open
    socket for its whole life, and a call more per message sent. Once the socket is
    accepted, it keeps nothing of the handshake (Starlette's `WebSocket`, the request
    headers, uvicorn's handshake objects): a socket lives for hours, idle most of them.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        relay = relay_of(websocket)
        settings = relay.settings
        if not origin_allowed(websocket.headers, settings.allowed_origins):
            # Closing before accept makes the server answer the upgrade with 403.
            await websocket.close(code=1008)
            return
        try:
            await websocket.accept()
        except (OSError, WebSocketDisconnect):
            return  # gone before the handshake completed
        del websocket
        scope["headers"] = []  # read only for the Origin check; a kilobyte per socket
        release_handshake(receive)
        # Accepted: messages go straight to the server, past Starlette's exception handling.
        connection = Connection(relay, receive, server_send(receive) or send)
        subscriber = connection.subscriber
        waiting = notify_messages(receive, subscriber.poke)
        reader = None if waiting is not None else asyncio.create_task(connection.read_into_inbox())
        # Served from a task of its own: a task's every wake-up resumes each frame of its
        # stack, and this one's is uvicorn's and Starlette's, a dozen frames deep.
        serving = asyncio.create_task(connection.serve(waiting))
        watchdog = relay.watchdog
        watchdog.watch(subscriber, transport_of(receive), serving)
        try:
            await serving
        except OSError:
            return  # the client left, or its connection was reset (a stuck send)
        finally:
            watchdog.forget(subscriber)
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            connection.close()
        if subscriber.closing and not subscriber.gone:
            with contextlib.suppress(OSError):
                # Service restart: come back soon.
                await send({"type": "websocket.close", "code": 1012, "reason": ""})


websocket_endpoint = WebSocketEndpoint()
