"""Watches and their undelivered webhook events in Redis, shared by a cluster's nodes."""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection
from typing import Any

import redis.asyncio as redis

from ..protocol import dumps
from .store import Watch
from .webhooks import Outgoing

# -- keys and scripts ----------------------------------
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
