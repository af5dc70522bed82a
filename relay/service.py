"""One relay process: the parts that live as long as the server, and who may subscribe.

`Relay` is created in the app's lifespan and reached from any route with
`relay_of(request)`. Every transport asks `Relay.admit` whether a subscription
may start, so the rules (task ID, token, resume of an ended task, the loop cap)
live here once and a transport only frames the answer.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from .backend import Backend, Change
from .config import Settings
from .hub import Hub, TaskHub
from .metrics import Metrics
from .protocol import ErrorCode, invalid_task_id_message, is_valid_task_id, unknown_task_message
from .tokens import grant
from .upstream import TaskNotFound, UpstreamClient
from .watchdog import Watchdog
from .watches import Watches

OVERLOADED_MESSAGE = "the relay watches as many tasks as it can; retry later"


@dataclass(frozen=True)
class Refusal:
    """A subscription that may not start, with the HTTP status that says why."""

    status: int
    code: ErrorCode
    message: str

    @property
    def retrying(self) -> bool:
        """True when the client may try again later (the relay is full)."""
        return self.code == ErrorCode.OVERLOADED


@dataclass(frozen=True)
class Delivered:
    """The client already holds an ended task's last state: there is nothing more to send."""

    seq: int
    status: str


@dataclass(frozen=True)
class Admitted:
    """The subscription may start."""


ADMITTED = Admitted()
Admission = Admitted | Delivered | Refusal


class StateLookup:
    """`GET /v1/tasks/{id}` without a loop: one upstream call, shared by concurrent requests."""

    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def fetch(self, task_id: str) -> dict[str, Any]:
        call = self._calls.get(task_id)
        if call is None:
            call = asyncio.ensure_future(self._upstream.progress(task_id))
            self._calls[task_id] = call
            call.add_done_callback(lambda _: self._calls.pop(task_id, None))
        return await asyncio.shield(call)

    async def close(self) -> None:
        """Cancel the calls still running (at shutdown: the HTTP client closes next)."""
        calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


@dataclass
class Relay:
    settings: Settings
    hub: Hub
    backend: Backend
    upstream: UpstreamClient
    metrics: Metrics
    lookup: StateLookup
    watchdog: Watchdog
    rng: random.Random = field(default_factory=random.Random)
    # Server-held watches: None unless the server API or webhooks are configured.
    watches: Watches | None = None

    def refuse(self, task_id: str, token: object) -> Refusal | None:
        """Why a request about this task may not be answered at all (bad ID, no access)."""
        if not is_valid_task_id(task_id):
            return Refusal(400, ErrorCode.INVALID_TASK_ID, invalid_task_id_message(task_id))
        refusal = grant(self.settings.token_secret, token).refusal(task_id)
        if refusal is not None:
            return Refusal(401, ErrorCode.UNAUTHORIZED, refusal)
        return None

    async def admit(
        self, task_id: str, token: object, seq: int | None, *, reserved: int = 0
    ) -> Admission:
        """Whether a subscription to `task_id` from a client holding state `seq` may start.

        `reserved` counts the new poll loops the same request already needs (a
        many-task stream), for the loop cap.
        """
        refusal = self.refuse(task_id, token)
        if refusal is not None:
            return refusal
        task = self.hub.get(task_id)
        known = ended_view(task) if task is not None else await self._stored_view(task_id)
        if known is not None:
            final_seq, status, error = known
            if final_seq is not None and seq is not None and seq >= final_seq:
                return Delivered(final_seq, status)
            if error is not None and error["code"] == ErrorCode.TASK_NOT_FOUND:
                # Streamed, this error would have EventSource reconnect forever; a 404 ends it.
                return Refusal(404, ErrorCode.TASK_NOT_FOUND, error["message"])
        if task is None and self.hub.loop_count + reserved >= self.settings.max_loops:
            return Refusal(503, ErrorCode.OVERLOADED, OVERLOADED_MESSAGE)
        return ADMITTED

    async def _stored_view(self, task_id: str) -> EndedView | None:
        stored = await self.backend.load(task_id)
        return stored_view(stored) if stored is not None and stored.ended else None

    async def current_state(self, task_id: str) -> tuple[dict[str, Any], int | None]:
        """A task's state and its sequence number (None when the relay has not numbered it).

        From the running loop or a kept ended state, else what the cluster stores, else
        one upstream call. Raises what `UpstreamClient.progress` raises.
        """
        task = self.hub.get(task_id)
        if task is not None and task.state is not None:
            return task.state, task.seq
        if task is not None and task.ended:
            raise TaskNotFound(unknown_task_message(task_id))
        stored = await self.backend.load(task_id)
        if stored is not None and stored.state is not None:
            return stored.state, stored.seq
        return await self.lookup.fetch(task_id), None


# The last sequence number of an ended task (None without a state), its end status, and
# its final error if it ended in one.
EndedView = tuple[int | None, str, dict[str, Any] | None]


def ended_view(task: TaskHub) -> EndedView | None:
    if not task.ended:
        return None
    status = str(task.state.get("status")) if task.state is not None else ""
    return task.final_seq, status, task.final_error


def stored_view(stored: Change) -> EndedView:
    status = str(stored.state.get("status")) if stored.state is not None else ""
    return stored.seq, status, stored.error


def relay_of(connection: HTTPConnection) -> Relay:
    """The relay serving this request or WebSocket."""
    relay: Relay = connection.app.state.relay
    return relay
