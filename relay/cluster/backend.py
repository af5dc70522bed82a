"""Cluster mode: several relays share the work through Redis, one poll loop per task in all.

The `Backend` (see `backend.py`) of a relay started with `RELAY_REDIS_URL`. Redis costs
per node and per change, not per task and per turn:

- One ticker per node (`tick`), every `check_interval`, writes the node's heartbeat and
  reads the live nodes in Redis's own time, in one script. A lease (`keys.py`) is valid
  while its holder beats, so that heartbeat keeps every lease the node holds. A node whose
  heartbeat lapsed (Redis paused, the ticker late) checks each of its leases again before
  it polls. The same round trip refreshes the interest entries that are due.
- Ownership: a node takes a task's lease when it is free, or from a holder that stopped
  beating; the polling node's changes go out through `ChangeWriter` (fenced by the lease,
  batched, published small). A change from another node for a task this node holds means
  the lease is that node's now.
- Following: a follower learns changes from the channel, and looks at Redis for a task
  only to decide something: its holder stopped beating or released the lease (the
  follower's loop is woken), or a message is missing (a patch that does not follow what it
  holds, a reconnect, or the periodic look that nets a lost message).
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
import random
import secrets
import time
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from math import inf
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from ..backend import Change, Receive, Wake
from ..hub import NOT_FOUND_TTL
from ..logs import about, shown_url
from ..metrics import Metrics
from .interest import Interest
from .keys import (
    ACQUIRE,
    CHANNEL,
    HEARTBEAT,
    LOAD,
    NODES,
    RELEASE,
    Scripts,
    ring_entries,
    state_key,
)
from .placement import Placement
from .writer import ChangeWriter, Expiry, Stored, batch_message, parse_batch

logger = logging.getLogger("relay.cluster")

# Redis connections per node, opened as calls need them and kept. redis-py's default pool
# refuses the 101st call in flight, which a node whose hundreds of loops start at once
# makes.
REDIS_CONNECTIONS = 2048
# Calls of the loops in flight at once, well within the connections: thousands of loops that
# end together (their subscribers gone at once) wait their turn instead of failing with
# "Too many connections".
REDIS_CALLS = 512
REDIS_TIMEOUT = 2.0
STATE_TTL_SECONDS = 3600
# A held task's key is given its hour again once it is this old (the key's expiry only
# clears what a vanished cluster left behind).
REFRESH_HELD_AFTER = STATE_TTL_SECONDS / 2
# How often an unreachable Redis is said again in the log.
UNREACHABLE_LOG_EVERY = 30.0
# A follower whose lease holder is alive looks at Redis only every this many checks.
FOLLOWER_LOOK_CHECKS = 10
SWEEP_NODES_EVERY = 100  # ticks


def raise_if_cancelling() -> None:
    """redis-py (8.2) can swallow a cancellation that comes during a command, returning its
    answer while the task stays cancelled: a loop around it would then never end, nor
    would the `close` that waits for it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisBackend:
    """This node's view of the cluster: its Redis connection, leases and subscription."""

    def __init__(self, url: str, lease_ttl: float, metrics: Metrics) -> None:
        self.node_id = secrets.token_hex(8)
        self.url = shown_url(url)
        self.lease_ttl = lease_ttl
        # The leases this node holds; those in `_unverified` may have been taken over
        # while its heartbeat lapsed, and are checked before the next poll.
        self.leases: set[str] = set()
        self._unverified: set[str] = set()
        self.metrics = metrics
        self.placement = Placement(self.node_id, lease_ttl, clock=self.redis_time)
        metrics.leases_held.set_function(self.held_count)
        pool = redis.ConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=5,
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._scripts = Scripts(self._redis)
        self._calls = asyncio.Semaphore(REDIS_CALLS)
        self._interest = Interest(self._redis, self._calls, self.placement, lease_ttl, self.failed)
        # Leases given up whose release did not reach Redis yet: sent again with each tick.
        self._to_release: set[str] = set()
        expiry = Expiry(ended=STATE_TTL_SECONDS, unknown=int(NOT_FOUND_TTL))
        self._writer = ChangeWriter(self._redis, self._scripts, self.node_id, expiry, self.failed)
        self._receive: Receive = lambda change: True
        self._wake: Wake = lambda task_id: None
        self._tasks: list[asyncio.Task[None]] = []
        # Tasks this node wants (a hub holds them), with the newest seq it has seen of
        # each, published or loaded: a load returns no older state, and no history, again.
        self._known: dict[str, int] = {}
        self._holders: dict[str, str] = {}  # wanted task -> the node seen holding its lease
        self._absent: dict[str, float] = {}  # holder -> when first seen missing from `live`
        self._held_at: dict[str, float] = {}  # task -> when its key's expiry was last set
        self._resyncing: dict[str, asyncio.Task[None]] = {}  # at most one per task
        self._looks: dict[str, asyncio.TimerHandle] = {}  # followers woken for a free lease
        self._timers: dict[str, asyncio.TimerHandle] = {}  # holders woken to hand over
        self._rng = random.Random()
        self._beat_at = -inf  # when a heartbeat last reached Redis (monotonic)
        self._ticks = 0
        self._redis_now = (0.0, -inf)  # (Redis time at the last beat, monotonic then)
        self._listening = False
        self._unreachable_since: float | None = time.monotonic()
        self._unreachable_said = -inf

    # -- time and health ------------------------------------------------------------------

    @property
    def check_interval(self) -> float:
        """How often the ticker beats, and a follower looks at a free lease."""
        return self.lease_ttl / 3

    @property
    def follow_interval(self) -> float:
        """How long a follower waits between looks; it is woken when the lease may be free."""
        return self.check_interval * FOLLOWER_LOOK_CHECKS

    def redis_time(self) -> float:
        """Redis's clock (seconds), as read at the last heartbeat and carried on since."""
        at, when = self._redis_now
        return at + (time.monotonic() - when) if when > -inf else time.time()

    def _beat_fresh(self) -> bool:
        """Whether this node's heartbeat holds for at least another check."""
        return time.monotonic() - self._beat_at < self.lease_ttl - self.check_interval

    def held_count(self) -> int:
        """The leases this node can vouch for (`relay_leases_held`)."""
        return len(self.leases - self._unverified) if self._beat_fresh() else 0

    @property
    def healthy(self) -> bool:
        """Redis answers: the last heartbeat got through lately and the channel is open."""
        return self._listening and time.monotonic() - self._beat_at < self.lease_ttl

    def failed(self, what: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(what).inc()
        if isinstance(exc, NoScriptError):
            self._scripts.forget()  # Redis restarted and forgot them: load them again
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        if now - self._unreachable_said >= UNREACHABLE_LOG_EVERY:
            self._unreachable_said = now
            logger.warning(
                "cannot reach Redis at %s (%s: %s) for %.0fs: this node neither polls nor"
                " follows tasks, its subscribers are told cluster_unavailable; retrying",
                self.url,
                what,
                exc,
                now - self._unreachable_since,
            )

    def _answered(self) -> None:
        if self._unreachable_since is not None and self._unreachable_said > -inf:
            logger.info("Redis at %s answers again", self.url)
        self._unreachable_since = None
        self._unreachable_said = -inf

    async def _run(self, script: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run a script now (one of the loops' bounded calls), or queue it on a pipeline."""
        if client is not None:
            return await self._scripts.queue(client, script, keys, args)
        async with self._calls:
            return await self._scripts.run(script, keys, args)

    # -- lifecycle ------------------------------------------------------------------

    def start(self, receive: Receive, wake: Wake | None = None) -> None:
        self._receive = receive
        if wake is not None:
            self._wake = wake
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="redis listener"),
            asyncio.create_task(self._tick_forever(), name="cluster ticker"),
        ]

    async def close(self) -> None:
        """Stop, leave the registry and release the leases held: bounded, so that a Redis
        that stopped answering cannot hold the relay's shutdown (the leases then end with
        this node's heartbeat)."""
        for timer in [*self._looks.values(), *self._timers.values()]:
            timer.cancel()
        tasks = [*self._tasks, *self._resyncing.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=REDIS_TIMEOUT)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT * 2):
                await self._writer.close()
                # Leave the registry first, so that no node waits for this one.
                with contextlib.suppress(RedisError, OSError):
                    await self._redis.zrem(NODES, self.node_id)
                await self._release_all(list(self.leases))
        except TimeoutError:
            logger.warning("Redis at %s did not answer: leaving the cluster unannounced", self.url)
        await self._redis.aclose(close_connection_pool=True)

    async def _tick_forever(self) -> None:
        while True:
            await self.tick()
            raise_if_cancelling()
            await asyncio.sleep(self.check_interval)

    async def tick(self) -> None:
        """One turn of the node's ticker: heartbeat, live nodes, interest and old keys due."""
        now = time.monotonic()
        interest_due = self._interest.due(now)
        keys_due = [t for t in self.leases if now - self._held_at.get(t, now) >= REFRESH_HELD_AFTER]
        ttl_ms = int(self.lease_ttl * 1000)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                await self._run(HEARTBEAT, [NODES], [self.node_id, ttl_ms], client=pipe)
                for task_id in interest_due:
                    self._interest.write(pipe, task_id)
                for task_id in keys_due:
                    pipe.expire(state_key(task_id), STATE_TTL_SECONDS)
                self._ticks += 1
                if self._ticks % SWEEP_NODES_EVERY == 1:  # nodes long dead leave the registry
                    gone = int(self.redis_time() * 1000) - ttl_ms * 10
                    pipe.zremrangebyscore(NODES, "-inf", gone)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise_if_cancelling()
            self.failed("heartbeat", exc)
            return
        raise_if_cancelling()
        redis_ms, before, live = results[0]
        self._redis_now = (int(redis_ms) / 1000, now)
        if before is None or float(before) < float(redis_ms):
            # This node's heartbeat had run out: another node may have taken its leases.
            self._unverified |= self.leases
        self._beat_at = now
        self._answered()
        self._interest.written(interest_due, now)
        for task_id in keys_due:
            self._held_at[task_id] = now
        pairs = zip(live[::2], live[1::2], strict=True)
        nodes = {node.decode(): float(ms) / 1000 for node, ms in pairs}
        self.placement.saw_nodes(nodes)
        self.placement.forget_stale(self._interest.refresh * 2)
        for node, since in list(self._absent.items()):
            if node in nodes or now - since > self._interest.ttl:
                del self._absent[node]
        for task_id, holder in list(self._holders.items()):
            if holder not in nodes and holder != self.node_id:
                self._wake(task_id)  # its holder stopped beating: the lease is to be taken
        if self._to_release:
            await self._release_again()

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
                for task_id in list(self._interest.wanted):
                    self._resync_soon(task_id)
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling()
                self._listening = False
                if isinstance(exc, RedisError | OSError):
                    self.failed("subscribe", exc)
                else:
                    logger.exception("the cluster listener failed; reconnecting")
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _listen(self, pubsub: Any) -> None:
        own = self._writer.own_prefix
        heard = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=self.check_interval)
            raise_if_cancelling()
            now = time.monotonic()
            if message is not None:
                heard = now
            elif now - heard > 2 * self.lease_ttl:
                # Not even our PINGs' answers came back on this connection: half-open.
                raise ConnectionError("no answer on the pub/sub connection")
            else:
                # Quiet: PING on this very connection (a pool connection's answer would say
                # nothing of it); the PONG comes back as a message.
                await pubsub.ping()
                raise_if_cancelling()
                continue
            data = message.get("data")
            if message.get("type") != "message" or not isinstance(data, bytes):
                continue
            if data.startswith(own):
                continue
            batch = parse_batch(data)
            if batch is None:
                logger.warning("ignoring a malformed cluster message")
                continue
            for change in batch.changes:
                try:
                    self._take(change)
                except Exception:
                    logger.exception("cannot apply a change of task %s", change.task_id)
                    self._resync_soon(change.task_id)
            for task_id in batch.released:
                if self._holders.pop(task_id, None) is not None:
                    self._wake(task_id)  # take the lease now, if this node should

    def _take(self, change: Change) -> None:
        """A change published by another node."""
        task_id = change.task_id
        if task_id in self.leases:
            # Another node stores this task's changes: its lease is that node's now.
            self._gave_up(task_id)
        if task_id not in self._interest.wanted:
            self._receive(change)  # not followed here: nothing to keep in step
            return
        if change.seq is not None:
            known = self._known.get(task_id, -1)
            if change.seq <= known:
                return  # held already
            if change.state is None and change.seq != known + 1:
                self._resync_soon(task_id)  # a patch that does not follow what we hold
                return
            self._known[task_id] = change.seq
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
            raw_seq, raw_error, owner, fields = await self._run(LOAD, [state_key(task_id)], [known])
        except (RedisError, OSError) as exc:
            self.failed("read", exc)
            return None
        if task_id in self._interest.wanted:
            # Who polls it now: a release whose message was lost is noticed here.
            self._saw_holder(task_id, owner.decode() if owner is not None else None)
        error = json.loads(raw_error) if raw_error is not None else None
        seq = int(raw_seq) if raw_seq is not None else None
        ring = ring_entries(fields, seq)
        state = ring[-1][1] if ring and ring[-1][0] == seq else None
        if state is None and error is None:
            return None
        if state is None:
            seq = None
        elif task_id in self._interest.wanted:
            self._known[task_id] = max(self._known.get(task_id, -1), seq or -1)
        return Change(task_id, seq, state, error=error, final=error is not None, history=ring)

    async def store(self, change: Change) -> bool:
        """Store and publish a change while we hold the lease; False when we lost it (or
        this node's state is behind the stored one: the loop then reads it again)."""
        task_id = change.task_id
        stored = await self._writer.write(change)
        if stored != Stored.DONE:
            self._gave_up(task_id)
            if stored == Stored.BEHIND:
                self._known.pop(task_id, None)
            return False
        if change.seq is not None and task_id in self._interest.wanted:
            self._known[task_id] = max(self._known.get(task_id, -1), change.seq)
        return True

    # -- leases -------------------------------------------------------------------------

    def _gave_up(self, task_id: str) -> None:
        timer = self._timers.pop(task_id, None)
        if timer is not None:
            timer.cancel()
        self.leases.discard(task_id)
        self._unverified.discard(task_id)
        self._held_at.pop(task_id, None)
        self.placement.gave_up(task_id)

    def _saw_holder(self, task_id: str, holder: str | None) -> None:
        if holder is None or holder == self.node_id:
            self._holders.pop(task_id, None)
        elif task_id in self._interest.wanted:
            self._holders[task_id] = holder

    def _holder_alive(self, task_id: str) -> bool:
        holder = self._holders.get(task_id)
        return holder is not None and self._alive(holder)

    def _alive(self, node: str) -> bool:
        """Whether a node seen holding a lease may still be alive: False only once a
        heartbeat read after it was seen holding shows its heartbeat had run out."""
        now = time.monotonic()
        if now - self._beat_at > 2 * self.check_interval:
            return True  # this node's view of who is alive is stale: take nothing
        if self.placement.live.get(node, 0.0) > self.redis_time():
            self._absent.pop(node, None)
            return True
        # Not in the registry as last read: dead, unless that read came before this node
        # saw it holding (a node that just joined), which the next tick settles.
        seen = self._absent.setdefault(node, now)
        return self._beat_at <= seen

    async def _try_acquire(self, task_id: str, take: bool, dead: str) -> tuple[int, str]:
        """ACQUIRE's answer: 1, 0 or 2, and the holder it names ('' for none)."""
        args = [self.node_id, "1" if take else "0", dead, STATE_TTL_SECONDS]
        won, holder = await self._run(ACQUIRE, [state_key(task_id)], args)
        return int(won), holder.decode() if isinstance(holder, bytes) else ""

    async def acquire(self, task_id: str) -> bool:
        """Take the lease if it is free (or its holder stopped beating) and this node should
        poll the task (`placement.py`). While a live node holds it, no call at all."""
        if task_id in self.leases and task_id not in self._unverified:
            return True
        if task_id not in self.leases and self._holder_alive(task_id):
            return False  # its loop is woken when the holder stops beating or lets go
        if not self.healthy:
            return False
        await self._interest.read(task_id, fresh=self.check_interval)
        take = task_id in self.leases or self.placement.should_take(task_id)
        dead = self._holders.get(task_id, "")
        try:
            won, holder = await self._try_acquire(task_id, take, dead)
            if won == 0 and holder != dead and not self._alive(holder):
                # Held by a node this one had not seen holding it, and that node is dead.
                dead = holder
                won, holder = await self._try_acquire(task_id, take, dead)
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)
            self._look_again(task_id)
            return False
        if won != 1:
            self._gave_up(task_id)
            self._saw_holder(task_id, holder or None)
            if won == 0:
                self.placement.held_elsewhere(task_id)
            else:
                self._look_again(task_id)  # free, left to another node for a while
            return False
        self._unverified.discard(task_id)
        self._to_release.discard(task_id)
        if task_id not in self.leases:
            self.leases.add(task_id)
            self._held_at[task_id] = time.monotonic()
            self.placement.took(task_id)
            # Its loop sleeps until its next poll: woken when the lease may be handed over,
            # spread over a lease period (leases taken together are not handed over at once).
            settled = self.placement.settle + self._rng.uniform(0, self.lease_ttl)
            self._timers[task_id] = asyncio.get_running_loop().call_later(
                settled, self._wake, task_id
            )
            if dead and dead != self.node_id:
                self.metrics.lease_takeovers.inc()
                logger.info("took over polling task %s", task_id, extra=about(task_id))
        self._holders.pop(task_id, None)
        return True

    def _look_again(self, task_id: str) -> None:
        """Wake the task's loop after a check: its lease is free but not taken yet."""
        if task_id not in self._looks:
            loop = asyncio.get_running_loop()
            self._looks[task_id] = loop.call_later(self.check_interval, self._looked, task_id)

    def _looked(self, task_id: str) -> None:
        self._looks.pop(task_id, None)
        self._wake(task_id)

    async def renew(self, task_id: str) -> bool:
        """Keep the lease between two polls (its holder's heartbeat keeps it); or hand it
        to the node that should poll the task (False: this node stops and follows)."""
        if task_id not in self.leases or not self.healthy:
            return False  # kept in `leases` while unhealthy: checked again by `acquire`
        if not self._beat_fresh():
            # The heartbeat may run out before this poll ends (the node stalled): another
            # node may be taking the lease; make sure first.
            self._unverified.add(task_id)
        if task_id in self._unverified:
            return await self.acquire(task_id)
        if self.placement.hand_over_due(task_id):
            await self._interest.read(task_id, fresh=self._interest.refresh)
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
        if task_id in self.leases:
            await self._release_all([task_id])

    async def _release_all(self, task_ids: Iterable[str]) -> None:
        """Give leases up, in one round trip, and say so: followers take them at once. What
        does not reach Redis is sent again by the ticker: a lease left naming a live node
        would never be taken by another."""
        released = list(task_ids)
        for task_id in released:
            self._gave_up(task_id)
        if not released:
            return
        try:
            async with self._calls, self._redis.pipeline(transaction=False) as pipe:
                for task_id in released:
                    await self._run(RELEASE, [state_key(task_id)], [self.node_id], client=pipe)
                pipe.publish(CHANNEL, batch_message(self.node_id, [], released))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("lease", exc)
            self._to_release.update(released)
            return
        self._to_release.difference_update(released)

    async def _release_again(self) -> None:
        """The ticker's retry of the releases that did not reach Redis."""
        pending, self._to_release = self._to_release, set()
        await self._release_all(pending)

    # -- interest ----------------------------------------------------------------------

    async def interest(self, task_id: str, wanted: bool) -> int:
        """Record (or drop) this node's interest; return how many live nodes want the task."""
        if not wanted:
            self._holders.pop(task_id, None)
            self._known.pop(task_id, None)
            look = self._looks.pop(task_id, None)
            if look is not None:
                look.cancel()
        return await self._interest.say(task_id, wanted)
