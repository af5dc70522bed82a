"""Cluster mode: several relays share the work through Redis, one poll loop per task in all.

The `Backend` (see `backend.py`) of a relay started with `RELAY_REDIS_URL`:

- Ownership: the node holding a task's lease (`SET NX PX`, renewed and released by
  compare-and-set scripts) polls it; the others follow.
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
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from .backend import Change, Receive
from .hub import NOT_FOUND_TTL
from .metrics import Metrics
from .poll_loop import about
from .protocol import dumps

logger = logging.getLogger("relay.cluster")

CHANNEL = "relay:changes"
STATE_TTL_SECONDS = 3600
HISTORY_LENGTH = 64

# Write a change and publish it, only while we hold the lease (a fence against a
# node whose lease expired during a slow upstream call).
STORE_STATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
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
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'error', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[4], ARGV[6])
return 1
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
        metrics.leases_held.set_function(lambda: len(self.leases))
        self._redis = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=5
        )
        self._store_state = self._redis.register_script(STORE_STATE)
        self._store_error = self._redis.register_script(STORE_ERROR)
        self._renew = self._redis.register_script(RENEW)
        self._release = self._redis.register_script(RELEASE)
        self._listener: asyncio.Task[None] | None = None
        # Tasks this node wants (to resync after a reconnect), and those it followed
        # while another node polled them (to tell a takeover from a first lease).
        self._wanted: set[str] = set()
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

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for task_id in list(self.leases):
            await self.release(task_id)
        await self._redis.aclose()

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
                        change = parse_message(message.get("data"))
                        if change is not None:
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

    async def load(self, task_id: str) -> Change | None:
        """The stored state with its history, or the final error; None also when Redis is away."""
        try:
            stored, history = await asyncio.gather(
                self._redis.hgetall(state_key(task_id)),
                self._redis.lrange(history_key(task_id), 0, HISTORY_LENGTH - 1),
            )
        except (RedisError, OSError) as exc:
            self.failed("read", exc)
            return None
        seq: int | None = None
        state: dict[str, Any] | None = None
        if stored.get(b"state") is not None:
            seq, state = int(stored[b"seq"]), json.loads(stored[b"state"])
        error = json.loads(stored[b"error"]) if stored.get(b"error") is not None else None
        if state is None and error is None:
            return None
        entries = [json.loads(entry) for entry in reversed(history)]
        return Change(
            task_id,
            seq,
            state,
            error=error,
            final=error is not None,
            history=[(int(s), old) for s, old in entries],
        )

    async def store(self, change: Change) -> bool:
        """Store and publish a change while we hold the lease; False when we lost it."""
        task_id = change.task_id
        if change.error is None:
            message = {"t": task_id, "s": change.seq, "state": change.state, "p": change.patch}
            args = [
                self.node_id,
                change.seq,
                dumps(change.state),
                dumps([change.seq, change.state]),
                CHANNEL,
                STATE_TTL_SECONDS,
                HISTORY_LENGTH,
                dumps(message),
            ]
            keys = [lease_key(task_id), state_key(task_id), history_key(task_id)]
            return await self._fenced(self._store_state, keys, args, task_id)
        message = {"t": task_id, "e": change.error, "final": change.final}
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
        ]
        keys = [lease_key(task_id), state_key(task_id)]
        return await self._fenced(self._store_error, keys, args, task_id)

    async def _fenced(self, script: Any, keys: list[str], args: list[Any], task_id: str) -> bool:
        try:
            done = bool(await script(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            self.failed("publish", exc)
            return False
        if not done:
            self.leases.discard(task_id)
        return done

    # -- leases -------------------------------------------------------------------------

    async def acquire(self, task_id: str) -> bool:
        try:
            won = await self._redis.set(
                lease_key(task_id), self.node_id, nx=True, px=int(self.lease_ttl * 1000)
            )
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)
            return False
        if not won:
            self._followed.add(task_id)
            return False
        self.leases.add(task_id)
        if task_id in self._followed:
            self._followed.discard(task_id)
            self.metrics.lease_takeovers.inc()
            logger.info("took over polling task %s", task_id, extra=about(task_id))
        return True

    async def renew(self, task_id: str) -> bool:
        try:
            kept = bool(
                await self._renew(
                    keys=[lease_key(task_id)], args=[self.node_id, int(self.lease_ttl * 1000)]
                )
            )
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)
            kept = False
        if not kept:
            self.leases.discard(task_id)
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
            if not await self.renew(task_id):
                return  # lost: the fenced store that follows will notice

    async def release(self, task_id: str) -> None:
        self.leases.discard(task_id)
        try:
            await self._release(keys=[lease_key(task_id)], args=[self.node_id])
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)

    # -- interest ----------------------------------------------------------------------

    async def interest(self, task_id: str, wanted: bool) -> int:
        """Record (or drop) this node's interest; return how many nodes are interested."""
        if wanted:
            self._wanted.add(task_id)
        else:
            self._wanted.discard(task_id)
            self._followed.discard(task_id)
        now_ms = int(time.time() * 1000)
        key = interest_key(task_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if wanted:
                    pipe.zadd(key, {self.node_id: now_ms + int(self.lease_ttl * 3000)})
                else:
                    pipe.zrem(key, self.node_id)
                pipe.zremrangebyscore(key, "-inf", now_ms)
                pipe.zcard(key)
                pipe.expire(key, max(1, int(self.lease_ttl * 3)))
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("interest", exc)
            return 1 if wanted else 0
        return int(results[2])


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
