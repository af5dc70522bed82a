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
from collections.abc import AsyncIterator
from math import inf
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from ..backend import Change, Receive
from ..hub import NOT_FOUND_TTL
from ..logs import about
from ..metrics import Metrics
from ..protocol import dumps
from .placement import Placement

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
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
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
