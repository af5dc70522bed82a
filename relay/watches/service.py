"""Watches: a backend's standing interest in a task, kept until the task ends, and its events.

`POST /v1/tasks/{taskId}/watch` (app.py) asks `Watches.watch`. A watch held by this
process is a cursor of one `Subscriber("watch")` in the hub, so the hub keeps the task's
poll loop alive exactly as it does for a browser that never leaves, and the loop cap
counts it. The watch's sender (`Watches._send_forever`) reads that cursor as a
WebSocket's sender would, turns what it gets into webhook events (`task.changed`,
`task.ended`) and stores them in the `WatchStore` before anything is sent (`webhooks.py`
delivers them).

Nothing accepted is lost: the watch is stored before `202` is answered, and it leaves the
store in the same transaction that stores its final event. A process that dies between
the two starts again from the stored watch; the final event's `webhook-id` is made from
the watch's ID, so it is the same event made twice, not a second one.

Stores: `SqliteStore` under `RELAY_DATA_DIR` for a relay alone, `RedisWatchStore`
(`redis_store.py`) in a cluster. In a cluster a watch is held by one node at a time: the
node claims it (`claim_watches`) and renews the claim (`renew_watches`) every check
interval; the watches of a node that stops renewing are claimed by another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..hub import Hub, TaskCursor, TaskHub
from ..protocol import Event
from ..subscriber import Subscriber
from .store import Watch, WatchStore
from .webhooks import BACKLOG_LIMIT, Outgoing, event_body

logger = logging.getLogger("relay.watches")

TRANSPORT = "watch"
CLAIM_BATCH = 100
"""Watches one node claims at a time, so that free ones spread over a cluster's nodes."""


@dataclass
class Held:
    """A watch this process holds: its cursor in the hub, and events not yet stored.

    While events wait to be stored the cursor is not read (`deferred`): what changes
    meanwhile comes out of it later as one patch, so a slow store costs no backlog.
    """

    watch: Watch
    cursor: TaskCursor
    unsaved: list[Outgoing] = field(default_factory=list)
    deferred: bool = False
    ending: bool = False
    final: Outgoing | None = None


class Watches:
    """The watches this process holds, kept in the hub as cursors of one subscriber.

    `notify` is called after an event is stored (the webhook dispatcher's `wake`); None
    when no webhook URL is set: watches then only keep their tasks polled.
    """

    def __init__(
        self,
        hub: Hub,
        store: WatchStore,
        *,
        ttl: float,
        events: str,
        max_loops: int,
        interval: float,
        notify: Callable[[], None] | None,
        backlogged: Callable[[], bool] = lambda: False,
    ) -> None:
        self.hub = hub
        self.store = store
        self.ttl = ttl
        self.all_changes = events == "all"
        self.max_loops = max_loops
        self.interval = interval
        self.notify = notify
        self.backlogged = backlogged
        self._skipped = 0
        self.subscriber = Subscriber(TRANSPORT)
        self.held: dict[str, Held] = {}
        self._saving = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._failing = False

    @property
    def count(self) -> int:
        return len(self.held)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._send_forever(), name="watch sender"),
            asyncio.create_task(self._keep_forever(), name="watch keeper"),
        ]

    async def close(self) -> None:
        """Stop, and let other nodes claim what this one held (events not yet stored are made
        again by whoever holds the watch next)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        held = list(self.held)
        for task_id in held:
            self._drop(task_id)
        if held:
            try:
                await self.store.release_watches(held)
            except Exception as exc:
                logger.warning("could not release %d watches: %s", len(held), exc)

    # -- the API -------------------------------------------------------------------------

    async def watch(self, task_id: str) -> Watch | None:
        """The task's watch, made if it has none; None when the loop cap leaves no room."""
        held = self.held.get(task_id)
        if held is not None:
            return held.watch
        if self.hub.get(task_id) is None and self.hub.loop_count >= self.max_loops:
            return None
        watch, claimed = await self.store.add_watch(Watch.new(task_id, self.ttl))
        if claimed and task_id not in self.held:
            self._hold(watch)
        return watch

    async def cancel(self, task_id: str) -> bool:
        removed = await self.store.remove_watch(task_id)
        self._drop(task_id)
        return removed

    async def list(self) -> list[Watch]:
        return await self.store.list_watches()

    # -- holding ---------------------------------------------------------------------------

    def _hold(self, watch: Watch) -> None:
        cursor = self.hub.subscribe(watch.task_id, self.subscriber)
        self.held[watch.task_id] = Held(watch, cursor)

    def _drop(self, task_id: str) -> None:
        held = self.held.pop(task_id, None)
        if held is not None:
            self.hub.unsubscribe(held.cursor)

    async def _send_forever(self) -> None:
        """Turn what each watched task's cursor gets into events, and store them."""
        while True:
            dirty = await self.subscriber.changed()
            if self.subscriber.closing:
                return
            for cursor in dirty:
                self._collect(cursor)
            try:
                await self._save()
            except Exception as exc:
                # Kept in `Held`; the keeper tries again every interval.
                logger.warning("could not store watch events: %s; retrying", exc)

    def _collect(self, cursor: TaskCursor) -> None:
        task = cursor.task
        held = self.held.get(task.task_id)
        if held is None or held.cursor is not cursor:
            return
        if held.unsaved:
            held.deferred = True
            return
        for event in cursor.pending():
            if held.ending:
                return
            if event.is_final:
                held.ending = True
                held.final = self._final_event(held.watch, task, event)
            elif self.all_changes and self.notify is not None and event.seq is not None:
                # A snapshot (the first event, or after a gap) or a patch; never the
                # upstream_unavailable notice.
                if self.backlogged():
                    self._skipped += 1
                    if self._skipped == 1:
                        logger.warning(
                            "over %d webhook events wait: task.changed events are not"
                            " stored until the receiver catches up (ends always are)",
                            BACKLOG_LIMIT,
                        )
                    continue
                self._skipped = 0
                key = "state" if event.kind == "snapshot" else "patch"
                data = {"taskId": task.task_id, "seq": event.seq, key: event.data}
                held.unsaved.append(self._event(held.watch, event.seq, "task.changed", data))

    def _final_event(self, watch: Watch, task: TaskHub, event: Event) -> Outgoing:
        data: dict[str, Any] = {"taskId": task.task_id, "seq": None}
        if event.kind == "end":
            data.update(seq=event.seq, status=event.data["status"])
        else:
            code, message = event.data["code"], event.data["message"]
            data.update(status=code, error={"code": code, "message": message})
            if task.state is not None:
                data["seq"] = task.seq
        if task.state is not None:
            data["state"] = task.state
        return self._event(watch, "end", "task.ended", data)

    def _event(self, watch: Watch, suffix: str | int, kind: str, data: dict[str, Any]) -> Outgoing:
        now = time.time()
        return Outgoing(watch.event_id(suffix), watch.task_id, event_body(kind, data, now), now)

    async def _save(self) -> None:
        """Store what the cursors brought, in order; a watch whose task ended leaves the store
        with its final event. On a store failure the rest waits for the next try."""
        async with self._saving:
            for task_id, held in list(self.held.items()):
                if held.unsaved or held.deferred or held.ending:
                    await self._save_one(task_id, held)

    async def _save_one(self, task_id: str, held: Held) -> None:
        while held.unsaved or held.deferred:
            while held.unsaved:
                if not await self.store.add_event(held.watch, held.unsaved[0]):
                    self._lost(task_id)
                    return
                held.unsaved.pop(0)
                self._notify()
            if held.deferred:
                held.deferred = False
                self._collect(held.cursor)
        if not held.ending:
            return
        final = held.final if self.notify is not None else None
        if not await self.store.end_watch(held.watch, final):
            self._lost(task_id)
            return
        self._drop(task_id)
        if final is not None:
            self._notify()

    def _notify(self) -> None:
        if self.notify is not None:
            self.notify()

    def _lost(self, task_id: str) -> None:
        """The watch was cancelled, or another node holds it now: it is not ours to end."""
        logger.info("watch of task %s is no longer held here", task_id, extra={"task_id": task_id})
        self._drop(task_id)

    async def _keep_forever(self) -> None:
        """Every interval: store what failed to store, expire, renew claims, claim free watches."""
        while True:
            try:
                await self._save()
                self._expire()
                await self._save()
                await self._renew()
                await self._claim()
                if self._failing:
                    logger.info("the watch store answers again")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    logger.warning("watch store unavailable: %s; retrying", exc)
                self._failing = True
            await asyncio.sleep(self.interval)

    def _expire(self) -> None:
        now = time.time()
        for held in self.held.values():
            if not held.ending and held.watch.expires_at <= now:
                held.ending = True
                task = held.cursor.task
                data: dict[str, Any] = {"taskId": task.task_id, "seq": None}
                if task.state is not None:
                    data.update(seq=task.seq, state=task.state)
                held.final = self._event(held.watch, "end", "watch.expired", data)

    async def _renew(self) -> None:
        if not self.held:
            return
        kept = await self.store.renew_watches(list(self.held))
        for task_id in [t for t in self.held if t not in kept]:
            self._lost(task_id)

    async def _claim(self) -> None:
        room = min(self.max_loops - self.hub.loop_count, CLAIM_BATCH)
        if room <= 0:
            return
        for watch in await self.store.claim_watches(room):
            if watch.task_id not in self.held:
                self._hold(watch)
