"""What a cluster keeps in Redis: key names and the scripts that change them.

Every key of a task carries the task ID as its hash tag (`relay:{ID}:...`), and every
script but the heartbeat touches one task's key only, so that a sharded Redis Cluster
could hold them later. The node registry and the channel are shared by all tasks.

- `relay:nodes`, sorted set: node ID by the expiry of its last heartbeat, in Redis's own
  time (ms), so that the nodes' clocks need not agree. A lease is valid while its
  holder's heartbeat is: one write per node per period keeps every lease of the node.
- `relay:{ID}:state`, hash, all there is of a task: `owner` (the node polling it: its
  lease), `seq` (the last state's number), `error` (a final error), and a ring of the
  last `HISTORY_SIZE` states, field `r<seq mod HISTORY_SIZE>`, each `[seq, state]`. The
  lease is taken while free, or from an owner that stopped beating (compare-and-set on
  that owner's ID), and every store is fenced by it in the same read that checks the
  number grows: a change is one read and one write.
- `relay:{ID}:interest`, sorted set: node ID by the expiry of its interest (ms).
- `relay:changes`, channel: what the polling nodes stored, in batches.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError

from ..protocol import HISTORY_SIZE

CHANNEL = "relay:changes"
NODES = "relay:nodes"


def state_key(task_id: str) -> str:
    return f"relay:{{{task_id}}}:state"


def interest_key(task_id: str) -> str:
    return f"relay:{{{task_id}}}:interest"


def ring_field(seq: int, size: int) -> str:
    return f"r{seq % size}"


# KEYS: nodes. ARGV: node, heartbeat lifetime (ms). Returns {Redis time (ms), this node's
# previous expiry or false, {node, expiry, ...} of the live nodes}.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {now, before, redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES')}
"""

# KEYS: state. ARGV: node, seq ('' for an error), ring field or 'error', entry ('' for a
# passing error: fenced, not stored), expiry in seconds ('0': leave it).
# 1 stored; 0 the lease is not ours (fenced); -1 the seq is not newer than the stored one.
STORE = """
local owner, seq = unpack(redis.call('HMGET', KEYS[1], 'owner', 'seq'))
if owner ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  if seq and tonumber(ARGV[2]) <= tonumber(seq) then return -1 end
  redis.call('HSET', KEYS[1], 'seq', ARGV[2], ARGV[3], ARGV[4])
elseif ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
end
if ARGV[5] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return 1
"""

# KEYS: state. ARGV: node, take ('1' or '0'), the owner known to be dead (or ''), expiry
# (s). Returns {1, node} taken (or already ours), {0, owner} held by a live node,
# {2, owner or ''} free but left to another node.
ACQUIRE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner == ARGV[1] then return {1, owner} end
if owner and owner ~= ARGV[3] then return {0, owner} end
if ARGV[2] ~= '1' then return {2, owner or ''} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, ARGV[1]}
"""

# KEYS: state. ARGV: node.
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('HDEL', KEYS[1], 'owner')
end
return 0
"""

# KEYS: state. ARGV: the seq the reader holds. {seq, error, owner, fields}: the fields (the
# ring) only when the stored seq is newer than the reader's, so that a follower's look
# costs a few bytes; the owner tells it whether anyone polls the task.
LOAD = """
local seq, err, owner = unpack(redis.call('HMGET', KEYS[1], 'seq', 'error', 'owner'))
if not seq or tonumber(seq) <= tonumber(ARGV[1]) then return {seq, err, owner, {}} end
return {seq, err, owner, redis.call('HGETALL', KEYS[1])}
"""


class Scripts:
    """Each script's SHA once Redis has loaded it, so that a call sends the SHA alone.

    `EVALSHA` itself, not redis-py's scripts, which on a pipeline ask Redis whether the
    script exists before every batch. Redis forgets the scripts when it restarts: `forget`
    (on NOSCRIPT) has the next call load them again."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._shas: dict[str, str] = {}

    async def sha(self, script: str) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = str(await self._redis.script_load(script))
        return sha

    def forget(self) -> None:
        self._shas.clear()

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script now, loading it first (and again if Redis forgot it)."""
        try:
            return await self._redis.evalsha(await self.sha(script), len(keys), *keys, *args)
        except NoScriptError:
            self.forget()
            return await self._redis.evalsha(await self.sha(script), len(keys), *keys, *args)

    async def queue(self, pipe: Any, script: str, keys: list[str], args: list[Any]) -> None:
        """Queue a script on a pipeline; a NOSCRIPT answer comes with its results."""
        pipe.evalsha(await self.sha(script), len(keys), *keys, *args)


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
