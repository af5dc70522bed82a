"""An in-memory cluster: several nodes' `Backend`s sharing what Redis would hold.

It keeps `RedisBackend`'s rules (a lease valid while its holder's heartbeat is, taken from
a holder that stopped beating, a store fenced by the lease, interest entries that expire,
changes published to every other node, a node registry and the placement of leases of
`relay/cluster/placement.py`) without sockets, so the poll loop's cluster logic can be tested
in one event loop, node by node. Times are `time.monotonic`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

from relay.backend import Change, Receive, Wake
from relay.cluster.placement import Placement
from relay.protocol import HISTORY_SIZE


@dataclass
class Stored:
    seq: int | None = None
    state: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    history: deque[tuple[int, dict[str, Any]]] = field(
        default_factory=lambda: deque(maxlen=HISTORY_SIZE)
    )


class MemoryStore:
    """What the nodes share: leases, stored states, interest, and who listens."""

    def __init__(self) -> None:
        self.leases: dict[str, str] = {}  # task -> the node holding it
        self.stored: dict[str, Stored] = {}
        self.interest: dict[str, dict[str, float]] = {}
        self.listeners: dict[str, Receive] = {}
        self.nodes: dict[str, float] = {}  # the registry: node -> heartbeat expiry

    def node(self, node_id: str, lease_ttl: float = 0.3) -> MemoryBackend:
        return MemoryBackend(self, node_id, lease_ttl)

    def holder(self, task_id: str) -> str | None:
        """The node holding the task's lease, while its heartbeat holds."""
        node = self.leases.get(task_id)
        alive = node is not None and self.nodes.get(node, 0.0) > time.monotonic()
        return node if alive else None

    def held(self) -> dict[str, int]:
        """How many live leases each node holds."""
        counts: dict[str, int] = {}
        for task_id in self.leases:
            holder = self.holder(task_id)
            if holder is not None:
                counts[holder] = counts.get(holder, 0) + 1
        return counts

    def publish(self, sender: str, change: Change) -> None:
        loop = asyncio.get_running_loop()
        for node_id, receive in list(self.listeners.items()):
            if node_id != sender:
                loop.call_soon(receive, change)  # delivered later, as pub/sub would


class MemoryBackend:
    """One node's view of a `MemoryStore`; `crash()` makes it stop talking, leases held."""

    healthy = True

    def __init__(self, store: MemoryStore, node_id: str, lease_ttl: float) -> None:
        self.shared = store
        self.node_id = node_id
        self.lease_ttl = lease_ttl
        self.crashed = False
        self.placement = Placement(node_id, lease_ttl, clock=time.monotonic)
        self._ticker: asyncio.Task[None] | None = None
        self.beat()

    @property
    def check_interval(self) -> float:
        return self.lease_ttl / 3

    @property
    def follow_interval(self) -> float:
        return self.check_interval  # it wakes no loop: followers look every check

    def crash(self) -> None:
        """Go silent as a killed node would: no release, no messages, no heartbeat (its
        registry entry expires, and its leases with it)."""
        self.crashed = True
        self.shared.listeners.pop(self.node_id, None)
        if self._ticker is not None:
            self._ticker.cancel()

    def beat(self) -> None:
        """The heartbeat, here at every call: register, and read who is alive."""
        now = time.monotonic()
        if not self.crashed:
            self.shared.nodes[self.node_id] = now + self.lease_ttl
        self.placement.saw_nodes({n: e for n, e in self.shared.nodes.items() if e > now})

    def start(self, receive: Receive, wake: Wake | None = None) -> None:
        self.shared.listeners[self.node_id] = receive
        self._ticker = asyncio.create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(self.check_interval)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        self.shared.listeners.pop(self.node_id, None)
        self.shared.nodes.pop(self.node_id, None)
        for task_id in [t for t, node in self.shared.leases.items() if node == self.node_id]:
            await self.release(task_id)

    async def interest(self, task_id: str, wanted: bool) -> int:
        now = time.monotonic()
        nodes = self.shared.interest.setdefault(task_id, {})
        if not self.crashed:
            if wanted:
                nodes[self.node_id] = now + self.lease_ttl * 3
            else:
                nodes.pop(self.node_id, None)
        for node_id, expiry in list(nodes.items()):
            if expiry <= now:
                del nodes[node_id]
        self.placement.saw_watchers(task_id, nodes)
        return len(nodes)

    async def acquire(self, task_id: str) -> bool:
        self.beat()
        take = self.placement.should_take(task_id)
        holder = self.shared.holder(task_id)
        if self.crashed or (holder is not None and holder != self.node_id):
            self.placement.held_elsewhere(task_id)
            return False
        if holder is None and not take:
            return False  # left to the node that should poll it
        self.shared.leases[task_id] = self.node_id
        self.placement.took(task_id)
        return True

    async def renew(self, task_id: str) -> bool:
        self.beat()
        if self.placement.hand_over_to(task_id) is not None:
            await self.release(task_id)
            return False
        if self.crashed or self.shared.holder(task_id) != self.node_id:
            self.placement.gave_up(task_id)
            return False
        return True

    def keep_lease(self, task_id: str) -> AbstractAsyncContextManager[None]:
        return nullcontext()  # the heartbeat keeps every lease the node holds

    async def release(self, task_id: str) -> None:
        self.placement.gave_up(task_id)
        if not self.crashed and self.shared.holder(task_id) == self.node_id:
            del self.shared.leases[task_id]

    async def store(self, change: Change) -> bool:
        if self.crashed or self.shared.holder(change.task_id) != self.node_id:
            return False
        stored = self.shared.stored.setdefault(change.task_id, Stored())
        if change.error is None:
            assert change.seq is not None and change.state is not None
            stored.seq, stored.state = change.seq, change.state
            stored.history.appendleft((change.seq, change.state))
        elif change.final:
            stored.error = change.error
        self.shared.publish(self.node_id, change)
        return True

    async def load(self, task_id: str) -> Change | None:
        stored = self.shared.stored.get(task_id)
        if stored is None:
            return None
        change = Change(task_id, stored.seq, stored.state, error=stored.error)
        history = list(reversed(stored.history))
        return replace(change, final=stored.error is not None, history=history)
