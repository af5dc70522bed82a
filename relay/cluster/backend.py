"""Cluster mode: several relays share the work through Redis, one poll loop per task in all.

The `Backend` (see `backend.py`) of a relay started with `RELAY_REDIS_URL`. Redis costs
per node and per change, not per task and per turn:

- One ticker per node (`_tick_forever`), every `check_interval`, writes the node's
  heartbeat and reads the live nodes, in one round trip. A lease (`keys.py`) is valid
  while its holder beats, so that heartbeat keeps every lease the node holds. The same
  round trip refreshes the interest entries that are due (once per `interest_refresh`).
- Ownership: a node takes a task's lease when it is free, or from a holder that
  stopped beating; the polling node's changes go out through `ChangeWriter` (fenced by
  the lease, batched, published small).
- Following: a follower learns changes from the channel, and looks at Redis for a task
  only to decide something: its holder stopped beating, its lease was released, or a
  message is missing (a patch that does not follow what it holds, or a reconnect).
- Placement: a free lease goes to the task's rendezvous choice among the live nodes that
  watch it, and a holder hands its lease over to that node after a while
  (`placement.py`), so the polling is spread over the nodes.

Imported only when `RELAY_REDIS_URL` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from math import inf
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.exceptions import RedisError

from ..backend import Change, Receive
from ..hub import NOT_FOUND_TTL
from ..logs import about
from ..metrics import Metrics
from ..protocol import HISTORY_SIZE, dumps
from .keys import ACQUIRE, CHANNEL, LOAD, NODES, RELEASE, interest_key, lease_key, state_key
from .placement import Placement
from .writer import ChangeWriter, Expiry, parse_batch

logger = logging.getLogger("relay.cluster")

# Redis connections per node, opened as calls need them and kept. redis-py's default pool
# refuses the 101st call in flight, which a node whose hundreds of loops start at once
# makes.
REDIS_CONNECTIONS = 2048
REDIS_TIMEOUT = 2.0
STATE_TTL_SECONDS = 3600
# A held lease's key, and its task's stored states, are given this long again once they
# are this old (a lease lives as long as its holder beats; the key's own expiry only
# clears what a vanished cluster left behind).
LEASE_KEY_TTL_SECONDS = STATE_TTL_SECONDS
REFRESH_HELD_AFTER = STATE_TTL_SECONDS / 2
# How often an unreachable Redis is said again in the log.
UNREACHABLE_LOG_EVERY = 30.0


def shown_url(url: str) -> str:
    """The Redis URL for a log line: its password blanked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisBackend:
    """This node's view of the cluster: its Redis connection, leases and subscription."""

    def __init__(self, url: str, lease_ttl: float, metrics: Metrics) -> None:
        self.node_id = secrets.token_hex(8)
        self.url = shown_url(url)
        self.lease_ttl = lease_ttl
        self.leases: set[str] = set()
        self.metrics = metrics
        self.placement = Placement(self.node_id, lease_ttl)
        metrics.leases_held.set_function(lambda: len(self.leases))
        pool = redis.ConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=5,
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._load = self._redis.register_script(LOAD)
        self._release = self._redis.register_script(RELEASE)
        expiry = Expiry(ended=STATE_TTL_SECONDS, unknown=int(NOT_FOUND_TTL))
        self._writer = ChangeWriter(self._redis, self.node_id, expiry, self.failed)
        self._receive: Receive = lambda change: True
        self._tasks: list[asyncio.Task[None]] = []
        # Tasks this node wants (a hub holds them), with the newest seq it has seen of
        # each, published or loaded: a load returns no older state, and no history, again.
        self._wanted: set[str] = set()
        self._known: dict[str, int] = {}
        self._interest_at: dict[str, float] = {}  # when this node's interest entry was written
        self._holders: dict[str, str] = {}  # task -> the node seen holding its lease
        self._held_at: dict[str, float] = {}  # task -> when its keys' expiry was last set
        self._resyncing: dict[str, asyncio.Task[None]] = {}  # at most one per task
        self._beat_at = -inf  # when a heartbeat last reached Redis
        self._listening = False
        self._unreachable_since: float | None = time.monotonic()
        self._unreachable_said = -inf

    # -- health -------------------------------------------------------------------------

    @property
    def check_interval(self) -> float:
        """How often the ticker beats, and a follower looks at a free or orphaned lease."""
        return self.lease_ttl / 3

    @property
    def interest_refresh(self) -> float:
        """How often this node rewrites its interest in a task it watches."""
        return self.lease_ttl * 3

    @property
    def interest_ttl(self) -> float:
        """How long an interest entry lasts unless rewritten: three refreshes."""
        return self.interest_refresh * 3

    @property
    def healthy(self) -> bool:
        """Redis answers: the last heartbeat got through lately and the channel is open."""
        return self._listening and time.monotonic() - self._beat_at < self.lease_ttl

    def failed(self, what: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(what).inc()
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        if now - self._unreachable_said >= UNREACHABLE_LOG_EVERY:
            self._unreachable_said = now
            down = now - self._unreachable_since
            logger.warning(
                "cannot reach Redis at %s (%s: %s) for %.0fs: this node neither polls nor"
                " follows tasks, its subscribers are told cluster_unavailable; retrying",
                self.url,
                what,
                exc,
                down,
            )

    def _answered(self) -> None:
        if self._unreachable_since is not None and self._unreachable_said > -inf:
            logger.info("Redis at %s answers again", self.url)
        self._unreachable_since = None
        self._unreachable_said = -inf

    # -- lifecycle ------------------------------------------------------------------

    def start(self, receive: Receive) -> None:
        self._receive = receive
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="redis listener"),
            asyncio.create_task(self._tick_forever(), name="cluster ticker"),
        ]

    async def close(self) -> None:
        """Stop, leave the registry and release the leases held: bounded, so that a Redis
        that stopped answering cannot hold the relay's shutdown (the leases then end with
        this node's heartbeat)."""
        tasks = [*self._tasks, *self._resyncing.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=REDIS_TIMEOUT)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT * 2):
                await self._writer.close()
                # Leave the registry first, so that no node waits for this one to take a lease.
                with contextlib.suppress(RedisError, OSError):
                    await self._redis.zrem(NODES, self.node_id)
                for task_id in list(self.leases):
                    await self.release(task_id)
        except TimeoutError:
            logger.warning("Redis at %s did not answer: leaving the cluster unannounced", self.url)
        await self._redis.aclose(close_connection_pool=True)

    async def _tick_forever(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.check_interval)

    async def tick(self) -> None:
        """One turn of the node's ticker: heartbeat, live nodes, interest and old keys due."""
        ttl_ms = int(self.lease_ttl * 1000)
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        interest_due = [
            t for t in self._wanted if now - self._interest_at.get(t, -inf) >= self.interest_refresh
        ]
        keys_due = [t for t in self.leases if now - self._held_at.get(t, now) >= REFRESH_HELD_AFTER]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(NODES, {self.node_id: now_ms + ttl_ms})
                pipe.zrangebyscore(NODES, now_ms, "+inf", withscores=True)
                for task_id in interest_due:
                    self._add_interest(pipe, task_id, now_ms)
                for task_id in keys_due:
                    pipe.pexpire(lease_key(task_id), LEASE_KEY_TTL_SECONDS * 1000)
                    pipe.expire(state_key(task_id), STATE_TTL_SECONDS)
                if now - self._beat_at > self.lease_ttl * 10:
                    pipe.zremrangebyscore(NODES, "-inf", now_ms - ttl_ms * 10)
                results = await pipe.execute()
            raise_if_cancelling()
        except (RedisError, OSError) as exc:
            self.failed("heartbeat", exc)
            return
        self._beat_at = now
        self._answered()
        for task_id in interest_due:
            self._interest_at[task_id] = now
        for task_id in keys_due:
            self._held_at[task_id] = now
        self.placement.saw_nodes({node.decode(): ms / 1000 for node, ms in results[1]})
        self.placement.forget_stale(self.interest_refresh * 2)

    def _add_interest(self, pipe: Any, task_id: str, now_ms: int) -> None:
        key = interest_key(task_id)
        ttl_ms = int(self.interest_ttl * 1000)
        pipe.zadd(key, {self.node_id: now_ms + ttl_ms})
        pipe.pexpire(key, ttl_ms)

    async def _listen_forever(self) -> None:
        """Deliver published changes to this node; reconnect and resync on failure."""
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._listening = True
                delay = 0.1
                # Messages published while we were away are lost: read the stored truth.
                for task_id in list(self._wanted):
                    await self._resync(task_id)
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._listening = False
                self.failed("subscribe", exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _listen(self, pubsub: Any) -> None:
        own = self._writer.own_prefix
        while True:
            message = await pubsub.get_message(timeout=self.check_interval)
            raise_if_cancelling()
            if message is None:
                # Quiet channel: make sure Redis is still there (a half-open socket would
                # otherwise go unnoticed).
                await self._redis.ping()
                raise_if_cancelling()
                continue
            data = message.get("data")
            if not isinstance(data, bytes) or data.startswith(own):
                continue
            batch = parse_batch(data)
            if batch is None:
                logger.warning("ignoring a malformed cluster message")
                continue
            for change in batch.changes:
                self._take(change)
            for task_id in batch.released:
                # Taken at this node's next look, if it should poll the task.
                self._holders.pop(task_id, None)

    def _take(self, change: Change) -> None:
        """A change published by another node."""
        task_id = change.task_id
        if task_id not in self._wanted:
            self._receive(change)  # not followed here: nothing to keep in step
            return
        if change.seq is not None:
            known = self._known.get(task_id, -1)
            if change.state is None and known >= 0 and change.seq != known + 1:
                self._resync_soon(task_id)  # a patch that does not follow what we hold
                return
            self._known[task_id] = max(known, change.seq)
        if not self._receive(change):
            self._resync_soon(task_id)

    def _resync_soon(self, task_id: str) -> None:
        if task_id in self._resyncing:
            return
        task = asyncio.create_task(self._resync(task_id), name=f"resync {task_id}")
        self._resyncing[task_id] = task
        task.add_done_callback(lambda _: self._resyncing.pop(task_id, None))

    async def _resync(self, task_id: str) -> None:
        self._known.pop(task_id, None)
        stored = await self.load(task_id)
        if stored is not None:
            self._receive(stored)

    # -- stored state -----------------------------------------------------------------

    async def load(self, task_id: str) -> Change | None:
        """The stored state with its history, or the final error; None also when Redis is away.

        For a task this node wants, a state it has already seen is left out."""
        known = self._known.get(task_id, -1)
        try:
            raw_seq, raw_error, holder, fields = await self._load(
                keys=[state_key(task_id), lease_key(task_id)], args=[known]
            )
        except (RedisError, OSError) as exc:
            self.failed("read", exc)
            return None
        if task_id in self._wanted:
            # Who polls it now: a release whose message was lost is noticed here.
            if holder is None:
                self._holders.pop(task_id, None)
            else:
                self._holders[task_id] = holder.decode()
        error = json.loads(raw_error) if raw_error is not None else None
        seq = int(raw_seq) if raw_seq is not None else None
        ring = ring_entries(fields, seq)
        state = ring[-1][1] if ring and ring[-1][0] == seq else None
        if state is None and error is None:
            return None
        if state is None:
            seq = None
        elif task_id in self._wanted:
            self._known[task_id] = max(self._known.get(task_id, -1), seq or -1)
        return Change(task_id, seq, state, error=error, final=error is not None, history=ring)

    async def store(self, change: Change) -> bool:
        """Store and publish a change while we hold the lease; False when we lost it."""
        stored = await self._writer.write(change)
        if not stored:
            self._gave_up(change.task_id)
        elif change.seq is not None and change.task_id in self._wanted:
            self._known[change.task_id] = max(self._known.get(change.task_id, -1), change.seq)
        return stored

    # -- leases -------------------------------------------------------------------------

    def _gave_up(self, task_id: str) -> None:
        self.leases.discard(task_id)
        self._held_at.pop(task_id, None)
        self.placement.gave_up(task_id)

    def _holder_alive(self, task_id: str) -> bool:
        holder = self._holders.get(task_id)
        if holder is None or holder == self.node_id:
            return False
        return self.placement.live.get(holder, 0.0) > self.placement.clock()

    async def acquire(self, task_id: str) -> bool:
        """Take the lease if it is free (or its holder stopped beating) and this node should
        poll the task (`placement.py`). While a live node holds it, no call at all."""
        if task_id in self.leases:
            return True
        if self._holder_alive(task_id) or not self.healthy:
            return False
        await self._read_watchers(task_id)
        take = self.placement.should_take(task_id)
        dead = self._holders.get(task_id, "")
        try:
            won, holder = await self._acquire(
                keys=[lease_key(task_id), state_key(task_id)],
                args=[
                    self.node_id,
                    "1" if take else "0",
                    dead,
                    LEASE_KEY_TTL_SECONDS * 1000,
                    STATE_TTL_SECONDS,
                ],
            )
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)
            return False
        holder = holder.decode() if isinstance(holder, bytes) else str(holder or "")
        if won != 1:
            if holder:
                self._holders[task_id] = holder
            if won == 0:
                self.placement.held_elsewhere(task_id)
            return False
        self.leases.add(task_id)
        self._held_at[task_id] = time.monotonic()
        self.placement.took(task_id)
        if dead:
            self.metrics.lease_takeovers.inc()
            logger.info("took over polling task %s", task_id, extra=about(task_id))
        self._holders[task_id] = self.node_id
        return True

    async def renew(self, task_id: str) -> bool:
        """Keep the lease between two polls (its holder's heartbeat keeps it); or hand it
        to the node that should poll the task (False: this node stops and follows)."""
        if task_id not in self.leases:
            return False
        if not self.healthy:
            # Redis has not heard from us for a lease period: another node may poll it now.
            self._gave_up(task_id)
            return False
        if self.placement.hand_over_due(task_id):
            await self._read_watchers(task_id, fresh=self.interest_refresh)
            to = self.placement.hand_over_to(task_id)
            if to is not None:
                logger.debug("handing task %s over to node %s", task_id, to, extra=about(task_id))
                await self.release(task_id)
                return False
        return True

    def keep_lease(self, task_id: str) -> AbstractAsyncContextManager[None]:
        """Nothing to do during a call: the node's heartbeat keeps every lease it holds."""
        return nullcontext()

    async def release(self, task_id: str) -> None:
        self._gave_up(task_id)
        self._holders.pop(task_id, None)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                await self._release(keys=[lease_key(task_id)], args=[self.node_id], client=pipe)
                # Followers take a released lease at once instead of at their next look.
                pipe.publish(CHANNEL, dumps({"n": self.node_id, "c": [], "r": [task_id]}))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)

    # -- interest ----------------------------------------------------------------------

    async def interest(self, task_id: str, wanted: bool) -> int:
        """Record (or drop) this node's interest; return how many live nodes want the task.

        Which nodes they are goes to the placement: the lease is for one of them. Written
        when it changes; the ticker rewrites the entries that are due, all in one round
        trip."""
        if wanted and task_id in self._wanted:
            return max(1, self._watcher_count(task_id))
        if wanted:
            self._wanted.add(task_id)
            await self._write_interest(task_id, True)
            return max(1, self._watcher_count(task_id))
        if task_id in self._wanted:
            self._wanted.discard(task_id)
            self._known.pop(task_id, None)
            self._interest_at.pop(task_id, None)
            self._holders.pop(task_id, None)
            await self._write_interest(task_id, False)
        else:
            # Polled for other nodes' subscribers: look again once a lease period.
            await self._read_watchers(task_id, fresh=self.lease_ttl)
        return self._watcher_count(task_id)

    def _watcher_count(self, task_id: str) -> int:
        """The nodes whose interest in the task holds: unexpired, and from a live node, or
        written within the last lease period (a node that joined since the last tick)."""
        now = self.placement.clock()
        recent = now - self.lease_ttl + self.interest_ttl
        _, nodes = self.placement.watchers.get(task_id, (0.0, {}))
        return sum(
            1
            for node, expiry in nodes.items()
            if expiry > now
            and (node == self.node_id or self.placement.live.get(node, 0) > now or expiry > recent)
        )

    async def _write_interest(self, task_id: str, wanted: bool) -> None:
        now_ms = int(time.time() * 1000)
        key = interest_key(task_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if wanted:
                    self._add_interest(pipe, task_id, now_ms)
                else:
                    pipe.zrem(key, self.node_id)
                pipe.zrangebyscore(key, now_ms, "+inf", withscores=True)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("interest", exc)
            return
        if wanted:
            self._interest_at[task_id] = time.monotonic()
        self._saw_watchers(task_id, results[-1])

    async def _read_watchers(self, task_id: str, fresh: float | None = None) -> None:
        """Read which nodes watch the task, unless read within `fresh` seconds."""
        seen = self.placement.watchers.get(task_id)
        limit = self.check_interval if fresh is None else fresh
        if seen is not None and time.monotonic() - seen[0] < limit:
            return
        try:
            entries = await self._redis.zrangebyscore(
                interest_key(task_id), int(time.time() * 1000), "+inf", withscores=True
            )
        except (RedisError, OSError) as exc:
            self.failed("interest", exc)
            return
        self._saw_watchers(task_id, entries)

    def _saw_watchers(self, task_id: str, entries: Any) -> None:
        self.placement.saw_watchers(task_id, {node.decode(): ms / 1000 for node, ms in entries})


def raise_if_cancelling() -> None:
    """redis-py (8.2) can swallow a cancellation that comes during a command, returning its
    answer while the task stays cancelled: a loop around it would then never end, nor
    would the `close` that waits for it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def ring_entries(fields: list[bytes], seq: int | None) -> list[tuple[int, dict[str, Any]]]:
    """The stored states of the ring that lead up to `seq`, oldest first.

    A slot may still hold a state of an earlier run of the task (numbered lower, and not
    within the last `HISTORY_SIZE` of `seq`): left out."""
    if seq is None:
        return []
    entries: list[tuple[int, dict[str, Any]]] = []
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        if not name.startswith(b"r"):
            continue
        entry_seq, state = json.loads(value)
        if seq - HISTORY_SIZE < int(entry_seq) <= seq:
            entries.append((int(entry_seq), state))
    entries.sort(key=lambda entry: entry[0])
    return entries
