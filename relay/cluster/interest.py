"""`Interest`: which nodes watch which task, this node's entries in Redis and what it read of
the others'.

Each node with subscribers to a task keeps an entry in the task's interest set, scored by
when it runs out. It is written when the node's first subscriber comes and its last one
goes, and rewritten by the node's ticker every `refresh` (all due entries in one round
trip), so that a node that died is not waited for. What a node reads of a task's set goes
to the placement (`placement.py`): the lease is for one of the watching nodes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from math import inf
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from .keys import interest_key
from .placement import Placement


class Interest:
    def __init__(
        self,
        client: redis.Redis,
        calls: asyncio.Semaphore,
        placement: Placement,
        lease_ttl: float,
        failed: Callable[[str, BaseException], None],
    ) -> None:
        self._redis = client
        self._calls = calls
        self.placement = placement
        self.node_id = placement.node_id
        self.lease_ttl = lease_ttl
        self._failed = failed
        self.wanted: set[str] = set()  # the tasks this node has subscribers to
        self._written: dict[str, float] = {}  # task -> when this node's entry was written

    @property
    def refresh(self) -> float:
        """How often this node rewrites its entry for a task it watches."""
        return self.lease_ttl * 3

    @property
    def ttl(self) -> float:
        """How long an entry lasts unless rewritten: three refreshes."""
        return self.refresh * 3

    def due(self, now: float) -> list[str]:
        """The tasks whose entry the ticker should rewrite now."""
        return [t for t in self.wanted if now - self._written.get(t, -inf) >= self.refresh]

    def write(self, pipe: Any, task_id: str) -> None:
        """Queue this node's entry for the task on a pipeline."""
        key = interest_key(task_id)
        ttl_ms = int(self.ttl * 1000)
        pipe.zadd(key, {self.node_id: int(self.placement.clock() * 1000) + ttl_ms})
        pipe.pexpire(key, ttl_ms)

    def written(self, task_ids: list[str], now: float) -> None:
        for task_id in task_ids:
            if task_id in self.wanted:
                self._written[task_id] = now

    async def say(self, task_id: str, wanted: bool) -> int:
        """Record (or drop) this node's interest; return how many live nodes want the task.

        Written when it changes; while it holds, the count comes from what was read."""
        if wanted and task_id in self.wanted:
            return max(1, self.count(task_id))
        if wanted:
            self.wanted.add(task_id)
            await self._say(task_id, True)
            return max(1, self.count(task_id))
        if task_id in self.wanted:
            self.wanted.discard(task_id)
            self._written.pop(task_id, None)
            await self._say(task_id, False)
        else:
            # Polled for other nodes' subscribers: look again once a lease period.
            await self.read(task_id, fresh=self.lease_ttl)
        return self.count(task_id)

    def count(self, task_id: str) -> int:
        """The nodes whose interest in the task holds: unexpired, and from a live node, or
        written within the last lease period (a node that joined since the last tick)."""
        now = self.placement.clock()
        recent = now - self.lease_ttl + self.ttl
        live = self.placement.live
        _, nodes = self.placement.watchers.get(task_id, (0.0, {}))
        return sum(
            1
            for node, expiry in nodes.items()
            if expiry > now and (node == self.node_id or live.get(node, 0) > now or expiry > recent)
        )

    async def _say(self, task_id: str, wanted: bool) -> None:
        key = interest_key(task_id)
        try:
            async with self._calls, self._redis.pipeline(transaction=False) as pipe:
                if wanted:
                    self.write(pipe, task_id)
                else:
                    pipe.zrem(key, self.node_id)
                pipe.zrangebyscore(key, int(self.placement.clock() * 1000), "+inf", withscores=True)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("interest", exc)
            return
        if wanted and task_id in self.wanted:
            self._written[task_id] = time.monotonic()
        self._saw(task_id, results[-1])

    async def read(self, task_id: str, fresh: float) -> None:
        """Read which nodes watch the task, unless read within `fresh` seconds."""
        seen = self.placement.watchers.get(task_id)
        if seen is not None and time.monotonic() - seen[0] < fresh:
            return
        try:
            async with self._calls:
                entries = await self._redis.zrangebyscore(
                    interest_key(task_id),
                    int(self.placement.clock() * 1000),
                    "+inf",
                    withscores=True,
                )
        except (RedisError, OSError) as exc:
            self._failed("interest", exc)
            return
        self._saw(task_id, entries)

    def _saw(self, task_id: str, entries: Any) -> None:
        self.placement.saw_watchers(task_id, {node.decode(): ms / 1000 for node, ms in entries})
