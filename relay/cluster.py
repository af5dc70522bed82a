"""Cluster mode: several relays share the work through Redis, one poll loop per task in all.

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

from .hub import NOT_FOUND_TTL, Hub, TaskHub
from .metrics import Metrics
from .patch import merge_patch
from .poll_loop import PollPolicy, poll_once
from .protocol import ErrorCode, dumps
from .upstream import UpstreamClient

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


class Cluster:
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

    def start(self, hub: Hub) -> None:
        self._listener = asyncio.create_task(self._listen(hub), name="redis listener")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for task_id in list(self.leases):
            await self.release(task_id)
        await self._redis.aclose()

    async def _listen(self, hub: Hub) -> None:
        """Deliver published changes to local subscribers; reconnect and resync on failure."""
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self.healthy = True
                delay = 0.1
                # Messages published while we were away are lost: read the stored truth.
                for task in list(hub.tasks.values()):
                    await self.sync(task)
                while True:
                    message = await pubsub.get_message(timeout=self.check_interval)
                    if message is not None:
                        self.deliver(hub, message.get("data"))
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

    def deliver(self, hub: Hub, raw: Any) -> None:
        try:
            message = json.loads(raw)
            task = hub.get(message["t"])
        except (ValueError, TypeError, KeyError):
            logger.warning("ignoring a malformed cluster message")
            return
        if task is None:
            return
        if "state" in message:
            task.publish(message["state"], seq=int(message["s"]), patch=message.get("p"))
        elif message.get("final"):
            task.fail(ErrorCode(message["e"]["code"]), message["e"]["message"])
        else:
            task.report_unavailable(message["e"]["message"])

    # -- stored state -----------------------------------------------------------------

    async def sync(self, task: TaskHub) -> None:
        """Bring a local task up to the stored state (and its history, for resumes)."""
        try:
            stored, history = await asyncio.gather(
                self._redis.hgetall(state_key(task.task_id)),
                self._redis.lrange(history_key(task.task_id), 0, HISTORY_LENGTH - 1),
            )
        except (RedisError, OSError) as exc:
            self.failed("read", exc)
            return
        if stored.get(b"state") is not None:
            seq = int(stored[b"seq"])
            if seq > task.seq:
                task.publish(json.loads(stored[b"state"]), seq=seq)
                entries = [json.loads(entry) for entry in reversed(history)]
                task.remember([(int(s), state) for s, state in entries])
        if stored.get(b"error") is not None:
            error = json.loads(stored[b"error"])
            task.fail(ErrorCode(error["code"]), error["message"])

    async def stored_state(self, task_id: str) -> tuple[int, dict[str, Any]] | None:
        """The stored state of a task any node polls, or None (also when Redis is away)."""
        try:
            stored = await self._redis.hmget(state_key(task_id), ["seq", "state"])
        except (RedisError, OSError) as exc:
            self.failed("read", exc)
            return None
        seq, state = stored
        if seq is None or state is None:
            return None
        return int(seq), json.loads(state)

    async def store(
        self, task: TaskHub, state: dict[str, Any], seq: int, patch: dict[str, Any] | None
    ) -> bool:
        """Store and publish a change while we hold the lease; False when we lost it.

        `patch` leads from the state the task holds to `state` (None for a first state).
        """
        message = {"t": task.task_id, "s": seq, "state": state, "p": patch}
        args = [
            self.node_id,
            seq,
            dumps(state),
            dumps([seq, state]),
            CHANNEL,
            STATE_TTL_SECONDS,
            HISTORY_LENGTH,
            dumps(message),
        ]
        keys = [lease_key(task.task_id), state_key(task.task_id), history_key(task.task_id)]
        return await self._fenced(self._store_state, keys, args, task.task_id)

    async def store_error(self, task: TaskHub, code: ErrorCode, text: str, final: bool) -> bool:
        error = {"code": code.value, "message": text}
        message = {"t": task.task_id, "e": error, "final": final}
        args = [
            self.node_id,
            "1" if final else "0",
            dumps(error),
            CHANNEL,
            # An ID unknown upstream is remembered as briefly as a single relay does: the
            # task may yet be created, and it must not stay refused cluster-wide for long.
            STATE_TTL_SECONDS if task.state is not None else int(NOT_FOUND_TTL),
            dumps(message),
        ]
        keys = [lease_key(task.task_id), state_key(task.task_id)]
        return await self._fenced(self._store_error, keys, args, task.task_id)

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
        if won:
            self.leases.add(task_id)
        return bool(won)

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
    async def lease_kept(self, task_id: str) -> AsyncIterator[None]:
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

    async def interest(self, task_id: str, mine: bool) -> int:
        """Record (or drop) this node's interest; return how many nodes are interested."""
        now_ms = int(time.time() * 1000)
        key = interest_key(task_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if mine:
                    pipe.zadd(key, {self.node_id: now_ms + int(self.lease_ttl * 3000)})
                else:
                    pipe.zrem(key, self.node_id)
                pipe.zremrangebyscore(key, "-inf", now_ms)
                pipe.zcard(key)
                pipe.expire(key, max(1, int(self.lease_ttl * 3)))
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("interest", exc)
            return 1 if mine else 0
        return int(results[2])


async def poll_task_clustered(
    task: TaskHub, cluster: Cluster, upstream: UpstreamClient, policy: PollPolicy, linger: float
) -> None:
    """Follow a task through the cluster, polling it only while this node holds its lease."""
    owner = False
    failures = 0
    next_poll = 0.0
    idle_since: float | None = None
    await cluster.sync(task)
    try:
        while not task.ended and not task.shutting_down:
            local = bool(task.cursors)
            if task.stop_requested and not local and not owner:
                return  # the hub's linger ran out and someone else polls, if anyone
            # From here on this loop paces itself: the hub's stop means "no local subscribers".
            task.stop_requested = False
            interested = await cluster.interest(task.task_id, local)
            if not owner:
                had_state = task.state is not None
                owner = await cluster.acquire(task.task_id)
                await cluster.sync(task)
                if not owner:
                    await task.sleep(cluster.check_interval)
                    continue
                if had_state:
                    cluster.metrics.lease_takeovers.inc()
                    logger.info("took over polling task %s", task.task_id)
                next_poll = 0.0
            elif not await cluster.renew(task.task_id):
                owner = False
                continue
            if interested == 0:
                idle_since = idle_since if idle_since is not None else time.monotonic()
                if time.monotonic() - idle_since >= linger:
                    return
            else:
                idle_since = None
            if time.monotonic() >= next_poll:
                async with cluster.lease_kept(task.task_id):
                    outcome = await poll_and_publish(task, cluster, upstream, policy, failures)
                if outcome is None:
                    owner, failures = False, 0
                    continue
                failures, delay = outcome
                next_poll = time.monotonic() + delay
            await task.sleep(max(0.0, min(next_poll - time.monotonic(), cluster.check_interval)))
    finally:
        if owner:
            await cluster.release(task.task_id)
        await cluster.interest(task.task_id, False)


async def poll_and_publish(
    task: TaskHub, cluster: Cluster, upstream: UpstreamClient, policy: PollPolicy, failures: int
) -> tuple[int, float] | None:
    """One poll by the owner: (failures in a row, delay to the next), None if the lease is lost."""
    polled = await poll_once(task.task_id, upstream, policy, failures)
    if polled.final is not None:
        if not await cluster.store_error(task, *polled.final, final=True):
            return None
        task.fail(*polled.final)
        return 0, polled.delay
    if polled.fault is not None:
        if not task.unavailable and not await cluster.store_error(
            task, ErrorCode.UPSTREAM_UNAVAILABLE, polled.fault, final=False
        ):
            return None
        task.report_unavailable(polled.fault)
        return failures + 1, polled.delay
    assert polled.state is not None
    # One diff serves three purposes: is it a change, what to publish, what to apply.
    patch = merge_patch(task.state, polled.state) if task.state is not None else None
    if patch is None or patch:
        seq = task.next_seq()
        if not await cluster.store(task, polled.state, seq, patch):
            return None
        task.publish(polled.state, seq=seq, patch=patch)
    return 0, polled.delay
