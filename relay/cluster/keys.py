"""What a cluster keeps in Redis: key names and the scripts that change them.

Every key of a task carries the task ID as its hash tag (`relay:{ID}:...`), and every
script touches the keys of one task only, so that a sharded Redis Cluster could hold
them later. The node registry and the channel are the only keys shared by all tasks.

- `relay:nodes`, sorted set: node ID by the expiry of its last heartbeat (ms). A lease
  is valid while its holder's heartbeat is: one write per node per period keeps every
  lease of the node, instead of one renewal per lease.
- `relay:{ID}:lease`, string: the node polling the task. Taken while free, or from a
  holder that stopped beating (compare-and-set on that holder's ID); it changes hands
  only by these scripts, and every store is fenced by it.
- `relay:{ID}:state`, hash: `seq` (the last state's number), `error` (a final error),
  and a ring of the last `HISTORY_SIZE` states, field `r<seq mod HISTORY_SIZE>`, each
  `[seq, state]`: a change is written once, as one field, with its number.
- `relay:{ID}:interest`, sorted set: node ID by the expiry of its interest (ms).
- `relay:changes`, channel: what the polling nodes stored, in batches.
"""

from __future__ import annotations

CHANNEL = "relay:changes"
NODES = "relay:nodes"


def lease_key(task_id: str) -> str:
    return f"relay:{{{task_id}}}:lease"


def state_key(task_id: str) -> str:
    return f"relay:{{{task_id}}}:state"


def interest_key(task_id: str) -> str:
    return f"relay:{{{task_id}}}:interest"


def ring_field(seq: int, size: int) -> str:
    return f"r{seq % size}"


# KEYS: lease, state. ARGV: node, seq ('' for an error), ring field or 'error', entry,
# expiry in seconds ('0': leave it). 1 stored, 0 the lease is not ours (fenced).
STORE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'seq', ARGV[2], ARGV[3], ARGV[4])
elseif ARGV[4] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
if ARGV[5] ~= '0' then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
return 1
"""

# KEYS: lease, state. ARGV: node, take ('1' or '0'), the holder known to be dead (or ''),
# lease expiry (ms), state expiry (s). Returns {1, node} taken (or already ours),
# {0, holder} held by a live node, {2, holder or ''} free but left to another node.
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return {1, holder} end
if holder and holder ~= ARGV[3] then return {0, holder} end
if ARGV[2] ~= '1' then return {2, holder or ''} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {1, ARGV[1]}
"""

# KEYS: lease. ARGV: node.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: state, lease. ARGV: the seq the reader holds. {seq, error, holder, fields}: the
# fields (the ring) only when the stored seq is newer than the reader's, so that a
# follower's look costs a few bytes; the holder tells it whether anyone polls the task.
LOAD = """
local seq, err = unpack(redis.call('HMGET', KEYS[1], 'seq', 'error'))
local holder = redis.call('GET', KEYS[2])
if not seq or tonumber(seq) <= tonumber(ARGV[1]) then return {seq, err, holder, {}} end
return {seq, err, holder, redis.call('HGETALL', KEYS[1])}
"""
