"""Watches: a backend's standing interest in a task, kept until the task ends, and its events.

`POST /v1/tasks/{taskId}/watch` (app.py) asks `Watches.watch`. A watch held by this
process is a cursor of one `Subscriber("watch")` in the hub, so the hub keeps the task's
poll loop alive exactly as it does for a browser that never leaves, and the loop cap
counts it. The watch's sender (`Watches._send_forever`) reads that cursor as a
WebSocket's sender would, turns what it gets into webhook events (`task.changed`,
`task.ended`) and stores them in the `WatchStore` before anything is sent (webhooks.py
delivers them).

Nothing accepted is lost: the watch is stored before `202` is answered, and it leaves the
store in the same transaction that stores its final event. A process that dies between
the two starts again from the stored watch; the final event's `webhook-id` is made from
the watch's ID, so it is the same event made twice, not a second one.

Stores: `SqliteStore` under `RELAY_DATA_DIR` for a relay alone, `RedisWatchStore`
(redis_backend.py) in a cluster. In a cluster a watch is held by one node at a time: the
node claims it (`claim_watches`) and renews the claim (`renew_watches`) every check
interval; the watches of a node that stops renewing are claimed by another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .hub import Hub, TaskHub
from .protocol import Event
from .subscriber import Cursor, Subscriber
from .webhooks import BACKLOG_LIMIT, Outbox, Outgoing, event_body

logger = logging.getLogger("relay.watches")

T = TypeVar("T")

TRANSPORT = "watch"
CLAIM_BATCH = 100
"""Watches one node claims at a time, so that free ones spread over a cluster's nodes."""
DATABASE = "relay.sqlite3"
LOCK_FILE = "relay.lock"


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


def default_data_dir() -> Path:
    """The per-user data directory: XDG on Linux and the like, the platform's own elsewhere."""
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "comfy-relay"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "comfy-relay"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "comfy-relay"


class DataDirInUse(RuntimeError):
    """Another relay process holds the data directory's lock."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS watches (
    task_id    TEXT PRIMARY KEY,
    id         TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id         TEXT PRIMARY KEY,
    task_id    TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    due        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_due ON events (due);
PRAGMA user_version = 1;
"""


class SqliteStore:
    """Watches and undelivered events of a relay alone, in SQLite under its data directory.

    One connection, used by one thread at a time (`asyncio.to_thread`, serialized by a
    lock), so the event loop never waits on the disk. WAL with `synchronous=FULL`: what
    a call stored survives a killed process and a power cut. A lock file keeps a second
    relay from sharing the directory (both would deliver every event).
    """

    def __init__(self, directory: Path, connection: sqlite3.Connection, lock_fd: int) -> None:
        self.directory = directory
        self._db = connection
        self._lock_fd = lock_fd
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        # Alone, this process holds every stored watch; these are the ones handed out, and
        # `_complete` says that none is left to hand out.
        self._claimed: set[str] = set()
        self._complete = False
        self._sending: set[str] = set()  # events claimed for delivery

    @classmethod
    async def open(cls, directory: Path) -> SqliteStore:
        return await asyncio.to_thread(cls._open, directory)

    @classmethod
    def _open(cls, directory: Path) -> SqliteStore:
        import fcntl  # POSIX only, like the relay's deployments

        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(
                f"another relay uses the data directory {directory}: give each relay its own"
                " RELAY_DATA_DIR, or run them as a cluster (RELAY_REDIS_URL)"
            ) from None
        db = sqlite3.connect(directory / DATABASE, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        return cls(directory, db, fd)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            # A cancelled caller leaves its thread running: the thread lock, not the asyncio
            # one, keeps the next call (or `close`) from using the connection meanwhile.
            with self._thread_lock:
                return fn(*args)

        async with self._lock:
            return await asyncio.to_thread(locked)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    async def close(self) -> None:
        await self._run(self._db.close)
        os.close(self._lock_fd)

    # -- watches -------------------------------------------------------------------------

    async def add_watch(self, watch: Watch) -> tuple[Watch, bool]:
        return await self._run(self._add_watch, watch)

    def _add_watch(self, watch: Watch) -> tuple[Watch, bool]:
        with self._transaction():
            added = self._db.execute(
                "INSERT OR IGNORE INTO watches VALUES (?, ?, ?, ?)",
                (watch.task_id, watch.id, watch.created_at, watch.expires_at),
            ).rowcount
            row = self._db.execute(
                "SELECT task_id, id, created_at, expires_at FROM watches WHERE task_id = ?",
                (watch.task_id,),
            ).fetchone()
        if added:
            self._claimed.add(watch.task_id)
        return Watch(*row), bool(added)

    async def remove_watch(self, task_id: str) -> bool:
        def remove() -> bool:
            self._claimed.discard(task_id)
            with self._transaction():
                deleted = self._db.execute("DELETE FROM watches WHERE task_id = ?", (task_id,))
            return deleted.rowcount > 0

        return await self._run(remove)

    async def list_watches(self) -> list[Watch]:
        def read() -> list[Watch]:
            rows = self._db.execute(
                "SELECT task_id, id, created_at, expires_at FROM watches ORDER BY created_at"
            ).fetchall()
            return [Watch(*row) for row in rows]

        return await self._run(read)

    async def claim_watches(self, limit: int) -> list[Watch]:
        if self._complete:
            return []
        watches = [w for w in await self.list_watches() if w.task_id not in self._claimed]
        claimed = watches[:limit]
        self._claimed.update(w.task_id for w in claimed)
        self._complete = len(claimed) == len(watches)
        return claimed

    async def renew_watches(self, task_ids: Collection[str]) -> set[str]:
        # No other process changes the directory (its lock): what this one holds is in memory.
        return {task_id for task_id in task_ids if task_id in self._claimed}

    async def release_watches(self, task_ids: Collection[str]) -> None:
        self._claimed.difference_update(task_ids)
        self._complete = False

    async def add_event(self, watch: Watch, event: Outgoing) -> bool:
        return await self._run(self._queue, watch, event, False)

    async def end_watch(self, watch: Watch, event: Outgoing | None) -> bool:
        return await self._run(self._queue, watch, event, True)

    def _queue(self, watch: Watch, event: Outgoing | None, end: bool) -> bool:
        with self._transaction():
            held = self._db.execute(
                "SELECT 1 FROM watches WHERE task_id = ? AND id = ?", (watch.task_id, watch.id)
            ).fetchone()
            if held is None:
                return False
            if event is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO events (id, task_id, body, created_at, due)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (event.id, event.task_id, event.body, event.created_at, event.created_at),
                )
            if end:
                self._db.execute("DELETE FROM watches WHERE task_id = ?", (watch.task_id,))
                self._claimed.discard(watch.task_id)
        return True

    # -- the outbox ----------------------------------------------------------------------

    async def claim_events(self, limit: int, hold: float) -> list[Outgoing]:
        # Alone, the claim is kept in memory (`_sending`), not written: after a crash every
        # event is due at once, not `hold` seconds later.
        def claim() -> list[Outgoing]:
            rows = self._db.execute(
                "SELECT id, task_id, body, created_at, attempts FROM events"
                " WHERE due <= ? ORDER BY due LIMIT ?",
                (time.time(), limit + len(self._sending)),
            ).fetchall()
            claimed = [Outgoing(*row) for row in rows if row[0] not in self._sending][:limit]
            self._sending.update(event.id for event in claimed)
            return claimed

        return await self._run(claim)

    async def retry_event(self, event_id: str, attempts: int, delay: float) -> None:
        def retry() -> None:
            with self._transaction():
                self._db.execute(
                    "UPDATE events SET attempts = ?, due = ? WHERE id = ?",
                    (attempts, time.time() + delay, event_id),
                )
            self._sending.discard(event_id)

        await self._run(retry)

    async def finish_event(self, event_id: str) -> None:
        def finish() -> None:
            with self._transaction():
                self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))
            self._sending.discard(event_id)

        await self._run(finish)

    async def release_events(self, event_ids: list[str]) -> None:
        self._sending.difference_update(event_ids)

    async def pending_events(self) -> tuple[int, float]:
        def count() -> tuple[int, float]:
            total, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(created_at) FROM events"
            ).fetchone()
            return int(total), max(0.0, time.time() - oldest) if oldest is not None else 0.0

        return await self._run(count)


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`, or `ROLLBACK` on an exception (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


@dataclass
class Held:
    """A watch this process holds: its cursor in the hub, and events not yet stored.

    While events wait to be stored the cursor is not read (`deferred`): what changes
    meanwhile comes out of it later as one patch, so a slow store costs no backlog.
    """

    watch: Watch
    cursor: Cursor
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

    def _collect(self, cursor: Cursor) -> None:
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
