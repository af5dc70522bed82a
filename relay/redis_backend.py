"""Cluster mode: several relays share the work through Redis, one poll loop per task in all.

The `Backend` (see `backend.py`) of a relay started with `RELAY_REDIS_URL`:

- Ownership: the node holding a task's lease (taken only while free, renewed and
  released by compare-and-set scripts) polls it; the others follow.
- Placement: nodes register with heartbeats; a free lease goes to the task's rendezvous
  choice among the live nodes that watch it, and a holder hands its lease over to that
  node after a while (`placement.py`), so the polling is spread over the nodes.
- Fan-out: the owner stores each change (sequence number, state, recent history) and
  publishes it in one atomic script, fenced by its lease; every node delivers it to
  its local subscribers.
- Interest: each node with local subscribers keeps an expiring entry in the task's
  interest set; the owner polls on while any node is interested.
- Recovery: pub/sub is at most once, so followers re-read the stored state every
  lease period, and every node resyncs its tasks after reconnecting to Redis.

Imported only when `RELAY_REDIS_URL` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Collection
from math import inf
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from .backend import Change, Receive
from .hub import NOT_FOUND_TTL
from .metrics import Metrics
from .placement import Placement
from .poll_loop import about
from .protocol import dumps
from .watches import Watch
from .webhooks import Outgoing

logger = logging.getLogger("relay.cluster")

CHANNEL = "relay:changes"
NODES = "relay:nodes"
# Redis connections per node, opened as calls need them and kept. redis-py's default pool
# refuses the 101st call in flight, which a node whose hundreds of loops start at once
# makes; its blocking pool hands connections over through a condition that a few thousand
# loops queue on, which capped a node at a few hundred changes a second.
REDIS_CONNECTIONS = 2048
REDIS_TIMEOUT = 2.0
STATE_TTL_SECONDS = 3600
HISTORY_LENGTH = 64

# Write a change and publish it, only while we hold the lease (a fence against a
# node whose lease expired during a slow upstream call); a store renews the lease.
STORE_STATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('HSET', KEYS[2], 'seq', ARGV[2], 'state', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[7]) - 1)
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('PUBLISH', ARGV[5], ARGV[8])
return 1
"""
STORE_ERROR = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'error', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[4], ARGV[6])
return 1
"""
# Take the lease if it is free and ARGV[3] says to; 1 taken (or already ours), 0 held by
# another node, 2 free and left to the node that should take it.
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
if ARGV[3] ~= '1' then return 2 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# The stored state, error and history; only the error when the stored seq is not above
# ARGV[1], the seq this node already holds (a follower's periodic look costs a few bytes).
LOAD = """
local seq, state, err = unpack(redis.call('HMGET', KEYS[1], 'seq', 'state', 'error'))
if seq and tonumber(seq) <= tonumber(ARGV[1]) then return {seq, false, err, {}} end
return {seq, state, err, redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)}
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(task_id: str) -> str:
    return f"relay:lease:{task_id}"


def state_key(task_id: str) -> str:
    return f"relay:task:{task_id}"


def history_key(task_id: str) -> str:
    return f"relay:history:{task_id}"


def interest_key(task_id: str) -> str:
    return f"relay:interest:{task_id}"


class RedisBackend:
    """This node's view of the cluster: its Redis connection, leases and subscription."""

    def __init__(self, url: str, lease_ttl: float, metrics: Metrics) -> None:
        self.node_id = secrets.token_hex(8)
        self.lease_ttl = lease_ttl
        self.healthy = False
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
        self._store_state = self._redis.register_script(STORE_STATE)
        self._store_error = self._redis.register_script(STORE_ERROR)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._load = self._redis.register_script(LOAD)
        self._renew = self._redis.register_script(RENEW)
        self._release = self._redis.register_script(RELEASE)
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        # Tasks this node wants (to resync after a reconnect), and those it followed
        # while another node polled them (to tell a takeover from a first lease).
        self._wanted: set[str] = set()
        # For the tasks it wants (a hub holds them), the newest seq this node has seen,
        # published or loaded: a load returns no older state, and no history, again.
        self._known: dict[str, int] = {}
        self._interest_at: dict[str, float] = {}  # when this node last wrote its interest
        self._renewed: dict[str, float] = {}  # when each lease held was last extended
        # This node's own messages come back to it: told by their first bytes, and skipped.
        self._own = (dumps({"n": self.node_id})[:-1] + ",").encode()
        self._followed: set[str] = set()

    @property
    def check_interval(self) -> float:
        """How often followers look for a free lease and owners renew theirs."""
        return self.lease_ttl / 3

    def failed(self, what: str, exc: BaseException) -> None:
        if self.healthy:
            logger.warning("redis unreachable (%s): %s", what, exc)
        self.healthy = False
        self.metrics.redis_errors.labels(what).inc()

    # -- lifecycle ------------------------------------------------------------------

    def start(self, receive: Receive) -> None:
        self._listener = asyncio.create_task(self._listen(receive), name="redis listener")
        self._heartbeat = asyncio.create_task(self._beat(), name="node heartbeat")

    async def close(self) -> None:
        for task in (self._listener, self._heartbeat):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # Leave the registry first, so that no node waits for this one to take a lease.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.zrem(NODES, self.node_id)
        for task_id in list(self.leases):
            await self.release(task_id)
        await self._redis.aclose(close_connection_pool=True)

    async def _beat(self) -> None:
        """Keep this node in the registry, and read who else is alive, every lease check."""
        ttl_ms = int(self.lease_ttl * 1000)
        while True:
            now_ms = int(time.time() * 1000)
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.zadd(NODES, {self.node_id: now_ms + ttl_ms})
                    pipe.zremrangebyscore(NODES, "-inf", now_ms)
                    pipe.zrange(NODES, 0, -1, withscores=True)
                    pipe.pexpire(NODES, ttl_ms * 3)
                    results = await pipe.execute()
            except (RedisError, OSError) as exc:
                self.failed("lease", exc)
            else:
                self.placement.saw_nodes({node.decode(): ms / 1000 for node, ms in results[2]})
            self.placement.forget_stale(self.lease_ttl * 3)
            await asyncio.sleep(self.check_interval)

    async def _listen(self, receive: Receive) -> None:
        """Deliver published changes to this node; reconnect and resync on failure."""
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self.healthy = True
                delay = 0.1
                # Messages published while we were away are lost: read the stored truth.
                for task_id in list(self._wanted):
                    stored = await self.load(task_id)
                    if stored is not None:
                        receive(stored)
                while True:
                    message = await pubsub.get_message(timeout=self.check_interval)
                    if message is not None:
                        data = message.get("data")
                        if isinstance(data, bytes) and data.startswith(self._own):
                            continue
                        change = parse_message(data)
                        if change is not None:
                            self._saw(change)
                            receive(change)
                    else:
                        # Quiet channel: make sure Redis is still there (a half-open
                        # socket would otherwise go unnoticed), and say so in /healthz.
                        await self._redis.ping()
                        self.healthy = True
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.failed("subscribe", exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # -- stored state -----------------------------------------------------------------

    def _saw(self, change: Change) -> None:
        if change.seq is not None and change.task_id in self._wanted:
            known = self._known.get(change.task_id, -1)
            self._known[change.task_id] = max(known, change.seq)

    async def load(self, task_id: str) -> Change | None:
        """The stored state with its history, or the final error; None also when Redis is away.

        For a task this node wants, a state it has already seen is left out."""
        known = self._known.get(task_id, -1)
        try:
            raw_seq, raw_state, raw_error, history = await self._load(
                keys=[state_key(task_id), history_key(task_id)], args=[known, HISTORY_LENGTH]
            )
        except (RedisError, OSError) as exc:
            self.failed("read", exc)
            return None
        seq: int | None = None
        state: dict[str, Any] | None = None
        if raw_state is not None:
            seq, state = int(raw_seq), json.loads(raw_state)
        error = json.loads(raw_error) if raw_error is not None else None
        if state is None and error is None:
            return None
        entries = [json.loads(entry) for entry in reversed(history)]
        change = Change(
            task_id,
            seq,
            state,
            error=error,
            final=error is not None,
            history=[(int(s), old) for s, old in entries],
        )
        self._saw(change)
        return change

    async def store(self, change: Change) -> bool:
        """Store and publish a change while we hold the lease; False when we lost it."""
        task_id = change.task_id
        if change.error is None:
            message = {
                "n": self.node_id,
                "t": task_id,
                "s": change.seq,
                "state": change.state,
                "p": change.patch,
            }
            args = [
                self.node_id,
                change.seq,
                dumps(change.state),
                dumps([change.seq, change.state]),
                CHANNEL,
                STATE_TTL_SECONDS,
                HISTORY_LENGTH,
                dumps(message),
                int(self.lease_ttl * 1000),
            ]
            keys = [lease_key(task_id), state_key(task_id), history_key(task_id)]
            stored = await self._fenced(self._store_state, keys, args, task_id)
            if stored:
                self._saw(change)
            return stored
        message = {"n": self.node_id, "t": task_id, "e": change.error, "final": change.final}
        # A final error (an ID unknown upstream, refused credentials) is remembered as
        # briefly as a single relay remembers an unknown ID: the task may yet be created,
        # the keys fixed, and it must not stay refused cluster-wide for long.
        args = [
            self.node_id,
            "1" if change.final else "0",
            dumps(change.error),
            CHANNEL,
            int(NOT_FOUND_TTL),
            dumps(message),
            int(self.lease_ttl * 1000),
        ]
        keys = [lease_key(task_id), state_key(task_id)]
        return await self._fenced(self._store_error, keys, args, task_id)

    async def _fenced(self, script: Any, keys: list[str], args: list[Any], task_id: str) -> bool:
        try:
            done = bool(await script(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            self.failed("publish", exc)
            done = False  # the loop stops polling; if the lease is still ours, it retakes it
        if done:
            self._renewed[task_id] = time.monotonic()
        else:
            self._gave_up(task_id)
        return done

    # -- leases -------------------------------------------------------------------------

    def _gave_up(self, task_id: str) -> None:
        self.leases.discard(task_id)
        self._renewed.pop(task_id, None)
        self.placement.gave_up(task_id)

    async def acquire(self, task_id: str) -> bool:
        """Take the lease if it is free and this node should poll the task (`placement.py`)."""
        take = self.placement.should_take(task_id)
        try:
            won = await self._acquire(
                keys=[lease_key(task_id)],
                args=[self.node_id, int(self.lease_ttl * 1000), "1" if take else "0"],
            )
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)
            return False
        if won == 0:
            self._followed.add(task_id)
            self.placement.held_elsewhere(task_id)
            self.leases.discard(task_id)
        if won != 1:
            return False
        self.leases.add(task_id)
        self._renewed[task_id] = time.monotonic()
        self.placement.took(task_id)
        if task_id in self._followed:
            self._followed.discard(task_id)
            self.metrics.lease_takeovers.inc()
            logger.info("took over polling task %s", task_id, extra=about(task_id))
        return True

    async def renew(self, task_id: str) -> bool:
        """Keep the lease between two polls; or hand it to the node that should poll the
        task (False: this node stops polling it, and follows)."""
        to = self.placement.hand_over_to(task_id)
        if to is not None:
            logger.debug("handing task %s over to node %s", task_id, to, extra=about(task_id))
            await self.release(task_id)
            return False
        if time.monotonic() - self._renewed.get(task_id, -inf) < self.check_interval:
            # Renewed (or stored, which renews) moments ago. Were the lease lost since,
            # the fenced store would say so before anything is published.
            return True
        return await self._renew_lease(task_id)

    async def _renew_lease(self, task_id: str) -> bool:
        try:
            kept = bool(
                await self._renew(
                    keys=[lease_key(task_id)], args=[self.node_id, int(self.lease_ttl * 1000)]
                )
            )
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)
            kept = False
        if kept:
            self._renewed[task_id] = time.monotonic()
        else:
            self._gave_up(task_id)
        return kept

    @contextlib.asynccontextmanager
    async def keep_lease(self, task_id: str) -> AsyncIterator[None]:
        """Keep renewing the lease while the body runs: an upstream call (with its retries
        and the result fetch) can last longer than the lease itself."""
        keeper = asyncio.create_task(self._keep(task_id), name=f"lease {task_id}")
        try:
            yield
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _keep(self, task_id: str) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            if not await self._renew_lease(task_id):
                return  # lost: the fenced store that follows will notice

    async def release(self, task_id: str) -> None:
        self._gave_up(task_id)
        try:
            await self._release(keys=[lease_key(task_id)], args=[self.node_id])
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)

    # -- interest ----------------------------------------------------------------------

    async def interest(self, task_id: str, wanted: bool) -> int:
        """Record (or drop) this node's interest; return how many nodes are interested.

        Which nodes they are goes to the placement: the lease is for one of them. An entry
        lives three lease periods: a node that still wants a task rewrites it (and reads
        the others) once a lease period, not at every turn of its loop."""
        if wanted:
            fresh = time.monotonic() - self._interest_at.get(task_id, -inf) < self.lease_ttl
            watchers = self.placement.watchers.get(task_id)
            if fresh and task_id in self._wanted and watchers is not None:
                return len(watchers[1])
            self._wanted.add(task_id)
        else:
            self._wanted.discard(task_id)
            self._followed.discard(task_id)
            self._known.pop(task_id, None)
            self._interest_at.pop(task_id, None)
        now_ms = int(time.time() * 1000)
        key = interest_key(task_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if wanted:
                    pipe.zadd(key, {self.node_id: now_ms + int(self.lease_ttl * 3000)})
                else:
                    pipe.zrem(key, self.node_id)
                pipe.zremrangebyscore(key, "-inf", now_ms)
                pipe.zrange(key, 0, -1, withscores=True)
                pipe.expire(key, max(1, int(self.lease_ttl * 3)))
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("interest", exc)
            return 1 if wanted else 0
        if wanted:
            self._interest_at[task_id] = time.monotonic()
        nodes = {node.decode(): ms / 1000 for node, ms in results[2]}
        self.placement.saw_watchers(task_id, nodes)
        return len(nodes)


def parse_message(raw: Any) -> Change | None:
    """A change published by the polling node; None (and a warning) for anything else."""
    try:
        message = json.loads(raw)
        task_id = message["t"]
        if "state" in message:
            return Change(task_id, int(message["s"]), message["state"], message.get("p"))
        error = message["e"]
        return Change(
            task_id,
            error={"code": str(error["code"]), "message": str(error["message"])},
            final=bool(message.get("final")),
        )
    except (ValueError, TypeError, KeyError):
        logger.warning("ignoring a malformed cluster message")
        return None


# -- watches and their webhook events (watches.py, webhooks.py) ----------------------------------
# Kept until removed: a watch until its task ends, is cancelled or expires; an event until
# it is delivered or given up. Every script reads the time from Redis, so that the nodes'
# clocks need not agree. A watch is held by the node named in WATCH_HOLDERS while its score
# in WATCH_CLAIMS (the claim's expiry) is in the future; an event likewise.
WATCHES = "relay:watches"  # hash: task ID -> watch JSON
WATCH_CLAIMS = "relay:watches:claims"  # sorted set: task ID by claim expiry (ms)
WATCH_HOLDERS = "relay:watches:holders"  # hash: task ID -> node ID
EVENTS = "relay:webhooks"  # hash: webhook-id -> {"taskId", "body", "createdAt"}
EVENT_ATTEMPTS = "relay:webhooks:attempts"  # hash: webhook-id -> failed attempts
EVENT_HOLDERS = "relay:webhooks:holders"  # hash: webhook-id -> node ID delivering it
EVENTS_DUE = "relay:webhooks:due"  # sorted set: webhook-id by next attempt (ms)
EVENTS_CREATED = "relay:webhooks:created"  # sorted set: webhook-id by creation (ms)
WATCH_KEYS = [WATCHES, WATCH_CLAIMS, WATCH_HOLDERS]
EVENT_KEYS = [EVENTS, EVENT_ATTEMPTS, EVENT_HOLDERS, EVENTS_DUE, EVENTS_CREATED]
NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(t[2] / 1000)
"""

# ARGV: task ID, watch JSON, claim (ms), node. Returns {1, watch} when added, {0, the stored one}.
ADD_WATCH = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then return {0, stored} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return {1, ARGV[2]}
"""
# ARGV: task ID. Returns 1 when there was a watch.
REMOVE_WATCH = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return removed
"""
# ARGV: limit, claim (ms), node. Returns the watches claimed.
CLAIM_WATCHES = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for _, id in ipairs(ids) do
  local watch = redis.call('HGET', KEYS[1], id)
  if watch then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
    redis.call('HSET', KEYS[3], id, ARGV[3])
    table.insert(claimed, watch)
  else
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
return claimed
"""
# ARGV: claim (ms), node, task IDs... Returns the task IDs still held by the node.
RENEW_WATCHES = """
local kept = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[2] and redis.call('HEXISTS', KEYS[1], id) == 1 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
    table.insert(kept, id)
  end
end
return kept
"""
# ARGV: node, task IDs...
RELEASE_WATCHES = """
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[i])
  end
end
return 1
"""
# KEYS: WATCH_KEYS then EVENT_KEYS. ARGV: task ID, watch ID, node, end ('1' or '0'),
# webhook-id ('' for none), event record. Fenced: 0 unless the node holds that watch.
QUEUE_EVENT = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[3] then return 0 end
local watch = redis.call('HGET', KEYS[1], ARGV[1])
if not watch or cjson.decode(watch)['id'] ~= ARGV[2] then return 0 end
if ARGV[5] ~= '' and redis.call('HSETNX', KEYS[4], ARGV[5], ARGV[6]) == 1 then
  redis.call('ZADD', KEYS[7], now, ARGV[5])
  redis.call('ZADD', KEYS[8], now, ARGV[5])
end
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return 1
"""
# KEYS: EVENT_KEYS. ARGV: limit, hold (ms), node. Returns id, record, attempts, id, ...
CLAIM_EVENTS = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for _, id in ipairs(ids) do
  local record = redis.call('HGET', KEYS[1], id)
  if record then
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[2]), id)
    redis.call('HSET', KEYS[3], id, ARGV[3])
    table.insert(claimed, id)
    table.insert(claimed, record)
    table.insert(claimed, redis.call('HGET', KEYS[2], id) or '0')
  else
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
  end
end
return claimed
"""
# KEYS: EVENT_KEYS. ARGV: id, node, attempts, delay (ms). Only while the node holds it.
RETRY_EVENT = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], 'XX', now + tonumber(ARGV[4]), ARGV[1])
return 1
"""
# KEYS: EVENT_KEYS. ARGV: id.
FINISH_EVENT = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
"""
# KEYS: EVENT_KEYS. ARGV: node, ids...
RELEASE_EVENTS = """
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('ZADD', KEYS[4], 'XX', now, ARGV[i])
  end
end
return 1
"""
# KEYS: EVENT_KEYS. Returns {pending, age of the oldest in ms}.
PENDING_EVENTS = """
local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
local age = 0
if oldest[2] then age = math.max(0, now - tonumber(oldest[2])) end
return {redis.call('ZCARD', KEYS[5]), age}
"""
RENEW_BATCH = 500


class RedisWatchStore:
    """Watches and their undelivered events in Redis (`watches.WatchStore`), shared by a cluster.

    Its own connection: the cluster's leases and pub/sub (`RedisBackend`) never wait
    behind it. Redis errors propagate; `Watches` and `Webhooks` retry.
    """

    def __init__(self, url: str, claim_ttl: float) -> None:
        self.node_id = secrets.token_hex(8)
        self.claim_ms = max(1, int(claim_ttl * 1000))
        self._redis = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        scripts = {
            "add_watch": ADD_WATCH,
            "remove_watch": REMOVE_WATCH,
            "claim_watches": CLAIM_WATCHES,
            "renew_watches": RENEW_WATCHES,
            "release_watches": RELEASE_WATCHES,
            "queue_event": QUEUE_EVENT,
            "claim_events": CLAIM_EVENTS,
            "retry_event": RETRY_EVENT,
            "finish_event": FINISH_EVENT,
            "release_events": RELEASE_EVENTS,
            "pending_events": PENDING_EVENTS,
        }
        self._scripts = {
            name: self._redis.register_script(NOW_MS + script) for name, script in scripts.items()
        }

    async def _run(self, name: str, keys: list[str], *args: Any) -> Any:
        return await self._scripts[name](keys=keys, args=list(args))

    async def close(self) -> None:
        await self._redis.aclose()

    # -- watches -----------------------------------------------------------------------

    async def add_watch(self, watch: Watch) -> tuple[Watch, bool]:
        added, stored = await self._run(
            "add_watch", WATCH_KEYS, watch.task_id, watch.encode(), self.claim_ms, self.node_id
        )
        return Watch.decode(stored), bool(added)

    async def remove_watch(self, task_id: str) -> bool:
        return bool(await self._run("remove_watch", WATCH_KEYS, task_id))

    async def list_watches(self) -> list[Watch]:
        stored = await self._redis.hvals(WATCHES)
        return sorted((Watch.decode(raw) for raw in stored), key=lambda w: w.created_at)

    async def claim_watches(self, limit: int) -> list[Watch]:
        claimed = await self._run("claim_watches", WATCH_KEYS, limit, self.claim_ms, self.node_id)
        return [Watch.decode(raw) for raw in claimed]

    async def renew_watches(self, task_ids: Collection[str]) -> set[str]:
        ids, kept = list(task_ids), set[str]()
        for start in range(0, len(ids), RENEW_BATCH):
            batch = ids[start : start + RENEW_BATCH]
            renewed = await self._run(
                "renew_watches", WATCH_KEYS, self.claim_ms, self.node_id, *batch
            )
            kept.update(raw.decode() for raw in renewed)
        return kept

    async def release_watches(self, task_ids: Collection[str]) -> None:
        ids = list(task_ids)
        for start in range(0, len(ids), RENEW_BATCH):
            batch = ids[start : start + RENEW_BATCH]
            await self._run("release_watches", WATCH_KEYS, self.node_id, *batch)

    async def add_event(self, watch: Watch, event: Outgoing) -> bool:
        return await self._queue(watch, event, end=False)

    async def end_watch(self, watch: Watch, event: Outgoing | None) -> bool:
        return await self._queue(watch, event, end=True)

    async def _queue(self, watch: Watch, event: Outgoing | None, *, end: bool) -> bool:
        record = "" if event is None else dumps(event_record(event))
        queued = await self._run(
            "queue_event",
            WATCH_KEYS + EVENT_KEYS,
            watch.task_id,
            watch.id,
            self.node_id,
            "1" if end else "0",
            "" if event is None else event.id,
            record,
        )
        return bool(queued)

    # -- the outbox --------------------------------------------------------------------

    async def claim_events(self, limit: int, hold: float) -> list[Outgoing]:
        flat = await self._run(
            "claim_events", EVENT_KEYS, limit, max(1, int(hold * 1000)), self.node_id
        )
        claimed = []
        for start in range(0, len(flat), 3):
            event_id, raw, attempts = flat[start : start + 3]
            record = json.loads(raw)
            claimed.append(
                Outgoing(
                    event_id.decode(),
                    record["taskId"],
                    record["body"],
                    float(record["createdAt"]),
                    int(attempts),
                )
            )
        return claimed

    async def retry_event(self, event_id: str, attempts: int, delay: float) -> None:
        await self._run(
            "retry_event", EVENT_KEYS, event_id, self.node_id, attempts, max(0, int(delay * 1000))
        )

    async def finish_event(self, event_id: str) -> None:
        await self._run("finish_event", EVENT_KEYS, event_id)

    async def release_events(self, event_ids: list[str]) -> None:
        await self._run("release_events", EVENT_KEYS, self.node_id, *event_ids)

    async def pending_events(self) -> tuple[int, float]:
        count, age_ms = await self._run("pending_events", EVENT_KEYS)
        return int(count), int(age_ms) / 1000


def event_record(event: Outgoing) -> dict[str, Any]:
    return {"taskId": event.task_id, "body": event.body, "createdAt": event.created_at}
