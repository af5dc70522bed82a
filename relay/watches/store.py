"""A watch, and the `WatchStore` interface of the stores that keep watches and their events."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from .webhooks import Outbox, Outgoing


@dataclass(frozen=True)
class Watch:
    """A server-held interest in one task, until it ends or `expires_at` (Unix seconds)."""

    task_id: str
    id: str
    created_at: float
    expires_at: float

    @classmethod
    def new(cls, task_id: str, ttl: float) -> Watch:
        now = time.time()
        return cls(task_id, secrets.token_hex(8), now, now + ttl)

    def public(self) -> dict[str, Any]:
        """The watch as the API answers it."""
        return {
            "taskId": self.task_id,
            "id": self.id,
            "createdAt": round(self.created_at, 3),
            "expiresAt": round(self.expires_at, 3),
        }

    def encode(self) -> str:
        return json.dumps(self.public(), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> Watch:
        data = json.loads(raw)
        return cls(data["taskId"], data["id"], data["createdAt"], data["expiresAt"])

    def event_id(self, suffix: str | int) -> str:
        """A `webhook-id` made from the watch: the same event made twice has the same ID."""
        return f"msg_{self.id}_{suffix}"


class WatchStore(Outbox, Protocol):
    """Where watches and their undelivered events live, across restarts.

    In a cluster each call is fenced by this node's claim on the watch: `add_event` and
    `end_watch` return False when another node holds it now.
    """

    async def add_watch(self, watch: Watch) -> tuple[Watch, bool]:
        """Store a watch unless the task has one: (the stored watch, True if it is this one,
        now held by this node)."""

    async def remove_watch(self, task_id: str) -> bool:
        """Drop a task's watch; False when it had none."""

    async def list_watches(self) -> list[Watch]: ...

    async def claim_watches(self, limit: int) -> list[Watch]:
        """Up to `limit` watches no node holds, now held by this one."""

    async def renew_watches(self, task_ids: Collection[str]) -> set[str]:
        """Keep holding these watches; returns those still held (not cancelled nor taken)."""

    async def release_watches(self, task_ids: Collection[str]) -> None:
        """Let other nodes claim these watches at once."""

    async def add_event(self, watch: Watch, event: Outgoing) -> bool:
        """Store an event of a watch held here; False when the watch is gone or held elsewhere."""

    async def end_watch(self, watch: Watch, event: Outgoing | None) -> bool:
        """Drop the watch and store its final event, in one transaction."""

    async def close(self) -> None: ...
