"""WebSocket `/v1/ws`: one socket, many task subscriptions, JSON text frames."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import Any, NamedTuple

from starlette.websockets import WebSocket, WebSocketDisconnect

from .origins import origin_allowed
from .protocol import ErrorCode, Event, dumps, error_data, invalid_task_id_message, is_valid_task_id
from .service import Delivered, Refusal, Relay, relay_of
from .subscriber import Cursor, Subscriber
from .workarounds import drop_connection, websocket_receive

logger = logging.getLogger("relay.ws")

MAX_PENDING_REPLIES = 64
MAX_SEQ = (1 << 63) - 1


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
    named = task_id if isinstance(task_id, str) and len(task_id) <= 256 else None
    if named is not None and not named.isascii():
        try:
            named.encode()
        except UnicodeEncodeError:  # a lone surrogate cannot go out in a text frame
            named = None
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
    """One accepted socket: a reader for client messages, a sender for everything outgoing."""

    def __init__(self, websocket: WebSocket, relay: Relay) -> None:
        self.websocket = websocket
        self.relay = relay
        self.hub = relay.hub
        self.send_timeout = relay.settings.send_timeout
        self.subscriber = Subscriber("ws")
        self.cursors: dict[str, Cursor] = {}
        self.replies: deque[str] = deque()

    async def run(self) -> None:
        """Serve the socket until the client leaves, the server closes, or a send times out."""
        reader = asyncio.create_task(self.receive_forever())
        sender = asyncio.create_task(self.send_forever())
        try:
            done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            sender.cancel()
            await asyncio.gather(reader, sender, return_exceptions=True)
            for cursor in self.cursors.values():
                self.hub.unsubscribe(cursor)
            self.cursors.clear()
        for task in done:
            task.result()

    async def receive_forever(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.reply(ClientError(ErrorCode.BAD_REQUEST, "send JSON text frames").reply())
                continue
            try:
                await self.handle(parse_message(text))
            except ClientError as error:
                self.reply(error.reply())

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
        if len(self.replies) >= MAX_PENDING_REPLIES:
            self.replies.popleft()
        self.replies.append(text)
        self.subscriber.poke()

    async def send_forever(self) -> None:
        while True:
            dirty = await self.subscriber.changed()
            if self.subscriber.closing:
                return
            frames = list(self.replies)
            self.replies.clear()
            for cursor in dirty:
                if self.cursors.get(cursor.task.task_id) is not cursor:
                    continue
                for event in cursor.pending():
                    frames.append(event.ws)
                if cursor.done:
                    del self.cursors[cursor.task.task_id]
                    self.hub.unsubscribe(cursor)
            self.hub.pushed("ws", len(frames))
            for frame in frames:
                async with asyncio.timeout(self.send_timeout):
                    await self.websocket.send_text(frame)


async def websocket_endpoint(websocket: WebSocket) -> None:
    """`WS /v1/ws`"""
    relay = relay_of(websocket)
    if not origin_allowed(websocket.headers, relay.settings.allowed_origins):
        # Closing before accept makes the server answer the upgrade with 403.
        await websocket.close(code=1008)
        return
    await websocket.accept()
    connection = Connection(websocket, relay)
    try:
        await connection.run()
    except WebSocketDisconnect:
        return
    except TimeoutError:
        # A close frame would wait behind everything the client did not read: reset instead.
        logger.info("dropping a WebSocket client that stopped reading")
        if not drop_connection(websocket_receive(websocket)):
            with contextlib.suppress(TimeoutError, WebSocketDisconnect):
                async with asyncio.timeout(1):
                    await websocket.close(code=1008)
        return
    if connection.subscriber.closing:
        await websocket.close(code=1012)  # service restart: come back soon
