"""`SqliteStore`: a relay alone keeps its watches and undelivered events in SQLite."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from .store import Watch
from .webhooks import Outgoing

T = TypeVar("T")

DATABASE = "relay.sqlite3"
LOCK_FILE = "relay.lock"


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
