"""What the relay says to browsers: task IDs, error codes and events, encoded once per change."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal
from urllib.parse import unquote

TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
TERMINAL = frozenset({"succeeded", "failed"})
"""The statuses after which a task never changes again."""
MAX_SEQ = (1 << 63) - 1
"""The largest sequence number a client may claim to hold (a signed 64-bit integer)."""
ECHOED_ID_LENGTH = 256
"""The longest task ID an error repeats whole: twice the longest valid one."""
HISTORY_SIZE = 64
"""States of a task kept to answer a resume with one patch, in a hub and in a cluster."""

EventKind = Literal["snapshot", "patch", "end", "error"]


class ErrorCode(StrEnum):
    TASK_NOT_FOUND = "task_not_found"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    INVALID_TASK_ID = "invalid_task_id"
    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"
    TOO_MANY_TASKS = "too_many_tasks"
    OVERLOADED = "overloaded"
    CLUSTER_UNAVAILABLE = "cluster_unavailable"
    INTERNAL_ERROR = "internal_error"


def is_valid_task_id(value: object) -> bool:
    return isinstance(value, str) and TASK_ID_PATTERN.fullmatch(value) is not None


def echoed_task_id(value: str) -> str:
    """A task ID as an error about it names it back (`taskId` on the many-task stream and
    the WebSocket): as given, up to ECHOED_ID_LENGTH characters; a longer one cut there and
    marked with `...`, which no valid ID contains. A lone surrogate, which cannot be sent
    as UTF-8, becomes U+FFFD."""
    if len(value) > ECHOED_ID_LENGTH:
        value = value[:ECHOED_ID_LENGTH] + "..."
    return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def invalid_task_id_message(value: object) -> str:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"task ID must be 1 to 128 characters of A-Z, a-z, 0-9, '_' and '-', got {shown}"


def unknown_task_message(task_id: str) -> str:
    """What every answer about a task the upstream does not know says (`task_not_found`)."""
    return f"upstream does not know task {task_id}"


def task_id_in_path(scope: Mapping[str, Any], prefix: str = "/v1/tasks/") -> str:
    """The task ID segment of `/v1/tasks/{id}[/events]`, percent-decoded.

    Read from the raw path: the server decodes `%2F` to `/` before routing, so a
    decoded path cannot tell the ID `a/events` from the events of task `a`.
    """
    raw = scope.get("raw_path") or scope["path"].encode()
    rest = raw.decode("latin-1").split("?", 1)[0].removeprefix(prefix)
    segment = rest.removesuffix("/events")
    return unquote(segment, errors="replace")


def error_data(code: ErrorCode, message: str, *, retrying: bool = False) -> dict[str, Any]:
    return {"code": code.value, "message": message, "retrying": retrying}


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Event:
    """One message about one task, shared by every subscriber that receives it.

    The encodings are computed on first use and cached, so a change is encoded
    once per transport however many subscribers it reaches.
    """

    __slots__ = ("__dict__", "data", "kind", "seq", "task_id")

    def __init__(self, kind: EventKind, task_id: str, seq: int | None, data: dict[str, Any]):
        self.kind: EventKind = kind
        self.task_id = task_id
        self.seq = seq
        self.data = data

    def __repr__(self) -> str:
        return f"Event({self.kind!r}, {self.task_id!r}, seq={self.seq})"

    @property
    def is_final(self) -> bool:
        """True when nothing follows this event for its task: an end or a final error."""
        return self.kind == "end" or (self.kind == "error" and not self.data.get("retrying"))

    @cached_property
    def data_json(self) -> str:
        return dumps(self.data)

    @cached_property
    def sse(self) -> bytes:
        """The event as it appears on a single-task SSE stream."""
        head = "" if self.seq is None else f"id: {self.seq}\n"
        return f"{head}event: {self.kind}\ndata: {self.data_json}\n\n".encode()

    @cached_property
    def sse_multiplexed(self) -> bytes:
        """The event and data lines on a many-task stream; the stream adds its own id line."""
        task_id = dumps(self.task_id)
        return (
            f'event: {self.kind}\ndata: {{"taskId":{task_id},"data":{self.data_json}}}\n'.encode()
        )

    @cached_property
    def ws(self) -> str:
        """The event as a WebSocket text frame."""
        seq = "" if self.seq is None else f',"seq":{self.seq}'
        task_id = dumps(self.task_id)
        return f'{{"type":"{self.kind}","taskId":{task_id}{seq},"data":{self.data_json}}}'
